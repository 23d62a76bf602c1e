//! The drain's hard deadline, from the facts that are known when it is
//! computed: the pod's `deletionTimestamp` (when the kubelet sends SIGKILL;
//! it already honours `kubectl delete --grace-period=N`, evictions and node
//! drains), else `spec.terminationGracePeriodSeconds` counted from the drain's
//! start, else --drain-timeout. An explicit --drain-timeout caps whatever the
//! pod says: it can shorten the drain, never lengthen it past SIGKILL.

use std::time::{Duration, SystemTime};

use crate::metrics::DeadlineSource;

/// What the deadline is computed from.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineFacts {
    pub drain_started: SystemTime,
    /// --drain-timeout, or its default.
    pub drain_timeout: Duration,
    /// --drain-timeout was given.
    pub drain_timeout_explicit: bool,
    /// Time left for what must happen after lameduck is done (the app's own
    /// stop in the classic layout) before SIGKILL.
    pub margin: Duration,
    /// `spec.terminationGracePeriodSeconds`.
    pub grace_period: Option<Duration>,
    /// `metadata.deletionTimestamp`.
    pub deletion: Option<SystemTime>,
}

/// The deadline and where it came from. Never before the drain's start: a
/// SIGKILL that is closer than the margin means "force now".
pub fn drain_deadline(facts: DeadlineFacts) -> (SystemTime, DeadlineSource) {
    let start = facts.drain_started;
    let from_pod = facts
        .deletion
        .map(|at| (at, DeadlineSource::DeletionTimestamp))
        .or_else(|| {
            facts
                .grace_period
                .map(|grace| (start + grace, DeadlineSource::GracePeriod))
        })
        .map(|(sigkill, source)| {
            let deadline = sigkill.checked_sub(facts.margin).unwrap_or(start);
            (deadline.max(start), source)
        });
    let configured = (start + facts.drain_timeout, DeadlineSource::DrainTimeout);
    match from_pod {
        Some(pod) if facts.drain_timeout_explicit && configured.0 < pod.0 => configured,
        Some(pod) => pod,
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn facts() -> DeadlineFacts {
        DeadlineFacts {
            drain_started: SystemTime::UNIX_EPOCH + s(1000),
            drain_timeout: s(25),
            drain_timeout_explicit: false,
            margin: s(2),
            grace_period: None,
            deletion: None,
        }
    }

    fn at(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + s(n)
    }

    #[test]
    fn without_the_pod_the_drain_timeout_applies() {
        assert_eq!(
            drain_deadline(facts()),
            (at(1025), DeadlineSource::DrainTimeout)
        );
    }

    #[test]
    fn the_deletion_timestamp_wins_over_the_grace_period_and_the_default() {
        let f = DeadlineFacts {
            grace_period: Some(s(30)),
            deletion: Some(at(1060)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(f),
            (at(1058), DeadlineSource::DeletionTimestamp)
        );
    }

    #[test]
    fn a_shorter_grace_period_from_kubectl_is_honoured() {
        // `kubectl delete --grace-period=5` with a 30 s spec.
        let f = DeadlineFacts {
            grace_period: Some(s(30)),
            deletion: Some(at(1005)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(f),
            (at(1003), DeadlineSource::DeletionTimestamp)
        );
    }

    #[test]
    fn the_grace_period_applies_when_the_pod_is_not_being_deleted() {
        let f = DeadlineFacts {
            grace_period: Some(s(60)),
            ..facts()
        };
        assert_eq!(drain_deadline(f), (at(1058), DeadlineSource::GracePeriod));
    }

    #[test]
    fn an_explicit_drain_timeout_caps_but_never_extends() {
        let capped = DeadlineFacts {
            drain_timeout: s(10),
            drain_timeout_explicit: true,
            deletion: Some(at(1060)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(capped),
            (at(1010), DeadlineSource::DrainTimeout)
        );
        let longer = DeadlineFacts {
            drain_timeout: s(120),
            drain_timeout_explicit: true,
            deletion: Some(at(1030)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(longer),
            (at(1028), DeadlineSource::DeletionTimestamp)
        );
    }

    #[test]
    fn a_sigkill_inside_the_margin_means_now() {
        let f = DeadlineFacts {
            deletion: Some(at(1001)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(f),
            (at(1000), DeadlineSource::DeletionTimestamp)
        );
        let past = DeadlineFacts {
            deletion: Some(at(1)),
            margin: s(5),
            ..facts()
        };
        assert_eq!(drain_deadline(past).0, at(1000));
    }
}
