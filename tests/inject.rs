//! `lameduck inject` against a real kube-apiserver: the webhook runs as a
//! local process, registered by the injector chart's own
//! MutatingWebhookConfiguration (rendered with `webhook.url` pointing at it
//! and its CA as `caBundle`), and Pods are created through the API.
//!
//! The sidecar it injects is compared with the one the lameduck chart's
//! `lameduck.sidecar` template renders (deploy/testdata/consumer-chart),
//! both as the apiserver stored them (defaults applied), over a matrix of
//! settings: one definition, two renderings, no drift.

#[path = "k8s/mod.rs"]
mod k8s;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

use k8s::{ControlPlane, K8S_VERSION, WAIT, wait_until};
use support::Lameduck;
use support::pki::Pki;

const INJECTOR_NS: &str = "lameduck-system";

/// The consumer chart's sidecar settings, given to the injector as its
/// `--sidecar-config` too: both sides render from the same values.
fn sidecar_settings() -> Value {
    json!({
        "image": {"repository": "registry.example.com/lameduck", "tag": "0.1.0"},
        "nativeSidecar": true,
        "upstreamPort": 3000,
        "drainDelay": "5s",
        "drainTimeout": "40s",
        "appShutdownSeconds": 10
    })
}

struct Webhook {
    pki: Pki,
    injector: Lameduck,
}

impl Webhook {
    /// Makes a CA and a certificate for 127.0.0.1 and starts the injector
    /// (no lame-duck window).
    fn start(settings: &Value) -> Webhook {
        Self::start_draining_for(settings, "0s")
    }

    fn start_draining_for(settings: &Value, drain_delay: &str) -> Webhook {
        let pki = Pki::new();
        let (cert, key) = pki.server("webhook");
        let config = pki.path("sidecar.json");
        std::fs::write(&config, settings.to_string()).unwrap();
        let (cert, key) = (cert, key);
        let injector = spawn_injector(&cert, &key, &config, drain_delay);
        Webhook { pki, injector }
    }

    fn url(&self) -> String {
        format!("https://{}/mutate", self.injector.proxy_addr())
    }

    fn ca_base64(&self) -> String {
        let pem = std::fs::read(self.pki.path("ca.crt")).unwrap();
        base64(&pem)
    }
}

fn spawn_injector(cert: &Path, key: &Path, config: &Path, drain_delay: &str) -> Lameduck {
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--sidecar-config",
        config.to_str().unwrap(),
        "--kubernetes",
        "off",
        "--drain-delay",
        drain_delay,
    ];
    // LAMEDUCK_RECORD_REVIEWS=1: log every review received (to refresh
    // src/inject/testdata/ from what this apiserver really sends).
    if std::env::var_os("LAMEDUCK_RECORD_REVIEWS").is_some() {
        args.extend(["--log-level", "info,lameduck::inject=trace"]);
    }
    Lameduck::spawn_subcommand("inject", &args)
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm(args: &[&str]) -> String {
    k8s::run_helm(args)
}

/// The injector chart, rendered to call `url` (a local process) with `ca`.
fn injector_chart(url: &str, ca: &str, failure_policy: &str) -> String {
    helm(&[
        "template",
        "inj",
        repo().join("charts/lameduck-injector").to_str().unwrap(),
        "--namespace",
        INJECTOR_NS,
        "--kube-version",
        K8S_VERSION,
        "--set",
        &format!("webhook.url={url}"),
        "--set",
        &format!("webhook.failurePolicy={failure_policy}"),
        "--set",
        "webhook.timeoutSeconds=5",
        "--set",
        "certificates.source=external",
        "--set",
        "certificates.secretName=inj-tls",
        "--set",
        &format!("certificates.caBundle={ca}"),
        "--set-json",
        &format!("sidecar={}", sidecar_settings()),
    ])
}

/// The consumer chart (a chart of "your own" using `lameduck.sidecar`) with
/// the lameduck chart as its dependency, in a temporary directory.
fn consumer_chart(dir: &Path) -> PathBuf {
    let chart = dir.join("consumer");
    copy_dir(&repo().join("deploy/testdata/consumer-chart"), &chart);
    copy_dir(
        &repo().join("charts/lameduck"),
        &chart.join("charts/lameduck"),
    );
    chart
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Only the Deployment of a multi-document render.
fn deployment_doc(yaml: &str) -> String {
    yaml.split("\n---")
        .find(|doc| doc.contains("\nkind: Deployment"))
        .expect("a Deployment in the render")
        .to_owned()
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    spec[list]
        .as_array()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

/// The pods of a Deployment (created by the ReplicaSet controller, through
/// the webhook), once there.
async fn pods_of(cp: &ControlPlane, ns: &str, app: &str) -> Vec<Pod> {
    let pods: Api<Pod> = cp.api(ns);
    let selector = format!("app.kubernetes.io/instance={app}");
    wait_until(&format!("pods of {ns}/{app}"), WAIT, || {
        let (pods, selector) = (pods.clone(), selector.clone());
        async move {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            (!list.items.is_empty()).then_some(list.items)
        }
    })
    .await
}

/// One point of the matrix: the consumer chart's `--set`s, and the pod
/// annotations asking the injector for the same.
struct Variant {
    name: &'static str,
    chart_sets: &'static [&'static str],
    annotations: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_carry_the_sidecar_the_chart_renders() {
    let cp = ControlPlane::start().await;
    let webhook = Webhook::start(&sidecar_settings());
    cp.create_namespace(INJECTOR_NS).await;
    cp.apply_yaml(
        &injector_chart(&webhook.url(), &webhook.ca_base64(), "Fail"),
        INJECTOR_NS,
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let chart = consumer_chart(tmp.path());

    let variants = [
        Variant {
            name: "native",
            chart_sets: &[],
            annotations: json!({}),
        },
        Variant {
            name: "classic",
            chart_sets: &[
                "sidecar.nativeSidecar=false",
                "sidecar.appShutdownSeconds=7",
            ],
            annotations: json!({
                "lameduck.io/native-sidecar": "false",
                "lameduck.io/app-shutdown-seconds": "7"
            }),
        },
        Variant {
            name: "tcp",
            chart_sets: &[
                "sidecar.drainDelay=3s",
                "sidecar.drainTimeout=20s",
                "sidecar.mode=tcp",
            ],
            annotations: json!({
                "lameduck.io/drain-delay": "3s",
                "lameduck.io/drain-timeout": "20s",
                "lameduck.io/mode": "tcp"
            }),
        },
    ];
    for v in &variants {
        let ns = format!("shop-{}", v.name);
        cp.create_namespace(&ns).await;
        // The chart's rendering, as the apiserver stores it.
        let mut args = vec![
            "template".to_owned(),
            "rendered".to_owned(),
            chart.to_str().unwrap().to_owned(),
            "--kube-version".to_owned(),
            K8S_VERSION.to_owned(),
        ];
        for set in v.chart_sets {
            args.extend(["--set".to_owned(), (*set).to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rendered = deployment_doc(&helm(&args));
        let applied = cp.apply_yaml(&rendered, &ns).await;
        let chart_spec =
            serde_json::to_value(&applied[0]).unwrap()["spec"]["template"]["spec"].clone();

        // The same Deployment without the sidecar, labelled for injection.
        let mut bare = serde_json::to_value(&applied[0]).unwrap();
        let meta = json!({"name": "injected", "namespace": ns});
        bare["metadata"] = meta;
        bare.as_object_mut().unwrap().remove("status");
        let selector =
            json!({"app.kubernetes.io/instance": "injected", "app.kubernetes.io/name": "my-app"});
        bare["spec"]["selector"] = json!({"matchLabels": selector});
        let template = &mut bare["spec"]["template"];
        template["metadata"]["labels"] = selector.clone();
        template["metadata"]["labels"]["lameduck.io/inject"] = json!("true");
        template["metadata"]["annotations"] = v.annotations.clone();
        let spec = &mut template["spec"];
        spec.as_object_mut().unwrap().remove("initContainers");
        spec["terminationGracePeriodSeconds"] = json!(30);
        let app_only: Vec<Value> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] != "lameduck")
            .cloned()
            .map(|mut c| {
                c.as_object_mut().unwrap().remove("lifecycle");
                c
            })
            .collect();
        spec["containers"] = json!(app_only);
        let deployments: Api<Deployment> = cp.api(&ns);
        let bare: Deployment = serde_json::from_value(bare).unwrap();
        deployments
            .create(&PostParams::default(), &bare)
            .await
            .expect("create the bare Deployment");

        let pod = pods_of(&cp, &ns, "injected").await.remove(0);
        let pod = serde_json::to_value(&pod).unwrap();
        let list = if v.name == "classic" {
            "containers"
        } else {
            "initContainers"
        };
        let from_chart = container(&chart_spec, list, "lameduck").expect("the chart's sidecar");
        let injected = container(&pod["spec"], list, "lameduck")
            .unwrap_or_else(|| panic!("{}: no sidecar in {list}: {pod:#}", v.name));
        assert_eq!(
            injected, from_chart,
            "{}: injected sidecar differs from the chart's",
            v.name
        );
        let app =
            |spec: &Value| container(spec, "containers", "my-app").unwrap()["lifecycle"].clone();
        assert_eq!(
            app(&pod["spec"]),
            app(&chart_spec),
            "{}: app preStop",
            v.name
        );
        assert_eq!(
            pod["spec"]["terminationGracePeriodSeconds"],
            chart_spec["terminationGracePeriodSeconds"],
            "{}: grace period",
            v.name
        );
        assert_eq!(
            pod["metadata"]["annotations"]["lameduck.io/status"],
            "injected"
        );
        eprintln!("{}: the injected sidecar is the chart's", v.name);
    }

    // A plain labelled Pod with the token mounted: the sidecar gets the same mount.
    let ns = "plain";
    cp.create_namespace(ns).await;
    let pods: Api<Pod> = cp.api(ns);
    let labelled: Pod = serde_json::from_value(json!({
        "metadata": {"name": "labelled", "labels": {"lameduck.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"name": "web", "containerPort": 3000}]}]}
    }))
    .unwrap();
    let stored = pods
        .create(&PostParams::default(), &labelled)
        .await
        .unwrap();
    let stored = serde_json::to_value(&stored).unwrap();
    let sidecar = container(&stored["spec"], "initContainers", "lameduck").expect("injected");
    assert!(
        sidecar["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--upstream=127.0.0.1:3000"))
    );
    let token_mount = |c: &Value| {
        c["volumeMounts"].as_array().and_then(|m| {
            m.iter()
                .find(|m| m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
                .cloned()
        })
    };
    let app = container(&stored["spec"], "containers", "app").unwrap();
    assert!(token_mount(app).is_some(), "the app has the token: {app:#}");
    assert_eq!(token_mount(sidecar), token_mount(app));

    // What an operator reads (printed for the record; a pod that reads
    // naturally: the sidecar under Init Containers, the status annotation).
    if let Some(mut kubectl) = cp.kubectl() {
        let out = kubectl
            .args(["describe", "pod", "labelled", "-n", ns])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("kubectl describe pod labelled:\n{text}");
        assert!(text.contains("lameduck.io/status: injected"), "{text}");
    }

    // Not labelled: unchanged. Opted out in an enabled namespace: unchanged.
    let unlabelled: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unlabelled"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .unwrap();
    let stored = pods
        .create(&PostParams::default(), &unlabelled)
        .await
        .unwrap();
    assert!(stored.spec.unwrap().init_containers.is_none());
    assert!(stored.metadata.annotations.is_none());

    // A namespace labelled for injection: every pod, unless it opts out.
    let enabled = "enabled";
    cp.create_namespace(enabled).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cp.client());
    namespaces
        .patch(
            enabled,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {"lameduck.io/inject": "enabled"}}}),
            ),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = cp.api(enabled);
    let stored = pods
        .create(&PostParams::default(), &unlabelled)
        .await
        .unwrap();
    assert!(
        container(
            &serde_json::to_value(&stored).unwrap()["spec"],
            "initContainers",
            "lameduck"
        )
        .is_some()
    );
    let mut opted_out = unlabelled.clone();
    opted_out.metadata.name = Some("opted-out".into());
    opted_out.metadata.labels =
        Some([("lameduck.io/inject".to_owned(), "false".to_owned())].into());
    let stored = pods
        .create(&PostParams::default(), &opted_out)
        .await
        .unwrap();
    assert!(stored.spec.unwrap().init_containers.is_none());

    // An injected pod, created again (e.g. by a backup restore): unchanged.
    let plain: Api<Pod> = cp.api(ns);
    let injected = plain.get("labelled").await.unwrap();
    let mut again = injected.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("labelled-again".into()),
        labels: injected.metadata.labels.clone(),
        annotations: injected.metadata.annotations.clone(),
        ..Default::default()
    };
    let stored = plain.create(&PostParams::default(), &again).await.unwrap();
    let spec = stored.spec.unwrap();
    assert_eq!(spec.init_containers.unwrap().len(), 1, "injected twice");

    if std::env::var_os("LAMEDUCK_RECORD_REVIEWS").is_some() {
        for line in webhook.injector.stderr_lines() {
            if line.contains("admission review received") {
                eprintln!("{line}");
            }
        }
    }
    let metrics = support::metrics_text(webhook.injector.admin_addr()).await;
    let injected_count = support::parse_metric(
        &metrics,
        "lameduck_admission_reviews_total{outcome=\"injected\"}",
    );
    assert!(injected_count >= Some(5.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_injector_is_ignored_or_refuses_as_configured() {
    let cp = ControlPlane::start().await;
    let mut webhook = Webhook::start(&sidecar_settings());
    cp.create_namespace(INJECTOR_NS).await;
    let (url, ca) = (webhook.url(), webhook.ca_base64());
    cp.apply_yaml(&injector_chart(&url, &ca, "Ignore"), INJECTOR_NS)
        .await;
    cp.create_namespace("shop").await;
    let pods: Api<Pod> = cp.api("shop");
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"lameduck.io/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
        .unwrap()
    };
    let stored = pods
        .create(&PostParams::default(), &pod("while-up"))
        .await
        .unwrap();
    assert!(
        stored.spec.unwrap().init_containers.is_some(),
        "injected while up"
    );

    // SIGTERM: the injector drains and exits 0.
    webhook.injector.signal(nix::sys::signal::Signal::SIGTERM);
    let status = webhook.injector.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));

    // failurePolicy Ignore: created, without the sidecar.
    let stored = pods
        .create(&PostParams::default(), &pod("while-down"))
        .await
        .unwrap();
    assert!(stored.spec.unwrap().init_containers.is_none());

    // failurePolicy Fail: refused, with a message naming the webhook.
    cp.apply_yaml(&injector_chart(&url, &ca, "Fail"), INJECTOR_NS)
        .await;
    let err = wait_until("creation refused by failurePolicy Fail", WAIT, || {
        let pods = pods.clone();
        let p = pod("refused");
        async move { pods.create(&PostParams::default(), &p).await.err() }
    })
    .await;
    let message = err.to_string();
    assert!(message.contains("inject.lameduck.io"), "{message}");
    assert!(message.contains("failed calling webhook"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reviews_get_a_400_and_cost_nobody_else() {
    let webhook = Webhook::start(&sidecar_settings());
    let ca = webhook.pki.path("ca.crt");
    let addr = webhook.injector.proxy_addr();
    for body in [
        "",
        "{",
        "[]",
        r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let out = curl(&ca, &format!("https://{addr}/mutate"), Some(body));
        assert!(out.starts_with("400"), "{body:?}: {out}");
    }
    assert!(curl(&ca, &format!("https://{addr}/other"), None).starts_with("404"));
    // A bad settings file fails start-up with the file named.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"drainDelaySeconds": 5}"#).unwrap();
    let out = support::run_cmd(
        &[
            "inject",
            "--tls-cert",
            webhook.pki.path("webhook.crt").to_str().unwrap(),
            "--tls-key",
            webhook.pki.path("webhook.key").to_str().unwrap(),
            "--sidecar-config",
            bad.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(10),
    )
    .await;
    let stderr = out.stderr_lines().join("\n");
    assert!(
        stderr.contains("--sidecar-config") && stderr.contains("drainDelaySeconds"),
        "{stderr}"
    );
    // The recorded review still gets its answer after all that.
    let recorded =
        std::fs::read_to_string(repo().join("src/inject/testdata/review-pod.json")).unwrap();
    let out = curl(&ca, &format!("https://{addr}/mutate"), Some(&recorded));
    assert!(out.starts_with("200"), "{out}");
    assert!(out.contains("\"patchType\":\"JSONPatch\""), "{out}");
}

/// `curl` over HTTPS trusting `ca`: "<status> <body>".
fn curl(ca: &Path, url: &str, body: Option<&str>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["-o", "-", "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    format!("{status} {body}")
}

/// `helm install` and `helm upgrade` of both charts against the real
/// apiserver (no `--wait`: no kubelet runs the pods). The injector's
/// certificate, generated by Helm at install, is looked up and kept by the
/// upgrade, and the webhook trusts the CA that signed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_and_upgrade_keep_the_injectors_certificate() {
    let cp = ControlPlane::start().await;
    let kubeconfig = cp.admin_kubeconfig().to_str().unwrap().to_owned();
    let chart = repo().join("charts/lameduck-injector");
    let chart = chart.to_str().unwrap();
    let secret_of = |ns: &str| {
        let api: Api<k8s_openapi::api::core::v1::Secret> = cp.api(ns);
        async move {
            api.get("inj-lameduck-injector-tls")
                .await
                .expect("the Secret")
        }
    };
    for verb in ["install", "upgrade"] {
        let mut args = vec![verb, "inj", chart, "--namespace", INJECTOR_NS];
        args.extend(["--kubeconfig", &kubeconfig, "--set", "replicaCount=3"]);
        if verb == "install" {
            args.push("--create-namespace");
        }
        helm(&args);
    }
    let secret = secret_of(INJECTOR_NS).await;
    let data = secret.data.clone().unwrap();
    let webhooks: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(cp.client());
    let config = webhooks.get("inj-lameduck-injector").await.unwrap();
    for webhook in config.webhooks.unwrap() {
        assert_eq!(
            webhook.client_config.ca_bundle.as_ref().map(|b| &b.0),
            Some(&data["ca.crt"].0),
            "{}: caBundle is not the CA of the Secret",
            webhook.name
        );
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    }
    // A second upgrade that changes the webhook: still the certificate made at install.
    helm(&[
        "upgrade",
        "inj",
        chart,
        "--namespace",
        INJECTOR_NS,
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "webhook.timeoutSeconds=3",
    ]);
    let after = secret_of(INJECTOR_NS).await.data.unwrap();
    assert_eq!(
        after["tls.crt"], data["tls.crt"],
        "the upgrade replaced the certificate"
    );
    assert_eq!(after["tls.key"], data["tls.key"]);
    let config = webhooks.get("inj-lameduck-injector").await.unwrap();
    let timeouts: Vec<_> = config
        .webhooks
        .unwrap()
        .iter()
        .map(|w| w.timeout_seconds)
        .collect();
    assert_eq!(timeouts, [Some(3), Some(3)], "the upgrade was applied");
    let deployments: Api<Deployment> = cp.api(INJECTOR_NS);
    assert!(deployments.get("inj-lameduck-injector").await.is_ok());

    // The lameduck chart too, installed and upgraded in another namespace.
    let lameduck = repo().join("charts/lameduck");
    for verb in ["install", "upgrade"] {
        let mut args = vec![
            verb,
            "app",
            lameduck.to_str().unwrap(),
            "--namespace",
            "shop",
        ];
        args.extend(["--kubeconfig", &kubeconfig]);
        if verb == "install" {
            args.push("--create-namespace");
        }
        helm(&args);
    }
    let app: Api<Deployment> = cp.api("shop");
    assert!(app.get("app-lameduck").await.is_ok());

    // The Grafana dashboard, loaded the way Grafana's dashboard sidecar
    // expects it (README: Install): a labelled ConfigMap.
    let dashboard =
        std::fs::read_to_string(repo().join("deploy/grafana/lameduck-drain.json")).unwrap();
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = cp.api("shop");
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "lameduck-dashboard", "labels": {"grafana_dashboard": "1"}},
        "data": {"lameduck-drain.json": dashboard}
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &cm)
        .await
        .expect("the dashboard ConfigMap");
}

/// Creates a Pod labelled for injection; panics if it is refused (`during`
/// says when) or stored without the sidecar.
async fn create_injected(pods: &Api<Pod>, name: &str, during: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"lameduck.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .unwrap();
    let stored = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("{name} not admitted {during}: {e}"));
    assert!(
        stored.spec.unwrap().init_containers.is_some(),
        "{name} not injected {during}"
    );
}

/// A directory laid out as the kubelet lays out a Secret volume: the files
/// are symlinks into `..data`, itself a symlink to a timestamped directory
/// that an update replaces with one atomic rename.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path) -> SecretVolume {
        let dir = dir.join("secret");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        SecretVolume { dir, generation: 0 }
    }

    /// Publishes `cert` and `key` (file contents) as the new version.
    fn publish(&mut self, cert: &[u8], key: &[u8]) {
        self.generation += 1;
        let version = format!("..v{}", self.generation);
        let data = self.dir.join(&version);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("tls.crt"), cert).unwrap();
        std::fs::write(data.join("tls.key"), key).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// The certificate is replaced the way a Secret volume is updated, with a
/// broken pair (a key that is not the certificate's) published in between,
/// while pods are being created through the webhook with failurePolicy
/// Fail: every creation is admitted and injected, the broken pair is
/// refused, and the new certificate is the one served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_failed_admission() {
    let cp = ControlPlane::start().await;
    let pki = Pki::new();
    let read = |name: &str| std::fs::read(pki.path(name)).unwrap();
    pki.server("webhook");
    let (first_cert, first_key) = (read("webhook.crt"), read("webhook.key"));
    let mut volume = SecretVolume::new(&pki.path(""));
    volume.publish(&first_cert, &first_key);
    let config = pki.path("sidecar.json");
    std::fs::write(&config, sidecar_settings().to_string()).unwrap();
    let cert = volume.dir.join("tls.crt");
    let key = volume.dir.join("tls.key");
    let injector = spawn_injector(&cert, &key, &config, "0s");
    let url = format!("https://{}/mutate", injector.proxy_addr());
    let ca = base64(&read("ca.crt"));
    cp.create_namespace(INJECTOR_NS).await;
    cp.apply_yaml(&injector_chart(&url, &ca, "Fail"), INJECTOR_NS)
        .await;
    cp.create_namespace("shop").await;
    let pods: Api<Pod> = cp.api("shop");

    // A new certificate from the same CA (what cert-manager's renewal does).
    pki.server("webhook");
    let (second_cert, second_key) = (read("webhook.crt"), read("webhook.key"));
    assert_ne!(first_cert, second_cert);

    let admin = injector.admin_addr();
    let reloads = |result: &'static str| async move {
        support::metric_or_zero(
            admin,
            &format!("lameduck_tls_reloads_total{{listener=\"webhook\",result=\"{result}\"}}"),
        )
        .await
    };
    let (ok_before, refused_before) = (reloads("success").await, reloads("failure").await);
    let mut created = 0;
    for i in 0..60 {
        match i {
            15 => volume.publish(&second_cert, &first_key), // mismatched: refused
            30 => volume.publish(&second_cert, &second_key),
            _ => {}
        }
        create_injected(&pods, &format!("pod-{i}"), "during the rotation").await;
        created += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(created, 60);
    assert!(
        reloads("failure").await > refused_before,
        "the mismatched pair was not refused"
    );
    assert!(
        reloads("success").await > ok_before,
        "the new pair was not loaded"
    );
    // New handshakes get the new certificate.
    let served = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &injector.proxy_addr().to_string(),
            "-showcerts",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let served = String::from_utf8_lossy(&served.stdout);
    let second = String::from_utf8_lossy(&second_cert);
    let body = |pem: &str| {
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    };
    assert!(
        body(&served).contains(&body(&second)),
        "still the old certificate:\n{served}"
    );
    let refused = injector.logs_with_message(
        "TLS certificate reload refused, still serving the previous certificate",
    );
    assert_eq!(
        refused.len(),
        1,
        "one log line for the broken pair: {refused:?}"
    );
}

/// The injector rolls like any Deployment: replica A gets SIGTERM while
/// pods are being created (failurePolicy Fail, so a lost review is a
/// refused pod), keeps answering through its lame-duck window while the
/// apiserver is moved to replica B (as the Service's endpoints would be),
/// then closes its connections gracefully and exits 0. Not one creation
/// fails, and every pod carries the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_rolls_without_failing_an_admission() {
    let cp = ControlPlane::start().await;
    let mut a = Webhook::start_draining_for(&sidecar_settings(), "3s");
    let b = spawn_injector(
        &a.pki.path("webhook.crt"),
        &a.pki.path("webhook.key"),
        &a.pki.path("sidecar.json"),
        "0s",
    );
    let ca = a.ca_base64();
    let url_b = format!("https://{}/mutate", b.proxy_addr());
    cp.create_namespace(INJECTOR_NS).await;
    cp.apply_yaml(&injector_chart(&a.url(), &ca, "Fail"), INJECTOR_NS)
        .await;
    cp.create_namespace("shop").await;
    let pods: Api<Pod> = cp.api("shop");
    let admin_a = a.injector.admin_addr();
    for i in 0..60 {
        if i == 15 {
            // SIGTERM: A fails /ready and serves on for its 3 s window.
            a.injector.signal(nix::sys::signal::Signal::SIGTERM);
        }
        if i == 20 {
            // The endpoint change reaching the apiserver, within the window.
            cp.apply_yaml(&injector_chart(&url_b, &ca, "Fail"), INJECTOR_NS)
                .await;
        }
        create_injected(&pods, &format!("pod-{i}"), "during the injector's roll").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = a.injector.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "replica A did not drain gracefully");
    let summary = a.injector.summary().expect("A's drain summary");
    assert_eq!(summary["outcome"], "graceful", "{summary}");
    assert!(
        support::try_get(admin_a, "/ready").await.is_none(),
        "A still up"
    );
    let answered_by_b = support::parse_metric(
        &support::metrics_text(b.admin_addr()).await,
        "lameduck_admission_reviews_total{outcome=\"injected\"}",
    );
    assert!(answered_by_b >= Some(30.0), "B answered {answered_by_b:?}");
}
