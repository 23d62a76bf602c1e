//! The Kubernetes-aware drain against a real control plane (tests/k8s: etcd,
//! kube-apiserver, kube-controller-manager on loopback). lameduck runs as a
//! process with the kubeconfig of the ServiceAccount that deploy/rbac.yaml
//! binds, never as an admin. There is no kubelet: the test plays its part for
//! readiness (lameduck's `/ready` mirrored into the Pod's Ready condition, as
//! the readiness probe would) and for SIGTERM; the real EndpointSlice
//! controller maintains the slices of a real Service.

#[path = "k8s/mod.rs"]
mod k8s;
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use k8s::{ControlPlane, WAIT};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use nix::sys::signal::Signal;
use support::*;

const NS: &str = "shop";
const SA: &str = "lameduck";
const POD: &str = "web-0";
const POD_IP: &str = "10.244.0.5";
const LABELS: [(&str, &str); 1] = [("app", "web")];

/// A control plane with a Node, a Service, the RBAC of deploy/rbac.yaml (as
/// edited by `rbac`), a Pod, and lameduck in front of a real app playing
/// that Pod.
struct Scenario {
    cp: ControlPlane,
    app: TestApp,
    ld: Lameduck,
}

struct Setup<'a> {
    /// The pod matches the Service's selector.
    in_service: bool,
    grace_period_seconds: u32,
    /// Edits deploy/rbac.yaml's text before it is applied.
    rbac: &'a dyn Fn(String) -> String,
    /// --drain-delay: the window's upper bound.
    drain_delay: &'a str,
    extra: &'a [&'a str],
    /// Points lameduck at this kubeconfig instead of the ServiceAccount's.
    kubeconfig: Option<PathBuf>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            in_service: true,
            grace_period_seconds: 30,
            rbac: &|yaml| yaml,
            drain_delay: "20s",
            extra: &[],
            kubeconfig: None,
        }
    }
}

impl Scenario {
    async fn start(setup: Setup<'_>) -> Scenario {
        let cp = ControlPlane::builder()
            .service_account(NS, SA)
            .start()
            .await;
        cp.create_namespace(NS).await;
        cp.create_node("node-a", "10.0.0.10").await;
        cp.create_service(NS, "web", &LABELS, 80, 8000).await;
        let rbac = std::fs::read_to_string(repo_file("deploy/rbac.yaml")).unwrap();
        let rbac = (setup.rbac)(rbac.replace("namespace: default", &format!("namespace: {NS}")));
        cp.apply_yaml(&rbac, NS).await;
        let labels: &[(&str, &str)] = if setup.in_service {
            &LABELS
        } else {
            &[("app", "other")]
        };
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": POD, "namespace": NS, "labels": labels.iter().copied().collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {
                "nodeName": "node-a",
                "serviceAccountName": SA,
                "terminationGracePeriodSeconds": setup.grace_period_seconds,
                "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                "ports": [{"name": "http", "containerPort": 8000}]}],
            },
        }))
        .unwrap();
        pod = cp.create_pod_object(NS, &pod).await;
        assert!(pod.metadata.uid.is_some());
        // Running but not Ready until lameduck says so, as after a kubelet start.
        cp.set_pod_running(NS, POD, POD_IP, false).await;

        let app = TestApp::start().await;
        let upstream = app.addr.to_string();
        let kubeconfig = setup
            .kubeconfig
            .unwrap_or_else(|| cp.kubeconfig_for(NS, SA).to_path_buf());
        let kubeconfig = kubeconfig.to_string_lossy().to_string();
        let mut args = vec![
            "--upstream",
            upstream.as_str(),
            "--kubernetes",
            "on",
            "--drain-delay",
            setup.drain_delay,
            "--endpoint-propagation-margin",
            "500ms",
        ];
        args.extend_from_slice(setup.extra);
        let ld = Lameduck::spawn_with_env(
            &args,
            &[
                ("KUBECONFIG", kubeconfig.as_str()),
                ("POD_NAME", POD),
                ("POD_NAMESPACE", NS),
            ],
        );
        wait_ready(ld.admin_addr(), secs(10)).await;
        Scenario { cp, app, ld }
    }

    /// The Pod Ready and serving in its slice, with no readiness mirror: the
    /// API keeps it Ready whatever lameduck's `/ready` says.
    async fn ready_without_a_kubelet(drain_delay: &str) -> Scenario {
        let s = Scenario::start(Setup {
            drain_delay,
            ..Setup::default()
        })
        .await;
        s.cp.set_pod_ready(NS, POD, true).await;
        s.wait_serving_endpoint().await;
        s
    }

    /// What the kubelet's readiness probe does: `/ready` into the Pod's Ready
    /// condition, until lameduck exits. Returns when the Pod shows Ready.
    fn mirror_readiness(&self) -> tokio::task::JoinHandle<()> {
        let (admin, client) = (self.ld.admin_addr(), self.cp.client());
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, NS);
            let mut last = None;
            loop {
                let ready = match try_get(admin, "/ready").await {
                    Some((status, _)) => status == 200,
                    None => return,
                };
                if last != Some(ready) {
                    let status = serde_json::json!({"status": {"conditions": [
                        {"type": "Ready", "status": if ready { "True" } else { "False" }},
                        {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
                    ]}});
                    let patch = kube::api::Patch::Strategic(status);
                    if pods
                        .patch_status(POD, &kube::api::PatchParams::default(), &patch)
                        .await
                        .is_ok()
                    {
                        last = Some(ready);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    async fn wait_serving_endpoint(&self) {
        self.cp
            .wait_endpoint(NS, "web", POD_IP, WAIT, |e| e.ready && e.serving)
            .await;
    }

    /// `kubectl delete pod --grace-period=N`, then the kubelet's SIGTERM.
    async fn delete_and_terminate(&self, grace: u32) -> SystemTime {
        self.cp.delete_pod(NS, POD, grace).await;
        let pod = self
            .cp
            .api::<Pod>(NS)
            .get(POD)
            .await
            .expect("pod still terminating");
        let deletion = pod
            .metadata
            .deletion_timestamp
            .expect("deletionTimestamp set");
        self.ld.signal(Signal::SIGTERM);
        SystemTime::from(deletion.0)
    }

    async fn events(&self) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.cp.client(), NS);
        events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(POD))
            .collect()
    }

    async fn wait_events(&self, reasons: &[&str]) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.events().await;
            if reasons
                .iter()
                .all(|r| events.iter().any(|e| e.reason.as_deref() == Some(*r)))
            {
                // As `kubectl get events` would list them (docs/kubernetes.md).
                for e in &events {
                    eprintln!(
                        "event: {:<8} {:<17} {}",
                        e.type_.as_deref().unwrap_or(""),
                        e.reason.as_deref().unwrap_or(""),
                        e.note.as_deref().unwrap_or("")
                    );
                }
                return events;
            }
            if Instant::now() > deadline {
                let seen: Vec<_> = events.iter().map(|e| (&e.reason, &e.note)).collect();
                panic!(
                    "Events {reasons:?} not all there after {WAIT:?}; seen {seen:?}; lameduck:\n{}",
                    self.ld.stderr_lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn window_log(&self) -> serde_json::Value {
        self.ld
            .logs_with_message("lame-duck window over; waiting for connections to finish")
            .pop()
            .expect("window-over log line")
    }

    #[track_caller]
    fn assert_window_reason(&self, reason: &str) {
        let window = self.window_log();
        assert_eq!(field_str(&window, "reason"), Some(reason), "{window}");
    }

    #[track_caller]
    fn assert_deadline_source(&self, source: &str) {
        let deadline = self
            .ld
            .logs_with_message("drain deadline")
            .pop()
            .expect("drain deadline log line");
        assert_eq!(field_str(&deadline, "source"), Some(source), "{deadline}");
    }
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn note<'a>(events: &'a [Event], reason: &str) -> &'a str {
    events
        .iter()
        .find(|e| e.reason.as_deref() == Some(reason))
        .and_then(|e| e.note.as_deref())
        .unwrap_or_else(|| panic!("no {reason} Event"))
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn deadline_metric(admin: SocketAddr, source: &str) -> f64 {
    metric(
        admin,
        &format!("lameduck_drain_deadline_timestamp_seconds{{source=\"{source}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ends_when_the_endpointslice_stops_serving_and_every_step_is_an_event() {
    let mut s = Scenario::start(Setup::default()).await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    let (status, _) = get(s.ld.proxy_addr(), "/").await;
    assert_eq!(status, 200);

    let started = Instant::now();
    let deletion = s.delete_and_terminate(30).await;
    let exit = s.ld.wait_exit(secs(15)).await;
    let took = started.elapsed();
    assert_eq!(exit.code(), Some(0), "exit {exit:?}");
    // Well before the 20 s --drain-delay: readiness fails, the kubelet (here:
    // the mirror) marks the pod unready, the controller stops serving it.
    assert!(took < secs(8), "the drain took {took:?}");
    s.assert_window_reason("endpoints_removed");

    // The deadline is the deletionTimestamp minus the 2 s default margin.
    s.assert_deadline_source("deletion_timestamp");

    let events = s
        .wait_events(&["DrainStarted", "EndpointsRemoved", "DrainCompleted"])
        .await;
    let started_note = note(&events, "DrainStarted");
    assert!(started_note.starts_with("SIGTERM"), "{started_note}");
    assert!(
        started_note.contains("deletion_timestamp"),
        "{started_note}"
    );
    let expected_deadline = humantime::format_rfc3339_millis(deletion - secs(2)).to_string();
    assert!(
        started_note.contains(&expected_deadline),
        "{started_note} vs {expected_deadline}"
    );
    assert!(note(&events, "EndpointsRemoved").contains("after the drain started"));
    assert!(note(&events, "DrainCompleted").contains("drained in"));
    assert!(
        events.iter().all(|e| e.type_.as_deref() == Some("Normal")),
        "{events:?}"
    );
    assert!(s.app.last_request("/").is_some());
    mirror.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_shorter_than_the_spec_sets_the_deadline_and_what_is_left_is_forced() {
    let mut s = Scenario::start(Setup::default()).await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    // A request that outlives the 5 s grace period.
    let proxy = s.ld.proxy_addr();
    let long = tokio::spawn(async move { try_get(proxy, "/slow?ms=20000").await });
    wait_metric(
        s.ld.admin_addr(),
        "lameduck_requests_in_flight",
        |v| v >= 1.0,
        secs(5),
    )
    .await;

    let deletion = s.delete_and_terminate(5).await;
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(3), "forced at the deadline: {exit:?}");
    let exited_at = SystemTime::now();
    // At deletionTimestamp - 2 s, i.e. before the kubelet's SIGKILL.
    assert!(exited_at < deletion, "exited after SIGKILL time");
    assert!(
        exited_at + secs(4) > deletion,
        "exited long before the deadline"
    );
    s.assert_deadline_source("deletion_timestamp");
    let events = s.wait_events(&["DrainStarted", "DrainForced"]).await;
    let forced = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("DrainForced"))
        .unwrap();
    assert_eq!(forced.type_.as_deref(), Some("Warning"));
    let forced_note = forced.note.as_deref().unwrap_or_default();
    assert!(
        forced_note.contains("1 connections closed forcibly"),
        "{forced_note}"
    );
    assert!(forced_note.contains("deletion_timestamp"), "{forced_note}");
    let _ = long.await;
    mirror.abort();
}

/// A kubelet busy with the pod starts stopping it seconds after the delete
/// request, and counts the grace period from then: the deadline follows the
/// kubelet's clock (`deletionGracePeriodSeconds` from the SIGTERM) rather
/// than the earlier deletionTimestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_late_to_stop_the_pod_moves_the_deadline_to_its_own_clock() {
    let mut s = Scenario::start(Setup::default()).await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    s.cp.delete_pod(NS, POD, 8).await;
    let pod = s.cp.api::<Pod>(NS).get(POD).await.expect("pod terminating");
    let deletion = SystemTime::from(
        pod.metadata
            .deletion_timestamp
            .expect("deletionTimestamp")
            .0,
    );
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(8));
    // The kubelet acts 3 s late.
    tokio::time::sleep(secs(3)).await;
    let signalled = SystemTime::now();
    s.ld.signal(Signal::SIGTERM);
    let deadline = wait_metric(
        s.ld.admin_addr(),
        "lameduck_drain_deadline_timestamp_seconds{source=\"deletion_grace_period\"}",
        |v| v > 0.0,
        secs(5),
    )
    .await;
    // 8 s from the SIGTERM, less the hook allowance (0.5 s) and the 2 s margin;
    // later than the deletionTimestamp's own deadline, still before the
    // kubelet's SIGKILL (SIGTERM + 8 s).
    let expected = unix(signalled) + 8.0 - 0.5 - 2.0;
    assert!(
        (deadline - expected).abs() < 0.5,
        "deadline {deadline} vs {expected}"
    );
    assert!(
        deadline > unix(deletion) - 2.0 + 1.0,
        "{deadline} vs {deletion:?}"
    );
    assert_eq!(
        deadline_metric(s.ld.admin_addr(), "deletion_timestamp").await,
        0.0
    );
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(0), "exit {exit:?}");
    s.assert_deadline_source("deletion_grace_period");
    let events = s.wait_events(&["DrainStarted", "DrainCompleted"]).await;
    assert!(
        note(&events, "DrainStarted").contains("(deletion_grace_period)"),
        "{events:?}"
    );
    mirror.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_from_the_admin_port_the_deadline_comes_from_the_grace_period() {
    let s = Scenario::start(Setup {
        grace_period_seconds: 40,
        ..Setup::default()
    })
    .await;
    let before = SystemTime::now();
    let (status, _) = post(s.ld.admin_addr(), "/drain").await;
    assert_eq!(status, 202);
    let after_ms = wait_metric(
        s.ld.admin_addr(),
        "lameduck_drain_deadline_timestamp_seconds{source=\"grace_period\"}",
        |v| v > 0.0,
        secs(5),
    )
    .await;
    // 40 s from the drain's start, minus the 2 s margin.
    let expected = unix(before) + 38.0;
    assert!(
        (after_ms - expected).abs() < 2.0,
        "deadline {after_ms} vs {expected}"
    );
    assert_eq!(
        deadline_metric(s.ld.admin_addr(), "drain_timeout").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ends_at_the_delay_when_the_slice_never_changes() {
    // No readiness mirror: the API keeps the pod Ready, as a kubelet that
    // never probes again would.
    let mut s = Scenario::ready_without_a_kubelet("3s").await;
    let started = Instant::now();
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(10)).await;
    assert_eq!(exit.code(), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < secs(6),
        "{took:?}"
    );
    s.assert_window_reason("delay_elapsed");
    let events = s.wait_events(&["DrainStarted", "DrainCompleted"]).await;
    assert!(
        !events
            .iter()
            .any(|e| e.reason.as_deref() == Some("EndpointsRemoved"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_in_no_service_waits_only_the_margin() {
    let mut s = Scenario::start(Setup {
        in_service: false,
        ..Setup::default()
    })
    .await;
    let started = Instant::now();
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(10)).await;
    assert_eq!(exit.code(), Some(0));
    assert!(started.elapsed() < secs(4), "{:?}", started.elapsed());
    s.assert_window_reason("no_endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_list_on_endpointslices_the_fixed_window_applies_and_says_why() {
    let mut s = Scenario::start(Setup {
        rbac: &|yaml| yaml.replace(r#"verbs: ["list", "watch"]"#, r#"verbs: ["watch"]"#),
        drain_delay: "3s",
        ..Setup::default()
    })
    .await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    let started = Instant::now();
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(10)).await;
    assert_eq!(exit.code(), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < secs(6),
        "{took:?}"
    );
    s.assert_window_reason("api_unavailable");
    let warned = s.ld.logs().into_iter().any(|l| {
        message(&l).contains("EndpointSlices unreadable")
            && field_str(&l, "error").is_some_and(|e| e.contains("403") || e.contains("forbidden"))
    });
    assert!(
        warned,
        "no warning naming the 403: {:?}",
        s.ld.stderr_lines()
    );
    mirror.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rbac_of_deploy_is_enough_and_without_events_the_drain_still_completes() {
    // deploy/rbac.yaml as is: every call succeeds (checked by the errors
    // counter staying at zero), then the same with `create` on events removed.
    let mut s = Scenario::start(Setup::default()).await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(0));
    let errors: Vec<_> =
        s.ld.stderr_lines()
            .into_iter()
            .filter(|l| l.contains("\"level\":\"WARN\""))
            .collect();
    assert!(
        errors.is_empty(),
        "warnings with deploy/rbac.yaml: {errors:?}"
    );
    s.wait_events(&["DrainStarted", "EndpointsRemoved", "DrainCompleted"])
        .await;
    mirror.abort();

    let mut s = Scenario::start(Setup {
        rbac: &|yaml| yaml.replace(r#"verbs: ["create", "patch"]"#, r#"verbs: ["patch"]"#),
        ..Setup::default()
    })
    .await;
    let mirror = s.mirror_readiness();
    s.wait_serving_endpoint().await;
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(0));
    s.assert_window_reason("endpoints_removed");
    assert!(s.events().await.is_empty());
    assert!(
        s.ld.logs_with_message("Kubernetes Event not published")
            .len()
            >= 3,
        "{:?}",
        s.ld.stderr_lines()
    );
    mirror.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_stopping_mid_drain_leaves_the_fixed_window() {
    let mut s = Scenario::ready_without_a_kubelet("4s").await;
    let started = Instant::now();
    s.ld.signal(Signal::SIGTERM);
    // Once the watch is up, the API server goes away.
    wait_metric(
        s.ld.admin_addr(),
        "lameduck_endpoints_serving",
        |v| v >= 1.0,
        secs(5),
    )
    .await;
    let (_, pid) =
        s.cp.pids()
            .into_iter()
            .find(|(name, _)| *name == "kube-apiserver")
            .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(0), "{:?}", s.ld.stderr_lines());
    let took = started.elapsed();
    // The window's upper bound holds, and the final Event's bounded attempt
    // costs at most the API timeout.
    assert!(
        took >= Duration::from_millis(3900) && took < secs(8),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_at_start_up_costs_nothing() {
    // A kubeconfig whose server refuses connections.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: https://{}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: gone\n    user: u\ncurrent-context: c\n",
            closed_port()
        ),
    )
    .unwrap();
    let mut s = Scenario::start(Setup {
        kubeconfig: Some(kubeconfig),
        drain_delay: "2s",
        ..Setup::default()
    })
    .await;
    s.ld.wait_for_log(
        |l| message(l).starts_with("own Pod unreadable at start-up"),
        secs(5),
    )
    .await;
    let (status, _) = get(s.ld.proxy_addr(), "/").await;
    assert_eq!(status, 200);
    let drain = Instant::now();
    s.ld.signal(Signal::SIGTERM);
    let exit = s.ld.wait_exit(secs(15)).await;
    assert_eq!(exit.code(), Some(0));
    let took = drain.elapsed();
    assert!(took < secs(7), "{took:?}");
    let window = s.window_log();
    assert!(
        matches!(
            field_str(&window, "reason"),
            Some("api_unavailable" | "delay_elapsed")
        ),
        "{window}"
    );
    s.assert_deadline_source("drain_timeout");
}
