//! Which EndpointSlices still route to this pod: pure functions over the API
//! objects, so the rule the lame-duck window ends on is tested without a server.
//!
//! Nothing here talks to the API or touches metrics; `watch.rs` feeds it the
//! list and the watch events and acts on the count.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::PodFacts;

/// Whether `endpoint` is this pod.
///
/// The strongest identity the endpoint and the facts share decides: a Pod
/// `targetRef` is compared by uid when both sides know it (a StatefulSet pod
/// re-created under the same name is another pod), else by name; an endpoint
/// without a Pod `targetRef` (a hand-written slice) by address. An endpoint
/// whose `targetRef` names another pod never matches on its address: pod IPs
/// are reused, and the other pod's endpoint is not ours to wait for.
pub(crate) fn is_this_pod(endpoint: &Endpoint, facts: &PodFacts) -> bool {
    match &endpoint.target_ref {
        Some(target) if target.kind.as_deref() == Some("Pod") => {
            let same_namespace = target
                .namespace
                .as_deref()
                .is_none_or(|namespace| namespace == facts.namespace);
            if !same_namespace {
                return false;
            }
            match (target.uid.as_deref(), facts.uid.as_deref()) {
                (Some(theirs), Some(ours)) => theirs == ours,
                _ => target.name.as_deref() == Some(facts.name.as_str()),
            }
        }
        _ => endpoint.addresses.iter().any(|address| {
            address
                .parse::<IpAddr>()
                .is_ok_and(|ip| facts.ips.contains(&ip))
        }),
    }
}

/// The `serving` condition as the API documents it: absent means "same as
/// ready", and an absent `ready` means ready ("unknown state … should be
/// interpreted as ready").
pub(crate) fn is_serving(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    conditions.and_then(|c| c.serving).unwrap_or(ready)
}

/// Whether `slice` still routes to this pod: it lists the pod as serving.
pub(crate) fn slice_serves_pod(slice: &EndpointSlice, facts: &PodFacts) -> bool {
    slice
        .endpoints
        .iter()
        .flatten()
        .any(|endpoint| is_this_pod(endpoint, facts) && is_serving(endpoint))
}

/// The names of the slices that route to this pod, kept current from a list
/// and then from watch events. A set of names rather than the slices: one
/// Service's slices come and go by name, and the count is all the drain needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ServingSlices {
    names: BTreeSet<String>,
}

impl ServingSlices {
    /// The state a list of the namespace's slices shows.
    pub(crate) fn from_list(slices: &[EndpointSlice], facts: &PodFacts) -> Self {
        let mut state = ServingSlices::default();
        for slice in slices {
            state.upsert(slice, facts);
        }
        state
    }

    /// A slice was added or modified: it counts if it (still) serves the pod.
    /// A slice that no longer lists the pod, or lists it as not serving, stops
    /// counting.
    pub(crate) fn upsert(&mut self, slice: &EndpointSlice, facts: &PodFacts) {
        let Some(name) = slice.metadata.name.as_ref() else {
            return;
        };
        if slice_serves_pod(slice, facts) {
            self.names.insert(name.clone());
        } else {
            self.names.remove(name);
        }
    }

    /// A slice was deleted: whatever it listed no longer routes anywhere.
    pub(crate) fn delete(&mut self, slice: &EndpointSlice) {
        if let Some(name) = slice.metadata.name.as_ref() {
            self.names.remove(name);
        }
    }

    /// How many slices route to the pod (the `endpoints_serving` gauge).
    pub(crate) fn count(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::EndpointConditions;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn facts(uid: Option<&str>, ips: &[&str]) -> PodFacts {
        PodFacts {
            name: "web-0".into(),
            namespace: "shop".into(),
            uid: uid.map(Into::into),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            grace_period: None,
            deletion: None,
            deletion_grace_period: None,
        }
    }

    fn pod_ref(name: &str, uid: Option<&str>) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: uid.map(Into::into),
            ..Default::default()
        }
    }

    fn endpoint(
        address: &str,
        target: Option<ObjectReference>,
        ready: Option<bool>,
        serving: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            target_ref: target,
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating: None,
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ports: None,
        }
    }

    #[test]
    fn uid_decides_when_both_sides_know_it() {
        let ours = facts(Some("uid-1"), &["10.0.0.5"]);
        let same = endpoint(
            "10.0.0.5",
            Some(pod_ref("web-0", Some("uid-1"))),
            None,
            None,
        );
        assert!(is_this_pod(&same, &ours));
        // Same name, another uid: the previous incarnation of a StatefulSet pod.
        let previous = endpoint(
            "10.0.0.5",
            Some(pod_ref("web-0", Some("uid-0"))),
            None,
            None,
        );
        assert!(!is_this_pod(&previous, &ours));
    }

    #[test]
    fn name_decides_when_the_uid_is_unknown() {
        let unknown_uid = facts(None, &[]);
        let by_name = endpoint(
            "10.0.0.5",
            Some(pod_ref("web-0", Some("uid-1"))),
            None,
            None,
        );
        assert!(is_this_pod(&by_name, &unknown_uid));
        let other = endpoint(
            "10.0.0.5",
            Some(pod_ref("web-1", Some("uid-2"))),
            None,
            None,
        );
        assert!(!is_this_pod(&other, &unknown_uid));
        // A targetRef without uid falls back to the name even when ours is known.
        let no_uid_ref = endpoint("10.0.0.9", Some(pod_ref("web-0", None)), None, None);
        assert!(is_this_pod(&no_uid_ref, &facts(Some("uid-1"), &[])));
    }

    #[test]
    fn another_namespace_is_another_pod() {
        let mut target = pod_ref("web-0", None);
        target.namespace = Some("other".into());
        let e = endpoint("10.0.0.5", Some(target), None, None);
        assert!(!is_this_pod(&e, &facts(None, &["10.0.0.5"])));
    }

    #[test]
    fn address_decides_without_a_pod_target_ref() {
        let ours = facts(Some("uid-1"), &["10.0.0.5", "fd00::5"]);
        assert!(is_this_pod(&endpoint("10.0.0.5", None, None, None), &ours));
        assert!(is_this_pod(&endpoint("fd00:0::5", None, None, None), &ours));
        assert!(!is_this_pod(&endpoint("10.0.0.6", None, None, None), &ours));
        assert!(!is_this_pod(
            &endpoint("not-an-ip", None, None, None),
            &ours
        ));
        // A non-Pod targetRef (e.g. a Node) is no identity for a pod: the address decides.
        let node = ObjectReference {
            kind: Some("Node".into()),
            name: Some("web-0".into()),
            ..Default::default()
        };
        assert!(is_this_pod(
            &endpoint("10.0.0.5", Some(node.clone()), None, None),
            &ours
        ));
        assert!(!is_this_pod(
            &endpoint("10.0.0.7", Some(node), None, None),
            &ours
        ));
        // A Pod targetRef naming another pod does not match on a reused address.
        let other = endpoint(
            "10.0.0.5",
            Some(pod_ref("web-1", Some("uid-2"))),
            None,
            None,
        );
        assert!(!is_this_pod(&other, &ours));
    }

    #[test]
    fn serving_falls_back_to_ready_then_to_true() {
        let cases = [
            (None, None, true),
            (Some(false), None, false),
            (Some(true), None, true),
            // serving wins over ready: a terminating pod is not ready but may serve.
            (Some(false), Some(true), true),
            (Some(true), Some(false), false),
        ];
        for (ready, serving, expected) in cases {
            let e = endpoint("10.0.0.5", None, ready, serving);
            assert_eq!(
                is_serving(&e),
                expected,
                "ready {ready:?} serving {serving:?}"
            );
        }
        let no_conditions = Endpoint {
            addresses: vec!["10.0.0.5".into()],
            ..Default::default()
        };
        assert!(is_serving(&no_conditions));
    }

    #[test]
    fn counts_slices_of_several_services() {
        let ours = facts(Some("uid-1"), &["10.0.0.5"]);
        let me = || Some(pod_ref("web-0", Some("uid-1")));
        let neighbour = endpoint(
            "10.0.0.6",
            Some(pod_ref("web-1", Some("uid-2"))),
            None,
            None,
        );
        let slices = [
            // Service "web": us and a neighbour.
            slice(
                "web-abc",
                vec![
                    endpoint("10.0.0.5", me(), Some(true), Some(true)),
                    neighbour.clone(),
                ],
            ),
            // Service "web-headless": us, with no conditions at all.
            slice(
                "web-headless-xyz",
                vec![endpoint("10.0.0.5", me(), None, None)],
            ),
            // Service "metrics": us, but already not serving.
            slice(
                "metrics-def",
                vec![endpoint("10.0.0.5", me(), Some(false), Some(false))],
            ),
            // Service "other": not us.
            slice("other-ghi", vec![neighbour]),
            // An empty slice (a Service with no endpoints yet).
            EndpointSlice {
                endpoints: None,
                ..slice("empty-jkl", vec![])
            },
        ];
        let state = ServingSlices::from_list(&slices, &ours);
        assert_eq!(state.count(), 2, "{state:?}");
        assert_eq!(ServingSlices::from_list(&[], &ours).count(), 0);
    }

    #[test]
    fn follows_modified_and_deleted_slices() {
        let ours = facts(Some("uid-1"), &["10.0.0.5"]);
        let me = || Some(pod_ref("web-0", Some("uid-1")));
        let web = slice(
            "web-abc",
            vec![endpoint("10.0.0.5", me(), Some(true), Some(true))],
        );
        let admin = slice("admin-abc", vec![endpoint("10.0.0.5", me(), None, None)]);
        let mut state = ServingSlices::from_list(&[web.clone(), admin.clone()], &ours);
        assert_eq!(state.count(), 2);

        // The readiness failure reached the slice: still listed, not serving.
        let not_serving = slice(
            "web-abc",
            vec![endpoint("10.0.0.5", me(), Some(false), Some(false))],
        );
        state.upsert(&not_serving, &ours);
        assert_eq!(state.count(), 1);
        // Serving again (e.g. a flapping probe) counts again.
        state.upsert(&web, &ours);
        assert_eq!(state.count(), 2);
        // The pod removed from the slice altogether.
        state.upsert(&slice("web-abc", vec![]), &ours);
        assert_eq!(state.count(), 1);
        // The other Service's slice deleted.
        state.delete(&admin);
        assert_eq!(state.count(), 0);
        // Deleting or modifying a slice we never counted changes nothing.
        state.delete(&slice("unknown", vec![]));
        state.upsert(
            &slice("other", vec![endpoint("10.0.0.9", None, None, None)]),
            &ours,
        );
        assert_eq!(state.count(), 0);
        // A new slice listing us (a Service created during the drain) counts.
        state.upsert(
            &slice("new-svc", vec![endpoint("10.0.0.5", None, None, None)]),
            &ours,
        );
        assert_eq!(state.count(), 1);
    }

    #[test]
    fn a_slice_without_a_name_is_ignored() {
        let ours = facts(None, &["10.0.0.5"]);
        let mut nameless = slice("x", vec![endpoint("10.0.0.5", None, None, None)]);
        nameless.metadata.name = None;
        assert_eq!(ServingSlices::from_list(&[nameless], &ours).count(), 0);
    }
}
