//! The drain's hard deadline, from the facts that are known when it is
//! computed. For a pod being deleted, SIGKILL comes no earlier than either
//! of two instants, and the later one is used:
//! - its `deletionTimestamp`, the delete request's time plus the grace
//!   period (it already honours `kubectl delete --grace-period=N`,
//!   evictions and node drains);
//! - the deletion's `deletionGracePeriodSeconds` counted from when the
//!   kubelet began stopping the pod. The kubelet starts its own clock then,
//!   not at the request: a kubelet busy with the pod (one deleted just after
//!   it started, say) acts seconds later and kills seconds later, and its
//!   preStop hooks (the one that starts the drain among them) start at that
//!   moment. The drain's start, less [`HOOK_LATENCY`], stands for it.
//!
//! Without a deletion, `spec.terminationGracePeriodSeconds` counted the same
//! way, else --drain-timeout. The margin is then taken off. An explicit
//! --drain-timeout caps whatever the pod says: it can shorten the drain,
//! never lengthen it past SIGKILL.

use std::time::{Duration, SystemTime};

use crate::metrics::DeadlineSource;

/// How long after the kubelet begins stopping the pod lameduck may learn of
/// it: the start-up of the exec preStop hook (`lameduck drain --wait`) that
/// asks for the drain. 86–139 ms in the node lab (`kubelet --v=3`, "Running
/// preStop hook" to lameduck's "drain requested"); a SIGTERM comes sooner.
pub const HOOK_LATENCY: Duration = Duration::from_millis(500);

/// `deletionTimestamp` is kept to the second, truncated: the kubelet's clock
/// is taken over it only when it is later by more than that.
const TIMESTAMP_RESOLUTION: Duration = Duration::from_secs(1);

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
    /// `metadata.deletionGracePeriodSeconds`.
    pub deletion_grace_period: Option<Duration>,
}

/// The deadline and where it came from. Never before the drain's start: a
/// SIGKILL that is closer than the margin means "force now".
pub fn drain_deadline(facts: DeadlineFacts) -> (SystemTime, DeadlineSource) {
    let start = facts.drain_started;
    // When the kubelet began stopping the pod, at the earliest.
    let stop_began = start.checked_sub(HOOK_LATENCY).unwrap_or(start);
    let from_pod = match facts.deletion {
        Some(at) => Some(
            match facts.deletion_grace_period.map(|grace| stop_began + grace) {
                Some(kubelet) if kubelet > at + TIMESTAMP_RESOLUTION => {
                    (kubelet, DeadlineSource::DeletionGracePeriod)
                }
                _ => (at, DeadlineSource::DeletionTimestamp),
            },
        ),
        None => facts
            .grace_period
            .map(|grace| (stop_began + grace, DeadlineSource::GracePeriod)),
    }
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
            deletion_grace_period: None,
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
        // From the drain's start less the hook's latency.
        assert_eq!(
            drain_deadline(f),
            (at(1058) - HOOK_LATENCY, DeadlineSource::GracePeriod)
        );
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

    #[test]
    fn a_kubelet_late_to_stop_the_pod_kills_later_than_the_deletion_timestamp() {
        // `kubectl delete --grace-period=5` at 995.3 (deletionTimestamp
        // 1000.3, kept as 1000); the kubelet began stopping the pod only at
        // 1000, the drain's start: it kills at 1005.
        let late = DeadlineFacts {
            deletion: Some(at(1000)),
            deletion_grace_period: Some(s(5)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(late),
            (at(1003) - HOOK_LATENCY, DeadlineSource::DeletionGracePeriod)
        );
        // A kubelet on time (the drain starts 0.2 s after the request): the
        // deletionTimestamp, within its one-second resolution.
        let on_time = DeadlineFacts {
            deletion: Some(at(1004)),
            deletion_grace_period: Some(s(5)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(on_time),
            (at(1002), DeadlineSource::DeletionTimestamp)
        );
        // A drain started before the deletion (from the admin port): the
        // kubelet's clock starts later still, so the deletionTimestamp holds.
        let drained_first = DeadlineFacts {
            deletion: Some(at(1030)),
            deletion_grace_period: Some(s(5)),
            ..facts()
        };
        assert_eq!(
            drain_deadline(drained_first),
            (at(1028), DeadlineSource::DeletionTimestamp)
        );
    }

    #[test]
    fn an_explicit_drain_timeout_caps_the_kubelets_clock_too() {
        let f = DeadlineFacts {
            drain_timeout: s(2),
            drain_timeout_explicit: true,
            deletion: Some(at(1000)),
            deletion_grace_period: Some(s(30)),
            ..facts()
        };
        assert_eq!(drain_deadline(f), (at(1002), DeadlineSource::DrainTimeout));
    }
}
