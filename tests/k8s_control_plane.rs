//! Smoke tests of the Kubernetes test harness (tests/k8s): a real etcd,
//! kube-apiserver and kube-controller-manager on loopback, the controllers
//! doing their work (EndpointSlices follow pod readiness and deletion), and
//! the ServiceAccount token identities going through RBAC.

#[path = "k8s/mod.rs"]
mod k8s;

use std::time::Duration;

use k8s::{ControlPlane, K8S_VERSION, WAIT};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};

#[tokio::test]
async fn apiserver_reports_its_pinned_version() {
    let cp = ControlPlane::start().await;
    let info = cp.client().apiserver_version().await.expect("GET /version");
    assert_eq!(info.git_version, K8S_VERSION, "{info:?}");
    assert_eq!(
        (info.major.as_str(), info.minor.as_str()),
        ("1", "37"),
        "{info:?}"
    );
    eprintln!(
        "k8s: start took {:.1?}; RSS (KiB): {:?}",
        cp.started_in(),
        cp.rss_kib()
    );

    // The kubeconfig file works for a child process: kubectl, when built.
    if let Some(mut kubectl) = cp.kubectl() {
        let out = kubectl
            .args(["get", "--raw", "/version"])
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(K8S_VERSION));
    }
}

#[tokio::test]
async fn endpointslice_follows_pod_readiness_and_deletion() {
    let cp = ControlPlane::start().await;
    let ns = "smoke";
    cp.create_namespace(ns).await;
    let node = cp.create_node("node-a", "10.0.0.10").await;
    assert!(
        node.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let labels = [("app", "web")];
    let svc = cp.create_service(ns, "web", &labels, 80, 8000).await;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    assert!(
        cluster_ip.starts_with("10.96."),
        "ClusterIP {cluster_ip} from 10.96.0.0/16"
    );
    cp.create_pod(ns, "web-0", "node-a", &labels, 8000).await;

    let ip = "10.244.0.5";
    cp.set_pod_running(ns, "web-0", ip, true).await;
    let ep = cp.wait_endpoint(ns, "web", ip, WAIT, |e| e.ready).await;
    assert!(ep.serving && !ep.terminating, "{ep:?}");
    assert_eq!(ep.pod.as_deref(), Some("web-0"));
    assert_eq!(ep.node_name.as_deref(), Some("node-a"));
    let slices = cp.endpoint_slices(ns, "web").await;
    let port = slices[0]
        .ports
        .as_ref()
        .and_then(|p| p.first())
        .and_then(|p| p.port);
    assert_eq!(port, Some(8000), "the slice carries the target port");

    cp.set_pod_ready(ns, "web-0", false).await;
    let ep = cp.wait_endpoint(ns, "web", ip, WAIT, |e| !e.ready).await;
    assert!(!ep.serving && !ep.terminating, "{ep:?}");

    // Deletion with a grace period: no kubelet finishes it, the pod stays
    // Terminating, and the slice keeps it as a terminating endpoint.
    cp.delete_pod(ns, "web-0", 30).await;
    let pod = cp
        .api::<Pod>(ns)
        .get("web-0")
        .await
        .expect("pod still there (Terminating)");
    assert!(pod.metadata.deletion_timestamp.is_some());
    let ep = cp
        .wait_endpoint(ns, "web", ip, WAIT, |e| e.terminating)
        .await;
    assert!(!ep.ready, "{ep:?}");

    cp.force_delete_pod(ns, "web-0").await;
    k8s::wait_until("the endpoint to leave the slice", WAIT, || async {
        let slices = cp.endpoint_slices(ns, "web").await;
        k8s::endpoint_for_ip(&slices, ip).is_none().then_some(())
    })
    .await;
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn service_account_token_goes_through_rbac() {
    let (ns, sa) = ("rbac", "lameduck");
    let cp = ControlPlane::builder()
        .service_account(ns, sa)
        .start()
        .await;
    cp.create_namespace(ns).await;
    let client = cp.client_for(ns, sa).await;

    // Who am I: the identity of the token file.
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:rbac:lameduck")
    );
    let groups = user.groups.unwrap_or_default();
    for g in [
        "system:serviceaccounts",
        "system:serviceaccounts:rbac",
        "system:authenticated",
    ] {
        assert!(groups.iter().any(|x| x == g), "{g} in {groups:?}");
    }

    let pods: Api<Pod> = Api::namespaced(client, ns);
    let err = pods
        .list(&ListParams::default())
        .await
        .expect_err("no Role yet: forbidden");
    assert_eq!(status_code(&err), Some(403), "{err}");

    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pod-reader", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lameduck-pod-reader", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    cp.apply(&cp.api::<Role>(ns), &role).await;
    cp.apply(&cp.api::<RoleBinding>(ns), &binding).await;

    // The authorizer reads RBAC from an informer: allowed within moments.
    let list = k8s::wait_until(
        "the RoleBinding to take effect",
        Duration::from_secs(10),
        || async { pods.list(&ListParams::default()).await.ok() },
    )
    .await;
    assert!(list.items.is_empty());
    cp.create_node("node-a", "10.0.0.10").await;
    cp.create_pod(ns, "p", "node-a", &[("app", "p")], 8000)
        .await;
    let pod = pods
        .get("p")
        .await
        .expect("get pods: 200 after the RoleBinding");
    assert_eq!(pod.metadata.name.as_deref(), Some("p"));
    // Still only what the Role grants.
    let err = pods
        .delete("p", &Default::default())
        .await
        .expect_err("delete is not granted");
    assert_eq!(status_code(&err), Some(403), "{err}");
}

#[tokio::test]
async fn yaml_manifests_apply_server_side() {
    let cp = ControlPlane::start().await;
    cp.create_namespace("apply").await;
    let yaml = "# a comment-only document\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: one\n  labels:\n    name: not-this\ndata:\n  k: v\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: \"lameduck-test-reader\"\nrules: []\n";
    let objs = cp.apply_yaml(yaml, "apply").await;
    assert_eq!(objs.len(), 2);
    assert_eq!(objs[0].metadata.namespace.as_deref(), Some("apply"));
    assert_eq!(objs[0].data["data"]["k"], "v");
    assert_eq!(
        objs[1].metadata.name.as_deref(),
        Some("lameduck-test-reader")
    );
    // The repository's own manifests apply too (Deployment + Service).
    let objs = cp.apply_file("deploy/example-app.yaml", "apply").await;
    assert!(
        objs.iter()
            .any(|o| o.types.as_ref().is_some_and(|t| t.kind == "Deployment")),
        "{objs:?}"
    );
}
