//! What the injected sidecar looks like: the settings (the keys and defaults
//! of the chart's `lameduck.sidecarDefaults`), their validation and the
//! derived values (`lameduck.config`), and the container they render to
//! (`lameduck.sidecar`, `lameduck.appLifecycle`).
//!
//! The chart's templates and this module are two renderings of one
//! definition; `tests/inject.rs` creates a Pod from each through a real
//! kube-apiserver and asserts the stored containers are identical, over a
//! matrix of settings, so neither can drift from the other unnoticed.

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The injector's settings file (`--sidecar-config`): the chart's sidecar
/// settings as JSON. Unknown keys are refused, so a typo fails start-up
/// instead of being silently ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SidecarSettings {
    pub name: String,
    pub image: Image,
    pub native_sidecar: bool,
    pub mode: String,
    pub upstream_protocol: String,
    pub upstream_host: String,
    pub upstream_port: u16,
    pub bind_address: String,
    pub listen_port: u16,
    pub admin_port: u16,
    pub drain_delay: DurationSetting,
    pub drain_timeout: DurationSetting,
    pub metrics_linger: DurationSetting,
    pub max_connections: u32,
    pub log_level: String,
    pub log_format: String,
    pub kubernetes: String,
    pub deadline_margin: Option<DurationSetting>,
    pub extra_args: Vec<String>,
    pub env: Vec<Value>,
    pub termination_grace_period_seconds: Option<i64>,
    pub app_shutdown_seconds: i64,
    pub resources: Map<String, Value>,
    pub security_context: Map<String, Value>,
    /// Probe timings, merged key by key over the defaults (like the chart).
    #[serde(deserialize_with = "probe_overrides::startup")]
    pub startup_probe: Map<String, Value>,
    #[serde(deserialize_with = "probe_overrides::readiness")]
    pub readiness_probe: Map<String, Value>,
    #[serde(deserialize_with = "probe_overrides::liveness")]
    pub liveness_probe: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Image {
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub pull_policy: String,
}

impl Default for Image {
    fn default() -> Self {
        Image {
            repository: String::new(),
            tag: String::new(),
            digest: String::new(),
            pull_policy: "IfNotPresent".to_owned(),
        }
    }
}

/// A duration as the chart accepts it: a whole number of seconds, or a
/// sequence of `<integer><unit>` with unit ms, s, m or h. The chart does
/// arithmetic on these values, so it keeps to this subset of what the
/// binary's flags accept; so does the injector, so both agree.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DurationSetting {
    Seconds(u64),
    Text(String),
}

impl DurationSetting {
    fn text(value: &str) -> Self {
        DurationSetting::Text(value.to_owned())
    }

    /// Milliseconds, or an error naming the setting.
    pub fn millis(&self, name: &str) -> Result<u64, SettingsError> {
        let bad = |value: &str| SettingsError::Duration {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        let text = match self {
            DurationSetting::Seconds(s) => return s.checked_mul(1000).ok_or_else(|| bad("")),
            DurationSetting::Text(t) => t.trim(),
        };
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse::<u64>()
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| bad(text));
        }
        let mut total: u64 = 0;
        let mut rest = text;
        if rest.is_empty() {
            return Err(bad(text));
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad(text));
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad(text))?;
            rest = &rest[digits..];
            let (unit_ms, unit_len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else {
                return Err(bad(text));
            };
            rest = &rest[unit_len..];
            total = n
                .checked_mul(unit_ms)
                .and_then(|ms| total.checked_add(ms))
                .ok_or_else(|| bad(text))?;
        }
        Ok(total)
    }
}

/// `25000 → "25s"`, `1500 → "1500ms"`, as the chart's `lameduck.formatMillis`.
pub fn format_millis(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

mod probe_overrides {
    use serde::{Deserialize, Deserializer};
    use serde_json::{Map, Value};

    fn merged<'de, D: Deserializer<'de>>(
        defaults: Map<String, Value>,
        d: D,
    ) -> Result<Map<String, Value>, D::Error> {
        let mut probe = defaults;
        for (k, v) in Map::<String, Value>::deserialize(d)? {
            probe.insert(k, v);
        }
        Ok(probe)
    }

    pub fn startup<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        merged(super::defaults::startup_probe(), d)
    }
    pub fn readiness<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        merged(super::defaults::readiness_probe(), d)
    }
    pub fn liveness<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        merged(super::defaults::liveness_probe(), d)
    }
}

/// The chart's `lameduck.sidecarDefaults`, value for value.
mod defaults {
    use serde_json::{Map, Value, json};

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// None by default (see the chart's values.yaml).
    pub fn startup_probe() -> Map<String, Value> {
        Map::new()
    }
    pub fn readiness_probe() -> Map<String, Value> {
        object(json!({
            "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1, "successThreshold": 1
        }))
    }
    pub fn liveness_probe() -> Map<String, Value> {
        object(json!({"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3}))
    }
    pub fn resources() -> Map<String, Value> {
        object(json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}))
    }
    pub fn security_context() -> Map<String, Value> {
        object(json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }))
    }
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            name: "lameduck".to_owned(),
            image: Image::default(),
            native_sidecar: true,
            mode: "http".to_owned(),
            upstream_protocol: "http1".to_owned(),
            upstream_host: "127.0.0.1".to_owned(),
            upstream_port: 8080,
            bind_address: "0.0.0.0".to_owned(),
            listen_port: 8000,
            admin_port: 9901,
            drain_delay: DurationSetting::text("5s"),
            drain_timeout: DurationSetting::text("25s"),
            metrics_linger: DurationSetting::text("15s"),
            max_connections: 10_000,
            log_level: "info".to_owned(),
            log_format: "json".to_owned(),
            kubernetes: "auto".to_owned(),
            deadline_margin: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            termination_grace_period_seconds: None,
            app_shutdown_seconds: 5,
            resources: defaults::resources(),
            security_context: defaults::security_context(),
            startup_probe: defaults::startup_probe(),
            readiness_probe: defaults::readiness_probe(),
            liveness_probe: defaults::liveness_probe(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "{name}={value:?} is not a duration the injector understands; use a whole number of seconds or e.g. 500ms, 25s, 1m30s"
    )]
    Duration { name: String, value: String },
    #[error("{name}={value:?}: must be {allowed}")]
    OneOf {
        name: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("drainTimeout ({timeout}) must be >= drainDelay ({delay})")]
    DeadlineBeforeWindow { timeout: String, delay: String },
    #[error("drainTimeout must be greater than 0")]
    ZeroTimeout,
    #[error(
        "terminationGracePeriodSeconds ({grace}) must be greater than drainTimeout ({timeout_seconds}s): the kubelet would SIGKILL lameduck mid-drain"
    )]
    GraceTooShort { grace: i64, timeout_seconds: i64 },
    #[error(
        "deadlineMargin ({margin}) must be shorter than terminationGracePeriodSeconds ({grace})"
    )]
    MarginTooLong { margin: String, grace: i64 },
    #[error("image.repository is empty: set the lameduck image")]
    NoImage,
    #[error("image.tag (or image.digest) is empty: pin the lameduck image version")]
    NoImageVersion,
    #[error("{0}")]
    Annotation(String),
}

/// Settings validated, with what the chart derives from them.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub settings: SidecarSettings,
    pub image_ref: String,
    pub drain_delay: String,
    pub drain_timeout: String,
    pub metrics_linger: String,
    pub deadline_margin: String,
    /// How long a drain hook waits on /drained: drainTimeout + 1s (it can
    /// start a moment before the drain does).
    pub hook_timeout: String,
    pub termination_grace_period_seconds: i64,
}

impl SidecarSettings {
    /// The chart's `lameduck.config`: validation and derived values.
    pub fn validate(self) -> Result<Sidecar, SettingsError> {
        one_of("mode", &self.mode, &["http", "tcp"], "http or tcp")?;
        one_of(
            "upstreamProtocol",
            &self.upstream_protocol,
            &["http1", "http2"],
            "http1 or http2",
        )?;
        one_of(
            "logFormat",
            &self.log_format,
            &["json", "text"],
            "json or text",
        )?;
        one_of(
            "kubernetes",
            &self.kubernetes,
            &["auto", "on", "off"],
            "auto, on or off",
        )?;
        let delay_ms = self.drain_delay.millis("drainDelay")?;
        let timeout_ms = self.drain_timeout.millis("drainTimeout")?;
        let linger_ms = self.metrics_linger.millis("metricsLinger")?;
        if timeout_ms < delay_ms {
            return Err(SettingsError::DeadlineBeforeWindow {
                timeout: format_millis(timeout_ms),
                delay: format_millis(delay_ms),
            });
        }
        if timeout_ms == 0 {
            return Err(SettingsError::ZeroTimeout);
        }
        let timeout_seconds = timeout_ms.div_ceil(1000) as i64;
        let grace = self
            .termination_grace_period_seconds
            .unwrap_or(timeout_seconds + self.app_shutdown_seconds);
        if grace <= timeout_seconds {
            return Err(SettingsError::GraceTooShort {
                grace,
                timeout_seconds,
            });
        }
        let margin_ms = match &self.deadline_margin {
            Some(margin) => margin.millis("deadlineMargin")?,
            None if self.native_sidecar => 1000,
            None => (self.app_shutdown_seconds.max(0) as u64) * 1000,
        };
        if margin_ms >= (grace as u64) * 1000 {
            return Err(SettingsError::MarginTooLong {
                margin: format_millis(margin_ms),
                grace,
            });
        }
        let image_ref = image_ref(&self.image)?;
        Ok(Sidecar {
            image_ref,
            drain_delay: format_millis(delay_ms),
            drain_timeout: format_millis(timeout_ms),
            metrics_linger: format_millis(linger_ms),
            deadline_margin: format_millis(margin_ms),
            hook_timeout: format_millis(timeout_ms + 1000),
            termination_grace_period_seconds: grace,
            settings: self,
        })
    }
}

fn one_of(
    name: &'static str,
    value: &str,
    allowed: &[&str],
    said: &'static str,
) -> Result<(), SettingsError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::OneOf {
            name,
            value: value.to_owned(),
            allowed: said,
        })
    }
}

fn image_ref(image: &Image) -> Result<String, SettingsError> {
    if image.repository.is_empty() {
        Err(SettingsError::NoImage)
    } else if !image.digest.is_empty() {
        Ok(format!("{}@{}", image.repository, image.digest))
    } else if !image.tag.is_empty() {
        Ok(format!("{}:{}", image.repository, image.tag))
    } else {
        Err(SettingsError::NoImageVersion)
    }
}

impl Sidecar {
    /// The container, as `lameduck.sidecar` renders it.
    pub fn container(&self) -> Value {
        let s = &self.settings;
        let mut args = vec![
            format!("--listen={}:{}", s.bind_address, s.listen_port),
            format!("--admin-listen={}:{}", s.bind_address, s.admin_port),
            format!("--upstream={}:{}", s.upstream_host, s.upstream_port),
            format!("--mode={}", s.mode),
            format!("--upstream-protocol={}", s.upstream_protocol),
            format!("--drain-delay={}", self.drain_delay),
            format!("--drain-timeout={}", self.drain_timeout),
            format!("--kubernetes={}", s.kubernetes),
            format!("--deadline-margin={}", self.deadline_margin),
            format!("--metrics-linger={}", self.metrics_linger),
            format!("--max-connections={}", s.max_connections),
            format!("--log-level={}", s.log_level),
            format!("--log-format={}", s.log_format),
        ];
        args.extend(s.extra_args.iter().cloned());
        let mut env = vec![
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        ];
        env.extend(s.env.iter().cloned());
        let probe = |path: &str, timings: &Map<String, Value>| {
            let mut probe = timings.clone();
            probe.insert("httpGet".to_owned(), json!({"path": path, "port": "admin"}));
            Value::Object(probe)
        };
        let mut container = json!({
            "name": s.name,
            "image": self.image_ref,
            "imagePullPolicy": s.image.pull_policy,
            "args": args,
            "env": env,
            "ports": [
                {"name": "http", "containerPort": s.listen_port, "protocol": "TCP"},
                {"name": "admin", "containerPort": s.admin_port, "protocol": "TCP"},
            ],
            "readinessProbe": probe("/ready", &s.readiness_probe),
            "livenessProbe": probe("/live", &s.liveness_probe),
        });
        let fields = container
            .as_object_mut()
            .expect("a JSON object literal is an object");
        if !s.startup_probe.is_empty() {
            fields.insert("startupProbe".to_owned(), probe("/live", &s.startup_probe));
        }
        if s.native_sidecar {
            // Started before the app containers, sent SIGTERM only after they
            // have all exited; so its own preStop hook starts the drain.
            fields.insert("restartPolicy".to_owned(), json!("Always"));
            fields.insert(
                "lifecycle".to_owned(),
                json!({"preStop": {"exec": {"command": [
                    "/lameduck", "drain",
                    format!("--admin=127.0.0.1:{}", s.admin_port),
                    "--wait",
                    format!("--timeout={}", self.hook_timeout),
                ]}}}),
            );
        }
        if !s.resources.is_empty() {
            fields.insert("resources".to_owned(), Value::Object(s.resources.clone()));
        }
        if !s.security_context.is_empty() {
            fields.insert(
                "securityContext".to_owned(),
                Value::Object(s.security_context.clone()),
            );
        }
        container
    }

    /// The app container's preStop hook, as `lameduck.appLifecycle` renders
    /// it: the kubelet's GET /drained blocks until lameduck has drained, so
    /// the app is sent SIGTERM only then.
    pub fn app_pre_stop(&self) -> Value {
        json!({"httpGet": {
            "path": format!("/drained?timeout={}", self.hook_timeout),
            "port": self.settings.admin_port,
            "scheme": "HTTP",
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: Value) -> SidecarSettings {
        serde_json::from_value(json).expect("settings")
    }

    #[test]
    fn durations_follow_the_charts_subset() {
        let ms = |t: &str| DurationSetting::text(t).millis("x");
        assert_eq!(ms("25s"), Ok(25_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("30"), Ok(30_000));
        assert_eq!(DurationSetting::Seconds(7).millis("x"), Ok(7_000));
        for bad in ["", "5 s", "1.5s", "5d", "s", "-1s", "99999999999999999999s"] {
            assert!(ms(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_millis(25_000), "25s");
        assert_eq!(format_millis(1_500), "1500ms");
    }

    #[test]
    fn defaults_derive_what_the_chart_derives() {
        let sidecar = settings(json!({"image": {"repository": "lameduck", "tag": "0.1.0"}}))
            .validate()
            .unwrap();
        assert_eq!(sidecar.termination_grace_period_seconds, 30);
        assert_eq!(sidecar.deadline_margin, "1s");
        assert_eq!(sidecar.hook_timeout, "26s");
        let classic = settings(json!({
            "image": {"repository": "lameduck", "tag": "0.1.0"},
            "nativeSidecar": false, "appShutdownSeconds": 7
        }))
        .validate()
        .unwrap();
        assert_eq!(classic.deadline_margin, "7s");
        assert_eq!(classic.termination_grace_period_seconds, 32);
        assert!(classic.container().get("restartPolicy").is_none());
        assert!(classic.container().get("lifecycle").is_none());
    }

    #[test]
    fn probe_settings_merge_key_by_key() {
        let s = settings(json!({"readinessProbe": {"periodSeconds": 3}}));
        assert_eq!(s.readiness_probe["periodSeconds"], 3);
        assert_eq!(s.readiness_probe["failureThreshold"], 1);
        assert_eq!(s.readiness_probe["successThreshold"], 1);
    }

    #[test]
    fn a_startup_probe_only_when_given_timings() {
        let image = json!({"repository": "lameduck", "tag": "0.1.0"});
        let plain = settings(json!({"image": image})).validate().unwrap();
        assert!(plain.container().get("startupProbe").is_none());
        let held = settings(json!({"image": image, "startupProbe": {"periodSeconds": 1}}))
            .validate()
            .unwrap();
        assert_eq!(
            held.container()["startupProbe"],
            json!({"periodSeconds": 1, "httpGet": {"path": "/live", "port": "admin"}})
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |v: Value| settings(v).validate().unwrap_err().to_string();
        let with_image = |mut v: Value| {
            v["image"] = json!({"repository": "r", "tag": "t"});
            v
        };
        assert!(err(with_image(json!({"mode": "udp"}))).contains("mode=\"udp\""));
        assert!(err(with_image(json!({"drainDelay": "30s"}))).contains("drainDelay"));
        assert!(
            err(with_image(json!({"terminationGracePeriodSeconds": 20})))
                .contains("terminationGracePeriodSeconds (20)")
        );
        assert!(err(json!({})).contains("image.repository"));
        assert!(
            serde_json::from_value::<SidecarSettings>(json!({"drainDelaySeconds": 5}))
                .unwrap_err()
                .to_string()
                .contains("drainDelaySeconds")
        );
    }
}
