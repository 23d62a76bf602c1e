//! Workloads in the lab and what happens to them when pods stop: the
//! Deployments the scenarios roll (chart-rendered lameduck, the bare app, the
//! bare app with `preStop: sleep`), a watch that records every pod's last
//! status (the exit codes survive the pod), and the drain Events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;

use super::Lab;

pub const NAMESPACE: &str = "default";

/// The chart's Deployment + Service + RBAC, as `helm template` renders it,
/// named `name`, with the lab's image and `imagePullPolicy: Never`.
pub fn chart(name: &str, replicas: u32, native_sidecar: bool, extra: &[&str]) -> String {
    let helm = helm();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(helm);
    cmd.args(["template", name])
        .arg(root.join("charts/lameduck"))
        .args(["--namespace", NAMESPACE])
        .args(["--set", &format!("fullnameOverride={name}")])
        .args(["--set", &format!("replicaCount={replicas}")])
        .args(["--set", "image.repository=docker.io/library/lameduck"])
        .args(["--set", "image.pullPolicy=Never"])
        .args(["--set", &format!("nativeSidecar={native_sidecar}")]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn helm() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tools.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("helm")
        .output()
        .expect("run deploy/tools.sh helm");
    assert!(out.status.success(), "deploy/tools.sh helm failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The demo app alone (listening on the pod IP, readiness on `/healthz`),
/// optionally with the usual workaround `preStop: sleep`.
pub fn bare_app(name: &str, replicas: u32, prestop_sleep: Option<u32>) -> String {
    let lifecycle = prestop_sleep
        .map(|s| format!("          lifecycle:\n            preStop:\n              sleep:\n                seconds: {s}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      terminationGracePeriodSeconds: 30
      automountServiceAccountToken: false
      securityContext: {{runAsNonRoot: true, runAsUser: 65532}}
      containers:
        - name: app
          image: docker.io/library/lameduck:0.1.0
          imagePullPolicy: Never
          args: ["demo-app", "--listen", "0.0.0.0:8080"]
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe:
            httpGet: {{path: /healthz, port: http}}
            periodSeconds: 1
{lifecycle}---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

/// The last status seen of a pod (kept after it is gone).
#[derive(Debug, Clone, Default)]
pub struct PodRecord {
    /// The first deletionTimestamp seen: when the grace period ends.
    pub deletion: Option<SystemTime>,
    /// Exit codes of terminated containers (init/sidecar ones too), by name.
    pub exits: BTreeMap<String, i32>,
    pub deleted: bool,
}

/// Watches the pods of the namespace and keeps each one's last status.
pub struct PodLog {
    records: Arc<Mutex<BTreeMap<String, PodRecord>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodLog {
    pub fn start(lab: &Lab) -> PodLog {
        let api: Api<Pod> = Api::namespaced(lab.cp().client(), NAMESPACE);
        let records: Arc<Mutex<BTreeMap<String, PodRecord>>> = Arc::default();
        let r = records.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let (pod, deleted) = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                    Ok(watcher::Event::Delete(p)) => (p, true),
                    _ => continue,
                };
                let Some(name) = pod.metadata.name.clone() else {
                    continue;
                };
                let mut map = r.lock().unwrap_or_else(|p| p.into_inner());
                let rec = map.entry(name).or_default();
                rec.deleted |= deleted;
                // The first one: the kubelet's final delete (grace 0) moves it
                // to the moment the pod is removed.
                if let (None, Some(t)) = (rec.deletion, &pod.metadata.deletion_timestamp) {
                    rec.deletion = Some(SystemTime::from(t.0));
                }
                let status = pod.status.as_ref();
                let all = status
                    .and_then(|s| s.container_statuses.clone())
                    .into_iter()
                    .flatten()
                    .chain(
                        status
                            .and_then(|s| s.init_container_statuses.clone())
                            .into_iter()
                            .flatten(),
                    );
                for c in all {
                    if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
                        rec.exits.insert(c.name.clone(), t.exit_code);
                    }
                }
            }
        });
        PodLog { records, task }
    }

    pub fn get(&self, pod: &str) -> Option<PodRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pod)
            .cloned()
    }
}

impl Drop for PodLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Names of the Deployment's pods that are not terminating.
pub async fn live_pods(lab: &Lab, selector: &str) -> Vec<String> {
    let api: Api<Pod> = Api::namespaced(lab.cp().client(), NAMESPACE);
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods");
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// `replicas` hostile pods (`tests/lab/flood.c`, Deployment `hostile`), each
/// holding as many `GET /drained?timeout=10m` waiters as it can get, up to
/// `per_target`, on the admin port of every address in `targets`.
pub fn hostile_pods(image: &str, replicas: u32, per_target: u32, targets: &[String]) -> String {
    let args: Vec<String> = ["9901".to_owned(), per_target.to_string()]
        .into_iter()
        .chain(targets.iter().cloned())
        .map(|a| format!("{a:?}"))
        .collect();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: hostile
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: hostile}}
  template:
    metadata:
      labels: {{app: hostile}}
    spec:
      terminationGracePeriodSeconds: 1
      automountServiceAccountToken: false
      securityContext: {{runAsNonRoot: true, runAsUser: 65534}}
      containers:
        - name: flood
          image: {image}
          imagePullPolicy: Never
          args: [{args}]
"#,
        args = args.join(", ")
    )
}

/// What each hostile pod last said it holds on `target`, summed:
/// (held, closed by the target).
pub async fn hostile_holdings(lab: &Lab, target: &str) -> (u64, u64) {
    let (mut held, mut closed) = (0, 0);
    for pod in live_pods(lab, "app=hostile").await {
        let log = kubectl(lab, &["logs", &format!("pod/{pod}")]).await;
        let prefix = format!("flood {target} held=");
        if let Some(last) = log.lines().rev().find_map(|l| l.strip_prefix(&prefix)) {
            let (h, c) = last.split_once(" closed=").unwrap_or((last, "0"));
            held += h.parse::<u64>().unwrap_or(0);
            closed += c.parse::<u64>().unwrap_or(0);
        }
    }
    (held, closed)
}

/// The Service's ClusterIP:port.
pub async fn cluster_ip(lab: &Lab, service: &str) -> SocketAddr {
    let api: Api<Service> = Api::namespaced(lab.cp().client(), NAMESPACE);
    let svc = api.get(service).await.expect("get service");
    let spec = svc.spec.expect("service spec");
    let ip = spec.cluster_ip.expect("clusterIP");
    let port = spec
        .ports
        .and_then(|p| p.first().map(|p| p.port))
        .unwrap_or(80);
    format!("{ip}:{port}").parse().expect("ClusterIP:port")
}

/// Waits until the Deployment is fully rolled out: every replica updated,
/// available, and no old one left in its status (what `kubectl rollout
/// status` waits for).
pub async fn wait_rolled_out(lab: &Lab, name: &str, within: Duration) {
    let api: Api<Deployment> = Api::namespaced(lab.cp().client(), NAMESPACE);
    let deadline = Instant::now() + within;
    loop {
        let d = api.get(name).await.expect("get deployment");
        let want = d.spec.replicas.unwrap_or(1);
        let gen_ = d.metadata.generation.unwrap_or(0);
        if let Some(s) = &d.status {
            if s.observed_generation.unwrap_or(0) >= gen_
                && s.updated_replicas.unwrap_or(0) == want
                && s.replicas.unwrap_or(0) == want
                && s.available_replicas.unwrap_or(0) == want
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "deployment {name} not rolled out within {within:?}: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until none of `pods` exists any more.
pub async fn wait_gone(lab: &Lab, pods: &[String], within: Duration) {
    let api: Api<Pod> = Api::namespaced(lab.cp().client(), NAMESPACE);
    let deadline = Instant::now() + within;
    for p in pods {
        loop {
            if matches!(api.get_opt(p).await, Ok(None)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pod {p} still exists after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `kubectl <args>` on the lab's runtime (a child process of a lab thread is
/// in the lab's netns).
pub async fn kubectl(lab: &Lab, args: &[&str]) -> String {
    let out = tokio::process::Command::new(lab.kubectl_path())
        .args(args)
        .env("KUBECONFIG", lab.cp().admin_kubeconfig())
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The drain Events of a pod: reason → note.
pub async fn drain_events(lab: &Lab, pod: &str) -> BTreeMap<String, String> {
    let api: Api<Event> = Api::namespaced(lab.cp().client(), NAMESPACE);
    let list = api.list(&ListParams::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
        .filter_map(|e| Some((e.reason?, e.note.unwrap_or_default())))
        .collect()
}

/// Waits (bounded) for the drain Events of a pod to be listable: lameduck
/// publishes them in the background, the last one before it exits.
pub async fn wait_drain_events(
    lab: &Lab,
    pod: &str,
    reasons: &[&str],
    within: Duration,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let ev = drain_events(lab, pod).await;
        if reasons.iter().all(|r| ev.contains_key(*r)) || Instant::now() > deadline {
            return ev;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The deadline and its source from a `DrainStarted` note
/// ("...; deadline 2026-12-01T13:40:05.123Z (deletion_timestamp)").
pub fn deadline_of(note: &str) -> Option<(SystemTime, String)> {
    let rest = note.rsplit_once("deadline ")?.1;
    let (at, source) = rest.split_once(' ')?;
    let at = humantime::parse_rfc3339(at).ok()?;
    Some((
        at,
        source.trim_matches(|c| c == '(' || c == ')').to_string(),
    ))
}

/// The chart's rendered Deployment `name` as a Job with the same pod
/// template (`restartPolicy: Never`); the other documents are kept.
pub fn deployment_to_job(yaml: &str, name: &str) -> String {
    let mut out = String::new();
    for doc in yaml.split("\n---") {
        if !doc.contains("\nkind: Deployment") {
            out.push_str(doc);
            out.push_str("\n---");
            continue;
        }
        let mut skipping = false;
        for line in doc.lines() {
            if line == "apiVersion: apps/v1" {
                out.push_str("apiVersion: batch/v1\n");
                continue;
            }
            if line == "kind: Deployment" {
                out.push_str("kind: Job\n");
                continue;
            }
            // replicas, selector and strategy: not Job fields.
            if line.starts_with("  replicas:")
                || line.starts_with("  selector:")
                || line.starts_with("  strategy:")
            {
                skipping = true;
                continue;
            }
            if skipping && line.starts_with("    ") {
                continue;
            }
            skipping = false;
            if line == "  template:" {
                out.push_str("  backoffLimit: 0\n");
            }
            out.push_str(line);
            out.push('\n');
            if line == "    spec:" {
                out.push_str("      restartPolicy: Never\n");
            }
        }
        out.push_str("\n---");
    }
    assert!(
        out.contains("kind: Job"),
        "no Deployment {name} in the chart's output"
    );
    out
}

/// Follows the logs of every container of `pod` into
/// `$TMPDIR/lameduck-lab-logs/<pod>.log` (kept after the lab, for a
/// post-mortem of a failed drain); the follower ends with the pod.
pub fn follow_logs(lab: &Lab, pod: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("lameduck-lab-logs");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{pod}.log"));
    if let Ok(file) = std::fs::File::create(&path) {
        let _ = tokio::process::Command::new(lab.kubectl_path())
            .args(["logs", "-f", "--all-containers", "--prefix", "--timestamps"])
            .arg(format!("pod/{pod}"))
            .env("KUBECONFIG", lab.cp().admin_kubeconfig())
            .stdout(file)
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false)
            .spawn();
    }
    path
}
