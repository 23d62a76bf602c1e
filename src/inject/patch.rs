//! From a Pod (as JSON) to the JSON patch that adds the sidecar.
//!
//! Rules, in the order they are checked:
//! - An injected pod (our status annotation, or a container by the sidecar's
//!   name) is left alone: re-invocation and re-creation are no-ops.
//! - Opt-out (`lameduck.io/inject: "false"`), host-network pods (the sidecar's
//!   ports would be the node's), an app already using the sidecar's ports,
//!   and annotations the injector cannot read leave the pod as it is, with the
//!   reason in `lameduck.io/status` and a warning: never a refusal.
//! - Otherwise: the container (first init container with `restartPolicy:
//!   Always` for a native sidecar, else the last container), the app
//!   containers' preStop on `/drained` (an existing preStop is kept and the
//!   skip recorded in `lameduck.io/notes`), the grace period raised to what
//!   the drain needs (never lowered), the ServiceAccount token mounted as
//!   the apiserver mounted it into the app, and the scrape annotations unless
//!   the pod already has its own.
//!
//! Paths are built token by token (`PointerBuf::from_tokens`), which escapes
//! `/` and `~` in keys such as `lameduck.io/status`.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use serde_json::{Map, Value, json};

use super::settings::{DurationSetting, Sidecar, SidecarSettings};

/// Pod label (or namespace label, through the webhook's selectors) asking for the sidecar.
pub const INJECT_LABEL: &str = "lameduck.io/inject";
/// What the injector did: `injected`, or `skipped: <reason>`.
pub const STATUS_ANNOTATION: &str = "lameduck.io/status";
/// What the injector left as the pod had it (an app's own preStop, its
/// prometheus.io annotations) or changed (the grace period raised).
pub const NOTES_ANNOTATION: &str = "lameduck.io/notes";

/// The decision on one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub outcome: Outcome,
    pub patch: Patch,
    /// Shown to whoever created the pod (kubectl prints them).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Already carries the sidecar (or our status): nothing to do.
    AlreadyInjected,
    /// Left without the sidecar, for the reason given.
    Skipped(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::AlreadyInjected => "unchanged",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

/// Decides what to do with `pod` given the injector's settings.
pub fn inject(pod: &Value, base: &SidecarSettings) -> Injection {
    let annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
    let spec = pod.get("spec");
    let containers = array(spec, "containers");
    let init_containers = array(spec, "initContainers");

    let already = annotations
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|s| s == "injected")
        || containers
            .iter()
            .chain(init_containers)
            .any(|c| c.get("name").and_then(Value::as_str) == Some(base.name.as_str()));
    if already {
        return Injection {
            outcome: Outcome::AlreadyInjected,
            patch: Patch(Vec::new()),
            warnings: Vec::new(),
        };
    }
    let opted_out = labels
        .and_then(|l| l.get(INJECT_LABEL))
        .and_then(Value::as_str)
        == Some("false");
    if opted_out {
        return skip(annotations, format!("the pod's label {INJECT_LABEL}=false"));
    }
    if spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return skip(
            annotations,
            "hostNetwork: the sidecar's ports would be the node's".to_owned(),
        );
    }
    let settings = match with_annotations(base.clone(), annotations, containers) {
        Ok(settings) => settings,
        Err(reason) => return skip(annotations, reason),
    };
    let sidecar = match settings.validate() {
        Ok(sidecar) => sidecar,
        Err(e) => return skip(annotations, format!("invalid settings: {e}")),
    };
    for port in [sidecar.settings.listen_port, sidecar.settings.admin_port] {
        if let Some(owner) = container_with_port(containers, port) {
            return skip(
                annotations,
                format!("port {port} is already container {owner:?}'s"),
            );
        }
    }
    plan(pod, annotations, containers, init_containers, &sidecar)
}

fn plan(
    pod: &Value,
    annotations: Option<&Map<String, Value>>,
    containers: &[Value],
    init_containers: &[Value],
    sidecar: &Sidecar,
) -> Injection {
    let mut ops = Vec::new();
    let mut kept = Vec::new();
    let mut warnings = Vec::new();

    // The app containers wait on the drain before their SIGTERM.
    for (i, container) in containers.iter().enumerate() {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("");
        let index = i.to_string();
        match container.get("lifecycle") {
            Some(Value::Object(lifecycle)) if lifecycle.contains_key("preStop") => {
                kept.push(format!("container {name}: its own preStop kept"));
                warnings.push(format!(
                    "lameduck: container {name:?} has its own preStop hook, kept as it is; \
                     it may receive SIGTERM before lameduck has drained"
                ));
            }
            Some(Value::Object(_)) => ops.push(add(
                ["spec", "containers", &index, "lifecycle", "preStop"],
                sidecar.app_pre_stop(),
            )),
            _ => ops.push(add(
                ["spec", "containers", &index, "lifecycle"],
                json!({"preStop": sidecar.app_pre_stop()}),
            )),
        }
    }

    let mut container = sidecar.container();
    // The apiserver's ServiceAccount admission mounted the token into the
    // containers that existed before this webhook ran; the sidecar needs it
    // too (its Kubernetes-aware drain), exactly as that plugin would have.
    if let Some(mount) = token_mount(containers) {
        container["volumeMounts"] = json!([mount]);
    }
    if sidecar.settings.native_sidecar {
        if pod.pointer("/spec/initContainers").is_some() && !init_containers.is_empty() {
            // First, so it serves before any init container needs the network.
            ops.push(add(["spec", "initContainers", "0"], container));
        } else {
            ops.push(add(["spec", "initContainers"], json!([container])));
        }
    } else {
        ops.push(add(["spec", "containers", "-"], container));
    }

    let needed = sidecar.termination_grace_period_seconds;
    match pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
    {
        None => ops.push(add(
            ["spec", "terminationGracePeriodSeconds"],
            json!(needed),
        )),
        Some(current) if current < needed => {
            kept.push(format!(
                "terminationGracePeriodSeconds raised from {current} to {needed}"
            ));
            ops.push(PatchOperation::Replace(ReplaceOperation {
                path: pointer(["spec", "terminationGracePeriodSeconds"]),
                value: json!(needed),
            }));
        }
        Some(_) => {}
    }

    if pod
        .pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool)
        == Some(false)
    {
        warnings.push(
            "lameduck: automountServiceAccountToken is false: the sidecar drains on its fixed \
             timings, without the Kubernetes API"
                .to_owned(),
        );
    }

    let mut new_annotations = vec![(STATUS_ANNOTATION.to_owned(), "injected".to_owned())];
    let has_scrape = annotations.is_some_and(|a| a.keys().any(|k| k.starts_with("prometheus.io/")));
    if has_scrape {
        kept.push("the pod's own prometheus.io annotations".to_owned());
    } else {
        new_annotations.extend([
            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
            (
                "prometheus.io/port".to_owned(),
                sidecar.settings.admin_port.to_string(),
            ),
            ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ]);
    }
    if !kept.is_empty() {
        new_annotations.push((NOTES_ANNOTATION.to_owned(), kept.join("; ")));
    }
    ops.extend(annotation_ops(annotations, new_annotations));
    Injection {
        outcome: Outcome::Injected,
        patch: Patch(ops),
        warnings,
    }
}

fn skip(annotations: Option<&Map<String, Value>>, reason: String) -> Injection {
    let warning = format!("lameduck: sidecar not injected: {reason}");
    let status = vec![(STATUS_ANNOTATION.to_owned(), format!("skipped: {reason}"))];
    Injection {
        outcome: Outcome::Skipped(reason),
        patch: Patch(annotation_ops(annotations, status)),
        warnings: vec![warning],
    }
}

/// One `add` of the whole map when the pod has no annotations, else one per key.
fn annotation_ops(
    existing: Option<&Map<String, Value>>,
    new: Vec<(String, String)>,
) -> Vec<PatchOperation> {
    match existing {
        None => {
            let map: Map<String, Value> = new.into_iter().map(|(k, v)| (k, json!(v))).collect();
            vec![add(["metadata", "annotations"], Value::Object(map))]
        }
        Some(_) => new
            .into_iter()
            .map(|(k, v)| add(["metadata", "annotations", k.as_str()], json!(v)))
            .collect(),
    }
}

/// Applies the pod's `lameduck.io/*` setting annotations.
fn with_annotations(
    mut settings: SidecarSettings,
    annotations: Option<&Map<String, Value>>,
    containers: &[Value],
) -> Result<SidecarSettings, String> {
    let get = |key: &str| {
        annotations
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .map(str::trim)
    };
    let bad = |key: &str, value: &str, want: &str| format!("annotation {key}={value:?}: {want}");
    // Each annotation sets the sidecar setting of the same name
    // (lameduck.io/drain-delay: drainDelay, ...).
    match get("lameduck.io/upstream-port") {
        Some(port) => settings.upstream_port = resolve_port(port, containers)?,
        None => {
            if let Some(port) = only_declared_port(containers) {
                settings.upstream_port = port;
            }
        }
    }
    if let Some(mode) = get("lameduck.io/mode") {
        settings.mode = mode.to_owned();
    }
    if let Some(protocol) = get("lameduck.io/upstream-protocol") {
        settings.upstream_protocol = protocol.to_owned();
    }
    if let Some(delay) = get("lameduck.io/drain-delay") {
        settings.drain_delay = DurationSetting::Text(delay.into());
    }
    if let Some(timeout) = get("lameduck.io/drain-timeout") {
        settings.drain_timeout = DurationSetting::Text(timeout.into());
    }
    let key = "lameduck.io/native-sidecar";
    if let Some(value) = get(key) {
        settings.native_sidecar = match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(key, value, "must be true or false")),
        };
    }
    let key = "lameduck.io/app-shutdown-seconds";
    if let Some(value) = get(key) {
        settings.app_shutdown_seconds = value
            .parse::<u32>()
            .map_err(|_| bad(key, value, "must be a whole number of seconds"))?
            .into();
    }
    Ok(settings)
}

/// A port number, or the name of a port an app container declares.
fn resolve_port(value: &str, containers: &[Value]) -> Result<u16, String> {
    if let Ok(port) = value.parse::<u16>() {
        if port > 0 {
            return Ok(port);
        }
    }
    declared_ports(containers)
        .find(|(name, _)| *name == Some(value))
        .map(|(_, port)| port)
        .ok_or_else(|| {
            format!(
                "annotation lameduck.io/upstream-port={value:?}: neither a port number nor the name of a port of an app container"
            )
        })
}

/// When the app declares exactly one TCP port, that is the one to proxy to.
fn only_declared_port(containers: &[Value]) -> Option<u16> {
    let mut ports = declared_ports(containers).map(|(_, port)| port);
    let first = ports.next()?;
    ports.all(|p| p == first).then_some(first)
}

fn declared_ports(containers: &[Value]) -> impl Iterator<Item = (Option<&str>, u16)> {
    containers
        .iter()
        .flat_map(|c| array(Some(c), "ports"))
        .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = p.get("containerPort")?.as_u64()?;
            Some((
                p.get("name").and_then(Value::as_str),
                u16::try_from(port).ok()?,
            ))
        })
}

/// Where the ServiceAccount admission plugin mounts the token.
const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn token_mount(containers: &[Value]) -> Option<Value> {
    containers
        .iter()
        .flat_map(|c| array(Some(c), "volumeMounts"))
        .find(|m| m.get("mountPath").and_then(Value::as_str) == Some(TOKEN_MOUNT_PATH))
        .cloned()
}

fn container_with_port(containers: &[Value], port: u16) -> Option<String> {
    containers
        .iter()
        .find(|c| {
            array(Some(c), "ports")
                .iter()
                .any(|p| p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(port)))
        })
        .map(|c| {
            c.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        })
}

fn array<'a>(parent: Option<&'a Value>, key: &str) -> &'a [Value] {
    parent
        .and_then(|p| p.get(key))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn pointer<const N: usize>(tokens: [&str; N]) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

fn add<const N: usize>(tokens: [&str; N], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

#[cfg(test)]
mod tests;
