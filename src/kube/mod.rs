//! The Kubernetes API as a source of facts for the drain: the own Pod (uid,
//! IPs, grace period, deletion timestamp), whether any EndpointSlice still
//! routes to it, and Events on it that say what the drain did.
//!
//! It only feeds the lifecycle: nothing here is on the request path, and
//! nothing here must ever block start-up or the drain beyond `api_timeout`
//! per call, fail start-up because the API is down, or spawn a task that
//! outlives the call that started it. When the API cannot answer, the
//! lifecycle falls back to its fixed window and deadline; every failure is
//! counted in `kubernetes_errors_total{op}` and logged without flooding.

mod endpoints;
#[cfg(test)]
mod fake_api;
mod watch;

pub use watch::EndpointsReleased;

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};

use crate::metrics::{KubeOp, Metrics};

pub use crate::config::{KubeMode, KubeSettings};

/// What the API said about the own Pod. At start-up a failed read leaves
/// everything but the name and namespace unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    /// `status.podIPs` (or `status.podIP`): how an endpoint without a Pod
    /// `targetRef` is recognised as this pod.
    pub ips: Vec<IpAddr>,
    /// `spec.terminationGracePeriodSeconds`.
    pub grace_period: Option<Duration>,
    /// `metadata.deletionTimestamp`: set once the pod is being deleted, to the
    /// delete request's time plus the grace period, i.e. when the kubelet
    /// may kill the containers. None while the pod is not being deleted.
    /// The API keeps it to the second, truncated.
    pub deletion: Option<SystemTime>,
    /// `metadata.deletionGracePeriodSeconds`: the grace period of this
    /// deletion, which the kubelet counts from when it begins stopping the
    /// pod (not from the delete request).
    pub deletion_grace_period: Option<Duration>,
}

impl PodFacts {
    /// Only the identity the downward API gave; what the API would add is unknown.
    pub fn unknown(name: &str, namespace: &str) -> Self {
        PodFacts {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid: None,
            ips: Vec::new(),
            grace_period: None,
            deletion: None,
            deletion_grace_period: None,
        }
    }

    /// The facts a Pod object shows. Fields the API left out stay unknown;
    /// an unparsable IP is skipped rather than failing the read.
    pub fn from_pod(name: &str, namespace: &str, pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        // podIP is podIPs[0] when both are set; older objects may carry only podIP.
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
        let grace_period = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.termination_grace_period_seconds)
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map(Duration::from_secs);
        PodFacts {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid: pod.metadata.uid.clone(),
            ips,
            grace_period,
            deletion: pod
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|time| SystemTime::from(time.0)),
            deletion_grace_period: pod
                .metadata
                .deletion_grace_period_seconds
                .and_then(|seconds| u64::try_from(seconds).ok())
                .map(Duration::from_secs),
        }
    }
}

/// An Event on the own Pod (`events.k8s.io/v1`). The constructors give the
/// four the drain publishes; the fields are public for anything else.
#[derive(Debug, Clone)]
pub struct DrainEvent {
    /// `DrainStarted`, `EndpointsRemoved`, `DrainCompleted`, `DrainForced`.
    pub reason: &'static str,
    /// Human-readable; cut to the API's 1 kB limit.
    pub note: String,
    /// `type: Warning` instead of `Normal`.
    pub warning: bool,
    /// What was done, e.g. `Drain`.
    pub action: &'static str,
}

impl DrainEvent {
    pub fn started(note: impl Into<String>) -> Self {
        DrainEvent::new("DrainStarted", note, false, "Drain")
    }

    pub fn endpoints_removed(note: impl Into<String>) -> Self {
        DrainEvent::new("EndpointsRemoved", note, false, "Drain")
    }

    pub fn completed(note: impl Into<String>) -> Self {
        DrainEvent::new("DrainCompleted", note, false, "Exit")
    }

    pub fn forced(note: impl Into<String>) -> Self {
        DrainEvent::new("DrainForced", note, true, "Exit")
    }

    fn new(
        reason: &'static str,
        note: impl Into<String>,
        warning: bool,
        action: &'static str,
    ) -> Self {
        DrainEvent {
            reason,
            note: note.into(),
            warning,
            action,
        }
    }
}

/// The API rejects an Event whose note is longer than this (bytes).
const MAX_NOTE_BYTES: usize = 1024;

fn truncate_note(mut note: String) -> String {
    if note.len() > MAX_NOTE_BYTES {
        let mut end = MAX_NOTE_BYTES;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes configuration (neither KUBERNETES_SERVICE_HOST with a \
         service-account token at {token} nor a kubeconfig in KUBECONFIG or ~/.kube/config)",
        token = SERVICE_ACCOUNT_TOKEN
    )]
    NoConfiguration,
    #[error("{var} is not set (expose it through the downward API: {field})")]
    MissingPodIdentity {
        var: &'static str,
        field: &'static str,
    },
    #[error("cannot load the Kubernetes configuration: {0}")]
    Config(#[source] kube::config::InferConfigError),
    #[error("loading the Kubernetes configuration took longer than {0:?}")]
    ConfigTimeout(Duration),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
}

/// Where `Config::incluster` reads the service-account token.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The reporting controller of the Events.
const REPORTING_CONTROLLER: &str = "lameduck";

/// A client for the own Pod's namespace and what start-up learned. Cheap to
/// clone (one `Arc`).
#[derive(Clone)]
pub struct Kube {
    inner: Arc<Inner>,
}

struct Inner {
    /// For requests bounded by `api_timeout` (its read timeout is that).
    client: Client,
    /// For the long watch: its read timeout exceeds the watch's server-side
    /// timeout, so a quiet watch is not cut as a dead connection.
    watch_client: Client,
    api_timeout: Duration,
    recorder: Recorder,
    facts: PodFacts,
    /// The uid a later `read_pod` learned when start-up could not: Events
    /// then name the pod by uid too.
    learned_uid: OnceLock<String>,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("facts", &self.inner.facts)
            .field("api_timeout", &self.inner.api_timeout)
            .finish_non_exhaustive()
    }
}

/// Which configuration `Config::infer` will find, decided from files and
/// environment alone so that "not in Kubernetes" never waits on anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigSource {
    InCluster,
    Kubeconfig,
}

fn non_empty_env(var: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(var).filter(|value| !value.is_empty())
}

fn config_source() -> Option<ConfigSource> {
    detect_config_source(
        non_empty_env("KUBECONFIG").as_deref(),
        non_empty_env("HOME").map(PathBuf::from).as_deref(),
        non_empty_env("KUBERNETES_SERVICE_HOST").is_some(),
        Path::new(SERVICE_ACCOUNT_TOKEN),
    )
}

/// The presence check, with its inputs passed in for the tests. The order is
/// `Config::infer`'s: a kubeconfig wins over the in-cluster configuration.
fn detect_config_source(
    kubeconfig_var: Option<&std::ffi::OsStr>,
    home: Option<&Path>,
    service_host_set: bool,
    token: &Path,
) -> Option<ConfigSource> {
    let kubeconfig = match kubeconfig_var {
        Some(paths) => std::env::split_paths(paths).any(|path| path.is_file()),
        None => home.is_some_and(|home| home.join(".kube").join("config").is_file()),
    };
    if kubeconfig {
        Some(ConfigSource::Kubeconfig)
    } else if service_host_set && token.is_file() {
        Some(ConfigSource::InCluster)
    } else {
        None
    }
}

/// Runs one API call under `after`; a timeout and an error both become a
/// `KubeError` naming `what`.
async fn bounded<T>(
    what: impl FnOnce() -> String,
    after: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(KubeError::Api {
            what: what(),
            source,
        }),
        Err(_) => Err(KubeError::Timeout {
            what: what(),
            after,
        }),
    }
}

/// The request client and the watch client from one configuration, each
/// with the timeouts its calls need.
fn clients(mut config: kube::Config, api_timeout: Duration) -> Result<(Client, Client), KubeError> {
    config.connect_timeout = Some(api_timeout);
    config.write_timeout = Some(api_timeout);
    let mut watch_config = config.clone();
    config.read_timeout = Some(api_timeout);
    // Counts the read timeout from the request, not from when the pooled
    // connection went idle (see kube's Config docs).
    config.reset_reader_on_write = true;
    watch_config.read_timeout = Some(watch::watch_read_timeout(api_timeout));
    let client = Client::try_from(config).map_err(KubeError::Client)?;
    let watch_client = Client::try_from(watch_config).map_err(KubeError::Client)?;
    Ok((client, watch_client))
}

/// GETs the own Pod, bounded by `api_timeout`; a failure is counted as `get_pod`.
async fn get_pod(
    client: &Client,
    api_timeout: Duration,
    name: &str,
    namespace: &str,
    metrics: &Metrics,
) -> Result<PodFacts, KubeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = bounded(
        || format!("get Pod {namespace}/{name}"),
        api_timeout,
        pods.get(name),
    )
    .await
    .inspect_err(|_| metrics.kubernetes_error(KubeOp::GetPod))?;
    Ok(PodFacts::from_pod(name, namespace, &pod))
}

/// The part of start-up that needs no network: with `--kubernetes on`, a
/// missing configuration or pod identity is a start-up error, found before
/// anything is served.
pub fn precheck(settings: &KubeSettings) -> Result<(), KubeError> {
    if settings.mode != KubeMode::On {
        return Ok(());
    }
    if config_source().is_none() {
        return Err(KubeError::NoConfiguration);
    }
    if settings.pod_name.as_deref().is_none_or(str::is_empty) {
        return Err(KubeError::MissingPodIdentity {
            var: "POD_NAME",
            field: "metadata.name",
        });
    }
    if settings.pod_namespace.as_deref().is_none_or(str::is_empty) {
        return Err(KubeError::MissingPodIdentity {
            var: "POD_NAMESPACE",
            field: "metadata.namespace",
        });
    }
    Ok(())
}

impl Kube {
    /// Start-up. `Off` → `Ok(None)`. `Auto` → `Ok(None)` with one info log when
    /// there is no configuration or no pod identity, or the configuration
    /// cannot be loaded (a warning, counted as `config`). `On` → those are
    /// errors. Then reads the own Pod once, bounded by `api_timeout`; a failed
    /// read is a warning and unknown facts, never an error: the API being down
    /// must not keep the proxy from starting.
    pub async fn connect(
        settings: &KubeSettings,
        metrics: &Metrics,
    ) -> Result<Option<Kube>, KubeError> {
        let required = match settings.mode {
            KubeMode::Off => return Ok(None),
            KubeMode::Auto => false,
            KubeMode::On => true,
        };
        let absent = |error: KubeError| {
            if required {
                Err(error)
            } else {
                tracing::info!(reason = %error, "Kubernetes API not used (--kubernetes auto)");
                Ok(None)
            }
        };
        if config_source().is_none() {
            return absent(KubeError::NoConfiguration);
        }
        let Some(name) = settings.pod_name.as_deref().filter(|n| !n.is_empty()) else {
            return absent(KubeError::MissingPodIdentity {
                var: "POD_NAME",
                field: "metadata.name",
            });
        };
        let Some(namespace) = settings.pod_namespace.as_deref().filter(|n| !n.is_empty()) else {
            return absent(KubeError::MissingPodIdentity {
                var: "POD_NAMESPACE",
                field: "metadata.namespace",
            });
        };

        let built = match tokio::time::timeout(settings.api_timeout, kube::Config::infer()).await {
            Err(_) => {
                metrics.kubernetes_error(KubeOp::Config);
                Err(KubeError::ConfigTimeout(settings.api_timeout))
            }
            Ok(Err(error)) => {
                metrics.kubernetes_error(KubeOp::Config);
                Err(KubeError::Config(error))
            }
            Ok(Ok(config)) => Self::build(config, settings.api_timeout, name, namespace, metrics)
                .await
                .map(Some),
        };
        match built {
            Err(error) if !required => {
                // Present but unusable is worth more than an info line.
                tracing::warn!(error = %error, "Kubernetes API not used (--kubernetes auto)");
                Ok(None)
            }
            other => other,
        }
    }

    /// A client from `config`, and the start-up read of the own Pod. Only a
    /// client that cannot be built is an error (counted as `config`).
    async fn build(
        config: kube::Config,
        api_timeout: Duration,
        name: &str,
        namespace: &str,
        metrics: &Metrics,
    ) -> Result<Kube, KubeError> {
        let (client, watch_client) = clients(config, api_timeout)
            .inspect_err(|_| metrics.kubernetes_error(KubeOp::Config))?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTING_CONTROLLER.into(),
                instance: Some(name.to_owned()),
            },
        );
        let facts = match get_pod(&client, api_timeout, name, namespace, metrics).await {
            Ok(facts) => {
                tracing::info!(
                    pod = %name,
                    namespace = %namespace,
                    uid = facts.uid.as_deref().unwrap_or("?"),
                    ips = ?facts.ips,
                    grace_period = ?facts.grace_period,
                    "Kubernetes API in use"
                );
                facts
            }
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    "own Pod unreadable at start-up; the drain reads it again and falls back to its fixed window"
                );
                PodFacts::unknown(name, namespace)
            }
        };
        Ok(Kube {
            inner: Arc::new(Inner {
                client,
                watch_client,
                api_timeout,
                recorder,
                facts,
                learned_uid: OnceLock::new(),
            }),
        })
    }

    /// What start-up learned (unknown fields if the Pod read failed then).
    pub fn facts(&self) -> &PodFacts {
        &self.inner.facts
    }

    /// GETs the own Pod, bounded by `api_timeout`; a failure is counted as
    /// `get_pod`. The facts carry the deletion timestamp (None while the pod
    /// is not being deleted) and make up for a failed read at start-up.
    pub async fn read_pod(&self, metrics: &Metrics) -> Result<PodFacts, KubeError> {
        let PodFacts {
            name, namespace, ..
        } = &self.inner.facts;
        let inner = &self.inner;
        let facts = get_pod(&inner.client, inner.api_timeout, name, namespace, metrics).await?;
        if self.inner.facts.uid.is_none()
            && let Some(uid) = &facts.uid
        {
            let _ = self.inner.learned_uid.set(uid.clone());
        }
        Ok(facts)
    }

    /// Waits for the lame-duck window's signal: no EndpointSlice routes to
    /// this pod any more. See `watch.rs` for the list-then-watch.
    pub async fn endpoints_released(
        &self,
        facts: &PodFacts,
        metrics: &Metrics,
    ) -> Result<EndpointsReleased, KubeError> {
        watch::endpoints_released(
            &self.inner.client,
            &self.inner.watch_client,
            self.inner.api_timeout,
            facts,
            metrics,
        )
        .await
    }

    /// Publishes an Event on the own Pod, bounded by `api_timeout`. Returns
    /// whether it was accepted; a failure is counted as `create_event` and
    /// logged at warn, and the drain goes on without it.
    pub async fn publish(&self, event: DrainEvent, metrics: &Metrics) -> bool {
        let reference = self.pod_reference();
        let reason = event.reason;
        let event = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(truncate_note(event.note)),
            action: event.action.into(),
            secondary: None,
        };
        let facts = &self.inner.facts;
        let published = bounded(
            || {
                format!(
                    "create Event {reason} on Pod {}/{}",
                    facts.namespace, facts.name
                )
            },
            self.inner.api_timeout,
            self.inner.recorder.publish(&event, &reference),
        )
        .await;
        match published {
            Ok(()) => true,
            Err(error) => {
                metrics.kubernetes_error(KubeOp::CreateEvent);
                tracing::warn!(error = %error, "Kubernetes Event not published");
                false
            }
        }
    }

    fn pod_reference(&self) -> ObjectReference {
        let facts = &self.inner.facts;
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(facts.name.clone()),
            namespace: Some(facts.namespace.clone()),
            uid: facts
                .uid
                .clone()
                .or_else(|| self.inner.learned_uid.get().cloned()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::time::UNIX_EPOCH;

    #[test]
    fn deletion_timestamp_becomes_system_time() {
        // k8s-openapi 0.29 carries jiff::Timestamp inside Time.
        let time: Time = serde_json::from_str("\"2025-03-01T12:00:30Z\"").unwrap();
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                deletion_timestamp: Some(time),
                deletion_grace_period_seconds: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let facts = PodFacts::from_pod("web-0", "shop", &pod);
        assert_eq!(facts.deletion_grace_period, Some(Duration::from_secs(5)));
        let deletion = facts.deletion.unwrap();
        assert_eq!(
            deletion.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_secs(1_740_830_430)
        );
        assert_eq!(
            PodFacts::from_pod("web-0", "shop", &Pod::default()).deletion,
            None
        );
    }

    #[test]
    fn pod_facts_from_a_pod() {
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("uid-1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                termination_grace_period_seconds: Some(45),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.5".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.0.0.5".into(),
                    },
                    PodIP {
                        ip: "fd00::5".into(),
                    },
                    PodIP {
                        ip: "garbage".into(),
                    },
                ]),
                ..Default::default()
            }),
        };
        let facts = PodFacts::from_pod("web-0", "shop", &pod);
        assert_eq!(facts.uid.as_deref(), Some("uid-1"));
        assert_eq!(
            facts.ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(facts.grace_period, Some(Duration::from_secs(45)));

        // Only podIP (older objects); a negative grace period is no grace period.
        let pod = Pod {
            spec: Some(PodSpec {
                termination_grace_period_seconds: Some(-1),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.7".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let facts = PodFacts::from_pod("web-0", "shop", &pod);
        assert_eq!(facts.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(facts.grace_period, None);
        assert_eq!(facts.uid, None);
    }

    #[test]
    fn notes_are_cut_at_a_char_boundary() {
        assert_eq!(truncate_note("short".into()), "short");
        let long = "é".repeat(600); // 1200 bytes
        let cut = truncate_note(long);
        assert!(cut.len() <= MAX_NOTE_BYTES);
        assert_eq!(cut.len(), 1024);
        let odd = format!("x{}", "é".repeat(600));
        assert_eq!(truncate_note(odd).len(), 1023);
    }

    #[test]
    fn config_presence_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let missing = dir.path().join("missing");
        assert_eq!(detect_config_source(None, None, true, &missing), None);
        assert_eq!(detect_config_source(None, None, false, &missing), None);
        std::fs::write(&token, "t").unwrap();
        assert_eq!(detect_config_source(None, None, false, &token), None);
        assert_eq!(
            detect_config_source(None, None, true, &token),
            Some(ConfigSource::InCluster)
        );
        // ~/.kube/config
        assert_eq!(
            detect_config_source(None, Some(dir.path()), false, &token),
            None
        );
        std::fs::create_dir(dir.path().join(".kube")).unwrap();
        std::fs::write(dir.path().join(".kube/config"), "").unwrap();
        assert_eq!(
            detect_config_source(None, Some(dir.path()), false, &missing),
            Some(ConfigSource::Kubeconfig)
        );
        // KUBECONFIG replaces ~/.kube/config; one existing entry of the list suffices.
        let list = std::env::join_paths([missing.clone(), token.clone()]).unwrap();
        assert_eq!(
            detect_config_source(Some(&list), None, false, &missing),
            Some(ConfigSource::Kubeconfig)
        );
        let none = std::env::join_paths([missing.clone()]).unwrap();
        assert_eq!(
            detect_config_source(Some(&none), Some(dir.path()), false, &missing),
            None
        );
    }

    fn settings(mode: KubeMode, name: Option<&str>) -> KubeSettings {
        KubeSettings {
            mode,
            pod_name: name.map(Into::into),
            pod_namespace: Some("shop".into()),
            api_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn off_never_looks() {
        let metrics = Metrics::new();
        let kube = Kube::connect(&settings(KubeMode::Off, Some("web-0")), &metrics).await;
        assert!(matches!(kube, Ok(None)));
    }

    #[tokio::test]
    async fn missing_identity_is_an_error_only_when_required() {
        // Whether or not this machine has a kubeconfig, a missing POD_NAME is
        // the one thing both modes report: Auto quietly, On as an error.
        let metrics = Metrics::new();
        let auto = Kube::connect(&settings(KubeMode::Auto, None), &metrics).await;
        assert!(matches!(auto, Ok(None)));
        let on = Kube::connect(&settings(KubeMode::On, None), &metrics).await;
        let error = on.unwrap_err();
        assert!(
            matches!(
                error,
                KubeError::NoConfiguration | KubeError::MissingPodIdentity { .. }
            ),
            "{error}"
        );
    }
}
