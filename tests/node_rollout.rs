//! Scenarios on a real node (tests/lab): the kubelet stops pods, kube-proxy
//! routes a Service's ClusterIP, and the load generator inside the lab
//! counts every failed request.
//!
//! `cargo test --test node_rollout -- --nocapture` prints the side-by-side
//! table (docs/kubernetes.md, "Measured on a real node").

#[path = "lab/mod.rs"]
mod lab;

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use lab::Lab;
use lab::load::{Counts, Kind, Load};
use lab::rollout::{self, PodLog};

/// Replicas of every Deployment rolled.
const REPLICAS: u32 = 3;
/// Clients per load kind.
const CLIENTS: usize = 16;
/// A rollout (restart → last old pod gone) must finish within this.
const ROLLOUT_BOUND: Duration = Duration::from_secs(120);
/// Hostile pods in the admin-flood scenario, and the waiters each tries to
/// hold on every lameduck pod (4 x 64: four times the per-peer cap).
const HOSTILE_PODS: u32 = 4;
const FLOOD_PER_TARGET: u32 = 64;

/// The chart's --deadline-margin with the native sidecar.
const NATIVE_MARGIN: Duration = Duration::from_secs(1);

#[test]
fn lab_starts_runs_a_pod_and_leaves_nothing() {
    lab::run(async |lab| {
        lab.kubectl(&[
            "run",
            "probe",
            "--image",
            lab::LAMEDUCK_IMAGE,
            "--image-pull-policy=Never",
            "--",
            "demo-app",
            "--listen",
            "0.0.0.0:8080",
        ]);
        lab.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "pod/probe",
            "--timeout=60s",
        ]);
        eprintln!(
            "lab: start {:.1?}, RSS with one pod {} MiB",
            lab.started_in,
            lab.rss_kib() / 1024
        );
    });
}

/// What one rollout under load did.
struct Rolled {
    counts: Counts,
    /// `rollout restart` → fully rolled out.
    rollout: Duration,
    /// `rollout restart` → the last old pod gone from the API.
    gone: Duration,
    old: Vec<String>,
}

async fn rollout_under_load(lab: &Lab, deployment: &str, selector: &str, kind: Kind) -> Rolled {
    let addr = rollout::cluster_ip(lab, deployment).await;
    let old = rollout::live_pods(lab, selector).await;
    assert_eq!(
        old.len(),
        REPLICAS as usize,
        "pods of {deployment}: {old:?}"
    );
    Load::wait_until_served(addr, Duration::from_secs(20)).await;
    let load = Load::start(addr, kind, CLIENTS, ROLLOUT_BOUND + Duration::from_secs(30));
    // Warm: every client has been served before the rollout starts.
    let warm = Instant::now() + Duration::from_secs(20);
    while load.counts().ok < (CLIENTS as u64) * 20 {
        assert!(
            Instant::now() < warm,
            "{deployment} ({kind}) through {addr}: no load warm-up: {}",
            load.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = load.counts();
    assert_eq!(
        before.failed(),
        0,
        "{deployment} ({kind}) failed before the rollout: {before}"
    );
    let t0 = Instant::now();
    rollout::kubectl(
        lab,
        &["rollout", "restart", &format!("deployment/{deployment}")],
    )
    .await;
    rollout::wait_rolled_out(lab, deployment, ROLLOUT_BOUND).await;
    let rollout = t0.elapsed();
    rollout::wait_gone(lab, &old, ROLLOUT_BOUND).await;
    let gone = t0.elapsed();
    // kube-proxy applies at most once a second: keep going past its last
    // change so that requests to the new endpoints count too.
    let settle = Instant::now() + Duration::from_millis(1500);
    let ok_then = load.counts().ok;
    while Instant::now() < settle || load.counts().ok < ok_then + CLIENTS as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = load.stop().await;
    Rolled {
        counts,
        rollout,
        gone,
        old,
    }
}

/// A stopped pod's lameduck exited 0 (its log is printed if not) and
/// published `DrainStarted`, `EndpointsRemoved` and `DrainCompleted`; the
/// pod's drain Events, reason → note.
async fn exited_0_with_drain_events(
    lab: &Lab,
    pods: &PodLog,
    pod: &str,
) -> std::collections::BTreeMap<String, String> {
    let rec = pods.get(pod).unwrap_or_default();
    if rec.exits.get("lameduck") != Some(&0) {
        let log = std::env::temp_dir().join(format!("lameduck-lab-logs/{pod}.log"));
        if let Ok(text) = std::fs::read_to_string(&log) {
            eprintln!("----- {} -----\n{text}", log.display());
        }
    }
    assert_eq!(
        rec.exits.get("lameduck"),
        Some(&0),
        "pod {pod}: lameduck's exit (container statuses seen: {:?})",
        rec.exits
    );
    const DRAINED: [&str; 3] = ["DrainStarted", "EndpointsRemoved", "DrainCompleted"];
    let ev = rollout::wait_drain_events(lab, pod, &DRAINED, Duration::from_secs(10)).await;
    for reason in DRAINED {
        assert!(
            ev.contains_key(reason),
            "pod {pod}: no {reason} Event: {ev:?}"
        );
    }
    ev
}

/// lameduck's side of each old pod with the native sidecar: it exited 0,
/// and the drain Events tell that the window ended on the EndpointSlices,
/// every hook returned cleanly and the deadline stayed within the pod's
/// grace period.
async fn assert_lameduck_drained(lab: &Lab, pods: &PodLog, old: &[String]) {
    for pod in old {
        let ev = exited_0_with_drain_events(lab, pods, pod).await;
        let rec = pods.get(pod).unwrap_or_default();
        assert!(!ev.contains_key("DrainForced"), "pod {pod}: {ev:?}");
        // The kubelet's record of the hooks: the app's GET /drained and the
        // sidecar's `lameduck drain --wait` both returned cleanly.
        assert!(!ev.contains_key("FailedPreStopHook"), "pod {pod}: {ev:?}");
        // EndpointsRemoved is published only when the window ended because no
        // slice routed to the pod (not the delay, not an API failure).
        let (deadline, source) = rollout::deadline_of(&ev["DrainStarted"])
            .unwrap_or_else(|| panic!("pod {pod}: no deadline in {:?}", ev["DrainStarted"]));
        let deletion = rec
            .deletion
            .unwrap_or_else(|| panic!("pod {pod}: no deletionTimestamp seen"));
        // From the deletionTimestamp exactly when that is the binding bound;
        // later when the kubelet began stopping the pod late and so kills
        // late (its own clock, `deletion_grace_period`). That this was still
        // before SIGKILL is the clean exits above: lameduck 0, no failed hook.
        match source.as_str() {
            "deletion_timestamp" => {
                assert_eq!(deadline, deletion - NATIVE_MARGIN, "pod {pod}")
            }
            "deletion_grace_period" => assert!(
                deadline > deletion - NATIVE_MARGIN,
                "pod {pod}: deadline {deadline:?} vs deletionTimestamp {deletion:?}"
            ),
            // --drain-timeout, when it is the shorter bound.
            _ => assert!(
                deadline <= deletion - NATIVE_MARGIN,
                "pod {pod}: deadline {deadline:?} past deletionTimestamp {deletion:?} - margin ({source})"
            ),
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[test]
fn rollout_restart_behind_lameduck_loses_no_request_side_by_side() {
    lab::run(async |lab| {
        let pods = PodLog::start(lab);
        let mut yaml = rollout::chart("ld", REPLICAS, true, &[]);
        yaml.push_str("\n---\n");
        yaml.push_str(&rollout::bare_app("bare", REPLICAS, None));
        yaml.push_str("---\n");
        yaml.push_str(&rollout::bare_app("sleep5", REPLICAS, Some(5)));
        lab.apply_yaml(&yaml);
        for d in ["ld", "bare", "sleep5"] {
            rollout::wait_rolled_out(lab, d, Duration::from_secs(90)).await;
        }
        eprintln!("lab: 9 pods Ready; RSS {} MiB", lab.rss_kib() / 1024);

        let variants = [
            ("(a) app alone", "bare", "app=bare"),
            ("(b) preStop sleep 5", "sleep5", "app=sleep5"),
            ("(c) behind lameduck", "ld", "app.kubernetes.io/instance=ld"),
        ];
        let mut table = String::new();
        let _ = writeln!(
            table,
            "| variant | load ({CLIENTS} clients) | requests | failed | refused | reset | EOF | timeout | 5xx | unsent (h2, retryable) | rollout | last old pod gone |"
        );
        let _ = writeln!(
            table,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut lameduck_failed = Vec::new();
        for kind in [Kind::KeepAlive, Kind::PerRequest, Kind::Http2] {
            for (label, deployment, selector) in variants {
                let r = rollout_under_load(lab, deployment, selector, kind).await;
                let c = r.counts;
                eprintln!(
                    "{label}, {kind}: {c}; rollout {}, old pods gone {}",
                    secs(r.rollout),
                    secs(r.gone)
                );
                let _ = writeln!(
                    table,
                    "| {label} | {kind} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.ok + c.failed() + c.unsent,
                    c.failed(),
                    c.refused,
                    c.reset,
                    c.eof,
                    c.timeout,
                    c.status_5xx,
                    c.unsent,
                    secs(r.rollout),
                    secs(r.gone)
                );
                if deployment == "ld" {
                    if c.failed() != 0 {
                        lameduck_failed.push(format!("{kind}: {c}"));
                    }
                    assert_lameduck_drained(lab, &pods, &r.old).await;
                }
            }
        }
        eprintln!("\n{table}");
        eprintln!(
            "machine: {} cores, {}; lab RSS now {} MiB",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            lab.rss_kib() / 1024
        );
        let _ = SystemTime::now();
        assert!(
            lameduck_failed.is_empty(),
            "requests failed behind lameduck: {lameduck_failed:?}"
        );
    });
}

/// Waits for one pod to be stopped by whatever the test did, and checks
/// lameduck's side of it.
async fn stopped_cleanly(lab: &Lab, pods: &PodLog, stopped: &[String]) {
    rollout::wait_gone(lab, stopped, ROLLOUT_BOUND).await;
    assert_lameduck_drained(lab, pods, stopped).await;
}

/// Every way a pod is stopped in practice, one after another under the
/// same keep-alive load: `kubectl delete pod`, a scale-down, a delete with
/// `--grace-period=5` (the deadline then comes from the deletionTimestamp),
/// an eviction through the Eviction API; and a rollout of the classic
/// (non-native) sidecar layout.
#[test]
fn pod_deletion_scale_down_short_grace_and_eviction_lose_no_request() {
    lab::run(async |lab| {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, EvictParams};

        let pods = PodLog::start(lab);
        lab.apply_yaml(&rollout::chart("ld", REPLICAS, true, &[]));
        rollout::wait_rolled_out(lab, "ld", Duration::from_secs(90)).await;
        let sel = "app.kubernetes.io/instance=ld";
        let addr = rollout::cluster_ip(lab, "ld").await;
        Load::wait_until_served(addr, Duration::from_secs(20)).await;
        let load = Load::start(addr, Kind::KeepAlive, CLIENTS, Duration::from_secs(400));
        let mut steps = Vec::new();

        // kubectl delete pod
        for p in rollout::live_pods(lab, sel).await {
            rollout::follow_logs(lab, &p);
        }
        let victim = rollout::live_pods(lab, sel).await.remove(0);
        let t = Instant::now();
        rollout::kubectl(lab, &["delete", "pod", &victim, "--wait=false"]).await;
        stopped_cleanly(lab, &pods, std::slice::from_ref(&victim)).await;
        rollout::wait_rolled_out(lab, "ld", ROLLOUT_BOUND).await;
        steps.push(("kubectl delete pod", t.elapsed(), load.counts()));

        // kubectl scale --replicas=1
        let before = rollout::live_pods(lab, sel).await;
        let t = Instant::now();
        rollout::kubectl(lab, &["scale", "deployment/ld", "--replicas=1"]).await;
        rollout::wait_rolled_out(lab, "ld", ROLLOUT_BOUND).await;
        let after = rollout::live_pods(lab, sel).await;
        let removed: Vec<String> = before.into_iter().filter(|p| !after.contains(p)).collect();
        assert_eq!(removed.len(), 2, "scale to 1 removed {removed:?}");
        stopped_cleanly(lab, &pods, &removed).await;
        steps.push(("kubectl scale --replicas=1", t.elapsed(), load.counts()));
        rollout::kubectl(
            lab,
            &["scale", "deployment/ld", &format!("--replicas={REPLICAS}")],
        )
        .await;
        rollout::wait_rolled_out(lab, "ld", ROLLOUT_BOUND).await;

        // kubectl delete pod --grace-period=5: shorter than the drain timeout,
        // so the deadline is the deletionTimestamp minus the margin.
        let victim = rollout::live_pods(lab, sel).await.remove(0);
        rollout::follow_logs(lab, &victim);
        let t = Instant::now();
        rollout::kubectl(
            lab,
            &["delete", "pod", &victim, "--grace-period=5", "--wait=false"],
        )
        .await;
        stopped_cleanly(lab, &pods, std::slice::from_ref(&victim)).await;
        let ev = rollout::drain_events(lab, &victim).await;
        let (_, source) = rollout::deadline_of(&ev["DrainStarted"]).expect("deadline");
        eprintln!("kubectl delete pod --grace-period=5: deadline from {source}");
        rollout::wait_rolled_out(lab, "ld", ROLLOUT_BOUND).await;
        steps.push((
            "kubectl delete pod --grace-period=5",
            t.elapsed(),
            load.counts(),
        ));

        // The Eviction API (what `kubectl drain` and the cluster autoscaler use).
        let victim = rollout::live_pods(lab, sel).await.remove(0);
        let t = Instant::now();
        let api: Api<Pod> = Api::namespaced(lab.cp().client(), rollout::NAMESPACE);
        api.evict(&victim, &EvictParams::default())
            .await
            .expect("evict");
        stopped_cleanly(lab, &pods, std::slice::from_ref(&victim)).await;
        rollout::wait_rolled_out(lab, "ld", ROLLOUT_BOUND).await;
        steps.push(("eviction (policy/v1 Eviction)", t.elapsed(), load.counts()));

        let total = load.stop().await;
        for (what, took, c) in &steps {
            eprintln!(
                "{what}: pod gone and replaced in {}; cumulative {c}",
                secs(*took)
            );
        }
        assert_eq!(total.failed(), 0, "failed requests: {total}");

        // The classic layout (lameduck a regular container, draining on
        // SIGTERM): a rollout under load.
        lab.apply_yaml(&rollout::chart("classic", REPLICAS, false, &[]));
        rollout::wait_rolled_out(lab, "classic", Duration::from_secs(90)).await;
        let r = rollout_under_load(
            lab,
            "classic",
            "app.kubernetes.io/instance=classic",
            Kind::KeepAlive,
        )
        .await;
        eprintln!(
            "classic layout, {}: {}; rollout {}, old pods gone {}",
            Kind::KeepAlive,
            r.counts,
            secs(r.rollout),
            secs(r.gone)
        );
        assert_eq!(r.counts.failed(), 0, "classic layout: {}", r.counts);
        for pod in &r.old {
            exited_0_with_drain_events(lab, &pods, pod).await;
        }
    });
}

/// A Job whose app finishes: the native sidecar is stopped after it, exits,
/// and the Job succeeds (the classic sidecar problem: a regular sidecar
/// container keeps the pod running forever).
#[test]
fn job_with_native_sidecar_completes() {
    lab::run(async |lab| {
        use k8s_openapi::api::batch::v1::Job;
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, ListParams};

        // The chart's Deployment, turned into a Job: same pod template, the
        // app replaced by a command that finishes at once.
        let yaml = rollout::chart(
            "batch",
            1,
            true,
            &[
                "app.command={/lameduck}",
                "app.args={--version}",
                "serviceAccount.create=true",
            ],
        );
        let job = rollout::deployment_to_job(&yaml, "batch");
        lab.apply_yaml(&job);
        let api: Api<Job> = Api::namespaced(lab.cp().client(), rollout::NAMESPACE);
        let t = Instant::now();
        let status = lab::k8s::wait_until("the Job to finish", Duration::from_secs(90), || async {
            let j = api.get("batch").await.ok()?;
            let s = j.status?;
            (s.succeeded.unwrap_or(0) > 0 || s.failed.unwrap_or(0) > 0).then_some(s)
        })
        .await;
        assert_eq!(status.succeeded, Some(1), "Job status: {status:?}");
        let pods: Api<Pod> = Api::namespaced(lab.cp().client(), rollout::NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels("job-name=batch"))
            .await
            .expect("list job pods");
        let pod = list.items.first().expect("the Job's pod");
        let st = pod.status.as_ref().expect("status");
        assert_eq!(st.phase.as_deref(), Some("Succeeded"));
        let sidecar = st
            .init_container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "lameduck")
            .expect("lameduck's status");
        let exit = sidecar
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        eprintln!(
            "Job succeeded in {}; lameduck exited {exit:?}",
            secs(t.elapsed())
        );
        assert_eq!(exit, Some(0), "lameduck in the Job's pod: {sidecar:?}");
    });
}

/// The kubelet's path into lameduck survives other pods: hostile peers
/// hold `GET /drained?timeout=10m` waiters on every pod's admin port (as
/// many as they can get) through a rollout, and the rollout still loses no
/// request, every app preStop hook returns cleanly and lameduck exits 0.
#[test]
fn admin_port_flood_by_other_pods_does_not_break_a_rollout() {
    lab::run(async |lab| {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::Api;

        let pods = PodLog::start(lab);
        lab.apply_yaml(&rollout::chart("ld", REPLICAS, true, &[]));
        rollout::wait_rolled_out(lab, "ld", Duration::from_secs(90)).await;
        // Four hostile pods, each its own pod IP behind the CNI bridge like
        // any other pod, flood the admin port of every lameduck pod.
        let api: Api<Pod> = Api::namespaced(lab.cp().client(), rollout::NAMESPACE);
        let mut targets = Vec::new();
        for name in rollout::live_pods(lab, "app.kubernetes.io/instance=ld").await {
            let pod = api.get(&name).await.expect("get pod");
            targets.push((name, pod.status.and_then(|s| s.pod_ip).expect("pod IP")));
        }
        let ips: Vec<String> = targets.iter().map(|(_, ip)| ip.clone()).collect();
        lab.apply_yaml(&rollout::hostile_pods(
            &lab.flood_image(),
            HOSTILE_PODS,
            FLOOD_PER_TARGET,
            &ips,
        ));
        rollout::wait_rolled_out(lab, "hostile", Duration::from_secs(60)).await;
        // Each hostile pod gets the per-peer share of every admin port (and
        // takes back what is closed); wait until all of them have it.
        let full = u64::from(HOSTILE_PODS) * 16;
        let mut held = 0;
        for (name, ip) in &targets {
            let until = Instant::now() + Duration::from_secs(30);
            let (mut h, mut closed) = rollout::hostile_holdings(lab, ip).await;
            while h < full && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                (h, closed) = rollout::hostile_holdings(lab, ip).await;
            }
            eprintln!(
                "flood of {name} ({ip}) by {HOSTILE_PODS} pods: {h} waiters held, {closed} connections closed at accept"
            );
            assert!(h > 0, "the flood got nothing held on {name}");
            assert!(
                closed > 0,
                "{name}: nothing refused, so the flood did not reach the cap"
            );
            held += h;
        }
        let r =
            rollout_under_load(lab, "ld", "app.kubernetes.io/instance=ld", Kind::KeepAlive).await;
        eprintln!(
            "rollout under an admin flood ({held} waiters held): {}; rollout {}, old pods gone {}",
            r.counts,
            secs(r.rollout),
            secs(r.gone)
        );
        assert_eq!(r.counts.failed(), 0, "{}", r.counts);
        assert_lameduck_drained(lab, &pods, &r.old).await;
    });
}

/// Rollouts in a row with nothing leaked: pods, their netns, cgroups, processes.
/// `LAMEDUCK_SOAK_ROLLOUTS` (default 20, ≈ 20 s each here).
#[test]
fn soak_rollouts_leak_nothing() {
    let n: usize = std::env::var("LAMEDUCK_SOAK_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    lab::run(async move |lab| {
        let pods = PodLog::start(lab);
        lab.apply_yaml(&rollout::chart("ld", REPLICAS, true, &[]));
        rollout::wait_rolled_out(lab, "ld", Duration::from_secs(90)).await;
        let sel = "app.kubernetes.io/instance=ld";
        let procs_before = lab.lab_pids().len();
        let netns_before = lab.pod_netns_count();
        let cgroups_before = lab.pod_cgroups();
        let rss_before = lab.rss_kib();
        let mut total = Counts::default();
        for i in 0..n {
            let r = rollout_under_load(lab, "ld", sel, Kind::KeepAlive).await;
            eprintln!(
                "soak {}/{n}: {}; rollout {}, old pods gone {}",
                i + 1,
                r.counts,
                secs(r.rollout),
                secs(r.gone)
            );
            assert_lameduck_drained(lab, &pods, &r.old).await;
            total.ok += r.counts.ok;
            total.refused += r.counts.refused;
            total.reset += r.counts.reset;
            total.eof += r.counts.eof;
            total.timeout += r.counts.timeout;
            total.status_5xx += r.counts.status_5xx;
            total.other += r.counts.other;
        }
        let live = rollout::live_pods(lab, sel).await;
        let (procs, netns, cgroups) = (
            lab.lab_pids().len(),
            lab.pod_netns_count(),
            lab.pod_cgroups(),
        );
        eprintln!(
            "soak: {n} rollouts, {total}; pods {}, processes {procs_before} -> {procs}, pod netns {netns_before} -> {netns}, pod cgroups {cgroups_before} -> {cgroups}, RSS {} -> {} MiB",
            live.len(),
            rss_before / 1024,
            lab.rss_kib() / 1024
        );
        assert_eq!(total.failed(), 0, "{total}");
        assert_eq!(live.len(), REPLICAS as usize, "{live:?}");
        assert_eq!(procs, procs_before, "lab processes");
        assert_eq!(netns, netns_before, "pod network namespaces");
        assert_eq!(cgroups, cgroups_before, "pod cgroups");
    });
}

/// `metricsLinger: 0s`: lameduck exits the moment its drain completes, while
/// its own preStop hook (`lameduck drain --wait`) is still waiting on it.
/// The hook must still return cleanly (no `FailedPreStopHook`, seen in
/// earlier runs as exit 137), and nothing is lost.
#[test]
fn rollout_with_no_metrics_linger_keeps_every_hook_clean() {
    lab::run(async |lab| {
        let pods = PodLog::start(lab);
        lab.apply_yaml(&rollout::chart(
            "ld",
            REPLICAS,
            true,
            &["lameduck.metricsLinger=0s"],
        ));
        rollout::wait_rolled_out(lab, "ld", Duration::from_secs(90)).await;
        for i in 0..3 {
            let r = rollout_under_load(lab, "ld", "app.kubernetes.io/instance=ld", Kind::KeepAlive)
                .await;
            eprintln!(
                "metricsLinger 0s, rollout {}: {}; rollout {}, old pods gone {}",
                i + 1,
                r.counts,
                secs(r.rollout),
                secs(r.gone)
            );
            assert_eq!(r.counts.failed(), 0, "{}", r.counts);
            assert_lameduck_drained(lab, &pods, &r.old).await;
        }
    });
}
