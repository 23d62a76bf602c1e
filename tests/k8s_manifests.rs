//! The repository's Kubernetes material against a real API server
//! (tests/k8s: etcd, kube-apiserver, kube-controller-manager on loopback):
//! deploy/rbac.yaml + deploy/example-app.yaml and the Helm chart (rendered by
//! the helm that deploy/tools.sh builds) are server-side applied for real, the
//! Deployment and ReplicaSet controllers create their Pods (which the
//! ServiceAccount admission accepts only when the ServiceAccount exists, and
//! into which it projects the token), and the API's own authorizer is asked
//! what lameduck's ServiceAccount may do: exactly get pods, list/watch
//! endpointslices and create/patch events in its namespace, nothing else.
//! deploy/validate.sh checks the same manifests offline (kubecheck).

#[path = "k8s/mod.rs"]
mod k8s;

use std::path::Path;
use std::time::Duration;

use k8s::{ControlPlane, K8S_VERSION, WAIT, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Container, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DynamicObject, ListParams, PostParams};

/// Where the Role's verbs matter: the pods' namespace, and one next to it.
const OTHER_NS: &str = "elsewhere";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `helm template <release> charts/lameduck --namespace <ns>` for the
/// control plane's Kubernetes version, plus `args`.
fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let chart = repo().join("charts/lameduck");
    let mut all = vec!["template", release, chart.to_str().unwrap()];
    all.extend(["--namespace", namespace, "--kube-version", K8S_VERSION]);
    all.extend(args);
    k8s::run_helm(&all)
}

fn kinds(objs: &[DynamicObject]) -> Vec<String> {
    objs.iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect()
}

fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// One request the authorizer is asked about.
struct Access {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    /// `None`: the pods' namespace; `Some("")`: all namespaces.
    namespace: Option<&'static str>,
}

const fn access(verb: &'static str, group: &'static str, resource: &'static str) -> Access {
    Access {
        verb,
        group,
        resource,
        namespace: None,
    }
}

const fn access_in(
    namespace: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
) -> Access {
    Access {
        verb,
        group,
        resource,
        namespace: Some(namespace),
    }
}

/// Exactly what lameduck's drain uses (deploy/rbac.yaml).
const ALLOWED: &[Access] = &[
    access("get", "", "pods"),
    access("list", "discovery.k8s.io", "endpointslices"),
    access("watch", "discovery.k8s.io", "endpointslices"),
    access("create", "events.k8s.io", "events"),
    access("patch", "events.k8s.io", "events"),
];

/// A sample of what it must not be able to do.
const DENIED: &[Access] = &[
    access("list", "", "pods"),
    access("watch", "", "pods"),
    access("delete", "", "pods"),
    access("update", "", "pods"),
    access("patch", "", "pods"),
    access("create", "", "pods/eviction"),
    access("get", "", "secrets"),
    access("get", "", "serviceaccounts/token"),
    access("get", "discovery.k8s.io", "endpointslices"),
    access("delete", "discovery.k8s.io", "endpointslices"),
    access("create", "", "events"),
    access("delete", "events.k8s.io", "events"),
    access("patch", "apps", "deployments"),
    access_in(OTHER_NS, "get", "", "pods"),
    access_in(OTHER_NS, "list", "discovery.k8s.io", "endpointslices"),
    access_in(OTHER_NS, "watch", "discovery.k8s.io", "endpointslices"),
    access_in(OTHER_NS, "create", "events.k8s.io", "events"),
    access_in("default", "list", "discovery.k8s.io", "endpointslices"),
    access_in("", "get", "", "pods"),
    access_in("", "list", "discovery.k8s.io", "endpointslices"),
];

/// The API server's answer to "may ServiceAccount `ns/sa` do `a`?"
/// (SubjectAccessReview: the authorizer chain, RBAC included).
async fn allowed(cp: &ControlPlane, ns: &str, sa: &str, a: &Access) -> bool {
    let target = a.namespace.unwrap_or(ns);
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {
            "user": format!("system:serviceaccount:{ns}:{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "resourceAttributes": {
                "namespace": target,
                "verb": a.verb,
                "group": a.group,
                "resource": a.resource,
            },
        },
    }))
    .unwrap();
    let answer = Api::<SubjectAccessReview>::all(cp.client())
        .create(&PostParams::default(), &review)
        .await
        .unwrap_or_else(|e| panic!("SubjectAccessReview: {e}"));
    answer.status.is_some_and(|s| s.allowed)
}

/// Asserts the ServiceAccount `ns/sa` may do exactly [`ALLOWED`] and none of
/// [`DENIED`]. The authorizer reads RBAC from an informer, so the allowed
/// verbs are waited for first.
async fn assert_rbac_exact(cp: &ControlPlane, ns: &str, sa: &str) {
    for a in ALLOWED {
        let what = format!(
            "{ns}/{sa} may {} {}/{} in {}",
            a.verb,
            a.group,
            a.resource,
            a.namespace.unwrap_or(ns)
        );
        wait_until(&what, Duration::from_secs(10), || async {
            allowed(cp, ns, sa, a).await.then_some(())
        })
        .await;
    }
    let mut wrongly = Vec::new();
    for a in DENIED {
        if allowed(cp, ns, sa, a).await {
            wrongly.push(format!(
                "{} {}/{} in {:?}",
                a.verb,
                a.group,
                a.resource,
                a.namespace.unwrap_or(ns)
            ));
        }
    }
    assert!(
        wrongly.is_empty(),
        "ServiceAccount {ns}/{sa} may do more than lameduck uses: {wrongly:?}"
    );
    eprintln!(
        "ok: {ns}/{sa}: {} accesses allowed, {} denied, as deploy/rbac.yaml says",
        ALLOWED.len(),
        DENIED.len()
    );
}

fn env_field_path<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.as_str())
}

/// Waits for a Pod of the Deployment `name` (the ReplicaSet controller
/// creates it; the ServiceAccount admission refuses it while its
/// ServiceAccount is missing) and checks the wiring lameduck's drain needs:
/// the ServiceAccount, its token mounted into the lameduck container, the
/// downward-API identity. Returns the Pod.
async fn assert_pod_wired(
    cp: &ControlPlane,
    ns: &str,
    deployment: &str,
    sa: &str,
    native: bool,
) -> Pod {
    let dep = cp
        .api::<Deployment>(ns)
        .get(deployment)
        .await
        .unwrap_or_else(|e| panic!("Deployment {ns}/{deployment}: {e}"));
    let selector = dep
        .spec
        .selector
        .match_labels
        .as_ref()
        .expect("matchLabels")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = cp.api::<Pod>(ns);
    let pod = wait_until(
        &format!("a Pod of Deployment {ns}/{deployment}"),
        WAIT,
        || {
            let pods = pods.clone();
            let lp = ListParams::default().labels(&selector);
            async move { pods.list(&lp).await.ok()?.items.into_iter().next() }
        },
    )
    .await;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.service_account_name.as_deref(), Some(sa), "{name}");
    assert_eq!(spec.automount_service_account_token, Some(true), "{name}");
    let in_init = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "lameduck");
    let in_regular = spec.containers.iter().find(|c| c.name == "lameduck");
    let ld = if native {
        assert!(in_regular.is_none(), "{name}: lameduck in containers");
        let ld = in_init.unwrap_or_else(|| panic!("{name}: no lameduck init container"));
        assert_eq!(ld.restart_policy.as_deref(), Some("Always"), "{name}");
        ld
    } else {
        assert!(in_init.is_none(), "{name}: lameduck in initContainers");
        in_regular.unwrap_or_else(|| panic!("{name}: no lameduck container"))
    };
    assert_eq!(
        env_field_path(ld, "POD_NAME"),
        Some("metadata.name"),
        "{name}"
    );
    assert_eq!(
        env_field_path(ld, "POD_NAMESPACE"),
        Some("metadata.namespace"),
        "{name}"
    );
    let args = ld.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--kubernetes=auto"),
        "{name}: {args:?}"
    );
    let margin = if native {
        "--deadline-margin=1s"
    } else {
        "--deadline-margin=5s"
    };
    assert!(args.iter().any(|a| a == margin), "{name}: {args:?}");
    // The ServiceAccount admission projected the token (kube-api-access-*)
    // into the container, where kube-rs' in-cluster configuration reads it.
    let mounts = ld.volume_mounts.clone().unwrap_or_default();
    let token = mounts
        .iter()
        .find(|m| m.mount_path == TOKEN_DIR)
        .unwrap_or_else(|| panic!("{name}: no token mounted at {TOKEN_DIR}: {mounts:?}"));
    assert!(token.name.starts_with("kube-api-access-"), "{token:?}");
    eprintln!("ok: Pod {ns}/{name} runs as {sa} with the token and its identity in lameduck");
    pod
}

#[tokio::test]
async fn example_manifests_apply_and_their_service_account_may_do_exactly_the_drain() {
    const NS: &str = "shop";
    let cp = ControlPlane::builder()
        .service_account(NS, "lameduck")
        .start()
        .await;
    cp.create_namespace(NS).await;
    cp.create_namespace(OTHER_NS).await;

    // As kustomize's `namespace: shop` would: the RoleBinding's subject too.
    let rbac = std::fs::read_to_string(repo().join("deploy/rbac.yaml")).unwrap();
    let rbac = rbac.replace("namespace: default", &format!("namespace: {NS}"));
    let objs = cp.apply_yaml(&rbac, NS).await;
    assert_eq!(kinds(&objs), ["ServiceAccount", "Role", "RoleBinding"]);
    let objs = cp.apply_file("deploy/example-app.yaml", NS).await;
    assert_eq!(kinds(&objs), ["Service", "Deployment"]);

    // Stored as applied.
    cp.api::<ServiceAccount>(NS).get("lameduck").await.unwrap();
    let role = cp.api::<Role>(NS).get("lameduck-drain").await.unwrap();
    assert_eq!(role.rules.as_ref().map(Vec::len), Some(3));
    let binding = cp
        .api::<RoleBinding>(NS)
        .get("lameduck-drain")
        .await
        .unwrap();
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "lameduck", Some(NS))
    );
    cp.api::<Service>(NS).get("lameduck-example").await.unwrap();
    let pod = assert_pod_wired(&cp, NS, "lameduck-example", "lameduck", true).await;
    let pod_name = pod.metadata.name.clone().unwrap();

    // The authorizer's view.
    assert_rbac_exact(&cp, NS, "lameduck").await;

    // And real requests with the ServiceAccount's token: what lameduck does...
    let client = cp.client_for(NS, "lameduck").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let own = pods.get(&pod_name).await.expect("get its own Pod");
    assert_eq!(own.metadata.name.as_deref(), Some(pod_name.as_str()));
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=lameduck-example"))
        .await
        .expect("list the EndpointSlices");
    let event: Event = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "lameduck-test-", "namespace": NS},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "lameduck",
        "reportingInstance": pod_name,
        "action": "Drain",
        "reason": "DrainStarted",
        "type": "Normal",
        "note": "tests/k8s_manifests.rs",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "namespace": NS, "name": pod_name},
    }))
    .unwrap();
    Api::<Event>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &event)
        .await
        .expect("create an Event");
    // ...and what it must not.
    let err = pods
        .list(&ListParams::default())
        .await
        .expect_err("list pods");
    assert_eq!(status_code(&err), Some(403), "{err}");
    let err = pods
        .delete(&pod_name, &Default::default())
        .await
        .expect_err("delete its Pod");
    assert_eq!(status_code(&err), Some(403), "{err}");
    let err = Api::<EndpointSlice>::namespaced(client.clone(), OTHER_NS)
        .list(&ListParams::default())
        .await
        .expect_err("EndpointSlices of another namespace");
    assert_eq!(status_code(&err), Some(403), "{err}");
    let err = Api::<Pod>::namespaced(client, OTHER_NS)
        .get("anything")
        .await
        .expect_err("a Pod of another namespace");
    assert_eq!(status_code(&err), Some(403), "{err}");
}

#[tokio::test]
async fn chart_renders_apply_and_its_service_account_may_do_exactly_the_drain() {
    let cp = ControlPlane::start().await;
    cp.create_namespace(OTHER_NS).await;
    // (release, namespace, extra helm args, native sidecar)
    let cases: [(&str, &str, &[&str], bool); 2] = [
        ("web", "chart-native", &[], true),
        (
            "legacy",
            "chart-regular",
            &["--set", "nativeSidecar=false"],
            false,
        ),
    ];
    for (release, ns, args, native) in cases {
        cp.create_namespace(ns).await;
        let yaml = helm_template(release, ns, args);
        let objs = cp.apply_yaml(&yaml, ns).await;
        let mut got = kinds(&objs);
        got.sort();
        assert_eq!(
            got,
            [
                "Deployment",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount"
            ],
            "helm template {release} {args:?}"
        );
        let fullname = format!("{release}-lameduck");
        cp.api::<ServiceAccount>(ns).get(&fullname).await.unwrap();
        cp.api::<Role>(ns)
            .get(&format!("{fullname}-drain"))
            .await
            .unwrap();
        cp.api::<RoleBinding>(ns)
            .get(&format!("{fullname}-drain"))
            .await
            .unwrap();
        cp.api::<Service>(ns).get(&fullname).await.unwrap();
        assert_pod_wired(&cp, ns, &fullname, &fullname, native).await;
        assert_rbac_exact(&cp, ns, &fullname).await;
    }
}
