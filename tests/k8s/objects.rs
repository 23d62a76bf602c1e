//! Typed helpers on a [`ControlPlane`]: the objects a test needs, and the
//! status writes a kubelet would do (there is no kubelet here).

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ControlPlane, WAIT};

/// Polls `f` (every 100 ms) until it returns `Some`, and returns that; panics
/// with `what` and the time waited if `timeout` passes first.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("k8s: timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An EndpointSlice endpoint, flattened: its addresses, conditions and pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub slice: String,
    pub addresses: Vec<String>,
    /// `conditions.ready` (nil counts as true, as for consumers of the API).
    pub ready: bool,
    /// `conditions.serving` (nil: same as ready).
    pub serving: bool,
    /// `conditions.terminating` (nil: false).
    pub terminating: bool,
    pub pod: Option<String>,
    pub node_name: Option<String>,
}

impl EndpointView {
    fn new(slice: &str, ep: &Endpoint) -> EndpointView {
        let c = ep.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        EndpointView {
            slice: slice.to_string(),
            addresses: ep.addresses.clone(),
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
            pod: ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
            node_name: ep.node_name.clone(),
        }
    }
}

/// The endpoint with address `ip` in `slices`, if any.
pub fn endpoint_for_ip(slices: &[EndpointSlice], ip: &str) -> Option<EndpointView> {
    slices.iter().find_map(|s| {
        let name = s.metadata.name.as_deref().unwrap_or("");
        s.endpoints
            .iter()
            .flatten()
            .find(|e| e.addresses.iter().any(|a| a == ip))
            .map(|e| EndpointView::new(name, e))
    })
}

fn from_json<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("k8s: building an object: {e}"))
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("Time serializes")
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

fn field_manager() -> PatchParams {
    PatchParams::apply("lameduck-tests").force()
}

impl ControlPlane {
    /// A namespaced `Api` on the admin client.
    pub fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client(), namespace)
    }

    /// A cluster-scoped `Api` on the admin client.
    pub fn api_all<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::all(self.client())
    }

    /// Creates a Namespace and waits until the serviceaccount controller has
    /// made its `default` ServiceAccount (pods cannot be created before:
    /// the ServiceAccount admission plugin is on).
    pub async fn create_namespace(&self, name: &str) -> Namespace {
        let ns: Namespace = from_json(json!({"metadata": {"name": name}}));
        let ns = self
            .api_all::<Namespace>()
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let sas: Api<ServiceAccount> = self.api(name);
        wait_until(
            &format!("ServiceAccount default in namespace {name}"),
            WAIT,
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok().flatten() }
            },
        )
        .await;
        ns
    }

    /// Creates a Node (label `kubernetes.io/hostname=<name>`) and sets its
    /// status like a kubelet: Ready=True, addresses InternalIP=`internal_ip`
    /// and Hostname, capacity, nodeInfo with kubelet version v1.37.2.
    pub async fn create_node(&self, name: &str, internal_ip: &str) -> Node {
        let nodes = self.api_all::<Node>();
        let node: Node = from_json(json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            }},
            "spec": {},
        }));
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
        self.set_node_ready(name, internal_ip, true).await
    }

    /// Sets a Node's status (Ready condition and addresses), like a kubelet's
    /// heartbeat would.
    pub async fn set_node_ready(&self, name: &str, internal_ip: &str, ready: bool) -> Node {
        let t = now();
        let cond = |type_: &str, status: bool, reason: &str| {
            json!({"type": type_, "status": if status { "True" } else { "False" },
                   "reason": reason, "message": reason,
                   "lastHeartbeatTime": t, "lastTransitionTime": t})
        };
        let status = json!({"status": {
            "conditions": [
                cond("MemoryPressure", false, "KubeletHasSufficientMemory"),
                cond("DiskPressure", false, "KubeletHasNoDiskPressure"),
                cond("PIDPressure", false, "KubeletHasSufficientPID"),
                cond("Ready", ready, if ready { "KubeletReady" } else { "KubeletNotReady" }),
            ],
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "nodeInfo": {
                "machineID": "lameduck", "systemUUID": "lameduck", "bootID": "lameduck",
                "kernelVersion": "6.0.0", "osImage": "lameduck-tests", "containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": super::K8S_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }});
        self.api_all::<Node>()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("patch node {name} status: {e}"))
    }

    /// Creates a Pod bound to `node` (`spec.nodeName`: no scheduler needed),
    /// one container `app` (image `registry.invalid/app:1`, never pulled)
    /// with a port named `http` = `port`, grace period 30 s.
    pub async fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        port: u16,
    ) -> Pod {
        let pod: Pod = from_json(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels_json(labels)},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 30,
                "containers": [{
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                }],
            },
        }));
        self.create_pod_object(namespace, &pod).await
    }

    /// Creates any Pod (set `spec.nodeName` yourself).
    pub async fn create_pod_object(&self, namespace: &str, pod: &Pod) -> Pod {
        self.api::<Pod>(namespace)
            .create(&PostParams::default(), pod)
            .await
            .unwrap_or_else(|e| panic!("create pod {namespace}/{:?}: {e}", pod.metadata.name))
    }

    /// Sets a Pod's status like the kubelet of a started pod: phase Running,
    /// `podIP`/`podIPs` = `pod_ip`, every container running and started,
    /// `Ready` and `ContainersReady` = `ready` (the other conditions True),
    /// `hostIP` the Node's InternalIP (when the Node exists).
    pub async fn set_pod_running(
        &self,
        namespace: &str,
        name: &str,
        pod_ip: &str,
        ready: bool,
    ) -> Pod {
        let pods = self.api::<Pod>(namespace);
        let pod = pods
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get pod {namespace}/{name}: {e}"));
        let spec = pod.spec.clone().unwrap_or_default();
        let host_ip = match spec.node_name.as_deref() {
            Some(n) => self
                .api_all::<Node>()
                .get_opt(n)
                .await
                .ok()
                .flatten()
                .and_then(|node| {
                    node.status?
                        .addresses?
                        .into_iter()
                        .find(|a| a.type_ == "InternalIP")
                        .map(|a| a.address)
                }),
            None => None,
        };
        let t = now();
        // Keep the start time and the transition times of unchanged conditions.
        let old = pod.status.clone().unwrap_or_default();
        let started = old
            .start_time
            .as_ref()
            .map(|s| serde_json::to_value(s).unwrap())
            .unwrap_or_else(|| t.clone());
        let cond = |type_: &str, status: bool| {
            let s = if status { "True" } else { "False" };
            let since = old
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == type_ && c.status == s)
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|x| serde_json::to_value(x).unwrap())
                .unwrap_or_else(|| t.clone());
            let mut c = json!({"type": type_, "status": s, "lastTransitionTime": since});
            if !status {
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!("containers with unready status: [app]");
            }
            c
        };
        let containers: Vec<Value> = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": format!("{}@sha256:{:064x}", c.image.clone().unwrap_or_default(), i + 1),
                    "containerID": format!("containerd://{:064x}", i + 1),
                    "ready": ready,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                })
            })
            .collect();
        let mut status = json!({
            "phase": "Running",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": started,
            "conditions": [
                cond("PodReadyToStartContainers", true),
                cond("Initialized", true),
                cond("Ready", ready),
                cond("ContainersReady", ready),
                cond("PodScheduled", true),
            ],
            "containerStatuses": containers,
        });
        if let Some(ip) = host_ip {
            status["hostIP"] = json!(ip);
            status["hostIPs"] = json!([{"ip": ip}]);
        }
        self.set_pod_status(namespace, name, status).await
    }

    /// Flips a Running pod's readiness, keeping its IP.
    pub async fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Pod {
        let pod = self
            .api::<Pod>(namespace)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get pod {namespace}/{name}: {e}"));
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .unwrap_or_else(|| panic!("pod {namespace}/{name} has no IP: set_pod_running first"));
        self.set_pod_running(namespace, name, &ip, ready).await
    }

    /// Merges `status` (a PodStatus as JSON) into the pod's status
    /// subresource (a JSON merge patch: lists given replace the old ones).
    pub async fn set_pod_status(&self, namespace: &str, name: &str, status: Value) -> Pod {
        self.api::<Pod>(namespace)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch pod {namespace}/{name} status: {e}"))
    }

    /// Deletes a pod with a grace period: with no kubelet to finish the job a
    /// grace period > 0 leaves it Terminating (deletionTimestamp set) until
    /// [`ControlPlane::force_delete_pod`].
    pub async fn delete_pod(&self, namespace: &str, name: &str, grace_seconds: u32) {
        let dp = DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..DeleteParams::default()
        };
        self.api::<Pod>(namespace)
            .delete(name, &dp)
            .await
            .unwrap_or_else(|e| panic!("delete pod {namespace}/{name}: {e}"));
    }

    /// Deletes a pod at once (grace period 0), as a kubelet does at the end.
    pub async fn force_delete_pod(&self, namespace: &str, name: &str) {
        let _ = self
            .api::<Pod>(namespace)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await;
    }

    /// Creates a ClusterIP Service selecting `selector`, one TCP port `http`:
    /// `port` -> `target_port`.
    pub async fn create_service(
        &self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        port: u16,
        target_port: u16,
    ) -> Service {
        let svc: Service = from_json(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "type": "ClusterIP",
                "selector": labels_json(selector),
                "ports": [{"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}],
            },
        }));
        self.api::<Service>(namespace)
            .create(&PostParams::default(), &svc)
            .await
            .unwrap_or_else(|e| panic!("create service {namespace}/{name}: {e}"))
    }

    /// The EndpointSlices of a Service (label `kubernetes.io/service-name`).
    pub async fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<EndpointSlice> {
        self.api::<EndpointSlice>(namespace)
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await
            .unwrap_or_else(|e| panic!("list endpointslices of {namespace}/{service}: {e}"))
            .items
    }

    /// Waits until the Service's EndpointSlices list `ip` with conditions
    /// that satisfy `pred`; returns that endpoint.
    pub async fn wait_endpoint(
        &self,
        namespace: &str,
        service: &str,
        ip: &str,
        timeout: Duration,
        pred: impl Fn(&EndpointView) -> bool,
    ) -> EndpointView {
        let mut last = None;
        let what = format!("an endpoint {ip} of service {namespace}/{service} in the wanted state");
        let start = Instant::now();
        loop {
            let slices = self.endpoint_slices(namespace, service).await;
            let ep = endpoint_for_ip(&slices, ip);
            if let Some(ep) = ep.as_ref().filter(|e| pred(e)) {
                return ep.clone();
            }
            last = ep.or(last);
            if start.elapsed() > timeout {
                panic!("k8s: timed out after {timeout:?} waiting for {what}; last seen: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Server-side applies one typed object (field manager `lameduck-tests`).
    pub async fn apply<K>(&self, api: &Api<K>, obj: &K) -> K
    where
        K: kube::Resource + Clone + serde::Serialize + DeserializeOwned + std::fmt::Debug,
    {
        let name = obj.meta().name.clone().expect("object has a name");
        api.patch(&name, &field_manager(), &Patch::Apply(obj))
            .await
            .unwrap_or_else(|e| panic!("apply {name}: {e}"))
    }
}
