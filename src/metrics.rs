//! The Prometheus registry and pre-resolved metric handles.
//!
//! Every labelled series the hot path touches is resolved once, here, into a
//! plain handle (an `Arc` around an atomic): recording a request is a few
//! atomic adds and never a map look-up. Nothing in this module allocates per
//! request or takes a lock the hot path waits on, except the histogram's
//! short, uncontended-in-practice write lock inside prometheus-client.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// prometheus-client writes OpenMetrics; Prometheus asks for it by `Accept`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, for everything else (curl, promtool, older scrapers).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Protocol of a downstream connection, the `protocol` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1 = 0,
    Http2 = 1,
    Tcp = 2,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Http1, Protocol::Http2, Protocol::Tcp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Why a request to the app failed, the `kind` label of `upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The TCP connection was refused or failed.
    Connect = 0,
    ConnectTimeout = 1,
    /// No response headers within --upstream-timeout.
    Timeout = 2,
    /// The app closed or reset the connection mid-exchange.
    Closed = 3,
    /// The app spoke something that is not valid HTTP.
    Protocol = 4,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Closed,
        UpstreamErrorKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Closed => "closed",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// A per-connection timeout that cut a connection, the `kind` label of `timeouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// --header-read-timeout: a request head took too long to arrive.
    HeaderRead = 0,
    /// --idle-timeout: no request on a keep-alive connection.
    Idle = 1,
    /// --body-read-timeout: no byte of a request body for that long.
    BodyRead = 2,
    /// --send-timeout: a write to the client blocked for that long.
    Send = 3,
}

impl TimeoutKind {
    const ALL: [TimeoutKind; 4] = [
        TimeoutKind::HeaderRead,
        TimeoutKind::Idle,
        TimeoutKind::BodyRead,
        TimeoutKind::Send,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::HeaderRead => "header_read",
            TimeoutKind::Idle => "idle",
            TimeoutKind::BodyRead => "body_read",
            TimeoutKind::Send => "send",
        }
    }
}

/// A call to the Kubernetes API, the `op` label of `kubernetes_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeOp {
    /// Loading the client configuration (in-cluster or kubeconfig).
    Config = 0,
    GetPod = 1,
    ListEndpointSlices = 2,
    WatchEndpointSlices = 3,
    CreateEvent = 4,
}

impl KubeOp {
    const ALL: [KubeOp; 5] = [
        KubeOp::Config,
        KubeOp::GetPod,
        KubeOp::ListEndpointSlices,
        KubeOp::WatchEndpointSlices,
        KubeOp::CreateEvent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KubeOp::Config => "config",
            KubeOp::GetPod => "get_pod",
            KubeOp::ListEndpointSlices => "list_endpointslices",
            KubeOp::WatchEndpointSlices => "watch_endpointslices",
            KubeOp::CreateEvent => "create_event",
        }
    }
}

/// Why the lame-duck window ended, the `reason` label of `drain_window_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowEnd {
    /// Every EndpointSlice that listed the pod stopped routing to it (+ margin).
    EndpointsRemoved = 0,
    /// The pod was in no EndpointSlice when the drain started (+ margin).
    NoEndpoints = 1,
    /// --drain-delay elapsed first.
    DelayElapsed = 2,
    /// The API could not tell; the fixed --drain-delay applied.
    ApiUnavailable = 3,
}

impl WindowEnd {
    const ALL: [WindowEnd; 4] = [
        WindowEnd::EndpointsRemoved,
        WindowEnd::NoEndpoints,
        WindowEnd::DelayElapsed,
        WindowEnd::ApiUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WindowEnd::EndpointsRemoved => "endpoints_removed",
            WindowEnd::NoEndpoints => "no_endpoints",
            WindowEnd::DelayElapsed => "delay_elapsed",
            WindowEnd::ApiUnavailable => "api_unavailable",
        }
    }
}

/// Where the drain deadline came from, the `source` label of
/// `drain_deadline_timestamp_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineSource {
    /// The pod's `metadata.deletionTimestamp` minus the safety margin.
    DeletionTimestamp = 0,
    /// `spec.terminationGracePeriodSeconds` from the drain start, minus the margin.
    GracePeriod = 1,
    /// --drain-timeout from the drain start.
    DrainTimeout = 2,
    /// The deletion's `deletionGracePeriodSeconds` from when the kubelet
    /// began stopping the pod, minus the margin: later than the
    /// deletionTimestamp when the kubelet was slow to act on the deletion.
    DeletionGracePeriod = 3,
}

impl DeadlineSource {
    const ALL: [DeadlineSource; 4] = [
        DeadlineSource::DeletionTimestamp,
        DeadlineSource::GracePeriod,
        DeadlineSource::DrainTimeout,
        DeadlineSource::DeletionGracePeriod,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineSource::DeletionTimestamp => "deletion_timestamp",
            DeadlineSource::GracePeriod => "grace_period",
            DeadlineSource::DrainTimeout => "drain_timeout",
            DeadlineSource::DeletionGracePeriod => "deletion_grace_period",
        }
    }
}

/// A listener that terminates TLS, the `listener` label of the `tls_*` series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsListener {
    /// `--listen`, with `--tls-cert`/`--tls-key`.
    Proxy = 0,
    /// `--admin-listen`, with `--admin-tls-cert`/`--admin-tls-key`.
    Admin = 1,
    /// The admission webhook of `lameduck inject`.
    Webhook = 2,
}

impl TlsListener {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsListener::Proxy => "proxy",
            TlsListener::Admin => "admin",
            TlsListener::Webhook => "webhook",
        }
    }
}

/// Why a TLS handshake failed, the `reason` label of `tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within the handshake timeout.
    Timeout = 0,
    /// The client sent cleartext HTTP to the TLS port.
    PlaintextHttp = 1,
    /// The client offered only SSLv3, TLS 1.0 or TLS 1.1.
    ProtocolVersion = 2,
    /// Nothing else in common: cipher suites, groups, signature schemes, ALPN.
    Incompatible = 3,
    /// mTLS: no client certificate, or one that does not verify.
    ClientCertificate = 4,
    /// The client aborted with an alert (e.g. it does not trust our certificate).
    PeerAlert = 5,
    /// Bytes that are not a well-formed TLS handshake.
    Malformed = 6,
    /// The client closed or reset the connection mid-handshake.
    Closed = 7,
    Other = 8,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::PlaintextHttp,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::Incompatible,
        HandshakeFailure::ClientCertificate,
        HandshakeFailure::PeerAlert,
        HandshakeFailure::Malformed,
        HandshakeFailure::Closed,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::PlaintextHttp => "plaintext_http",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::PeerAlert => "peer_alert",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Other => "other",
        }
    }
}

/// The pre-resolved `tls_*` series of one listener (see [`Metrics::tls`]).
/// Cloning shares the series.
#[derive(Debug, Clone)]
pub struct TlsMetrics {
    pub listener: TlsListener,
    /// notAfter of the certificate being served, Unix seconds.
    pub certificate_expiry: Gauge<f64, AtomicU64>,
    pub reloads_success: Counter,
    pub reloads_failure: Counter,
    handshake_failures: [Counter; 9],
    pub handshakes_in_progress: Gauge,
    pub handshakes_full: Counter,
    pub handshakes_resumed: Counter,
}

impl TlsMetrics {
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].inc();
    }

    pub fn handshake_failures(&self, reason: HandshakeFailure) -> u64 {
        self.handshake_failures[reason as usize].get()
    }
}

/// The families behind [`TlsMetrics`]: a listener's series appear only once
/// it is TLS-enabled, so an expiry alert never sees a 0 for a cleartext port.
struct TlsFamilies {
    expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    reloads: Family<Labels2, Counter>,
    handshake_failures: Family<Labels2, Counter>,
    in_progress: Family<Labels, Gauge>,
    handshakes: Family<Labels2, Counter>,
}

impl TlsFamilies {
    fn register(registry: &mut Registry) -> Self {
        let families = TlsFamilies {
            expiry: Family::default(),
            reloads: Family::default(),
            handshake_failures: Family::default(),
            in_progress: Family::default(),
            handshakes: Family::default(),
        };
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate being served, Unix time",
            families.expiry.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS certificate and client CA loads after start-up (file change or SIGHUP), by result",
            families.reloads.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that did not complete, by reason",
            families.handshake_failures.clone(),
        );
        registry.register(
            "tls_handshakes_in_progress",
            "TLS handshakes started and not yet finished",
            families.in_progress.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed, by session (new or resumed)",
            families.handshakes.clone(),
        );
        families
    }

    fn resolve(&self, listener: TlsListener) -> TlsMetrics {
        let name = ("listener", listener.as_str());
        // One statement per series: `get_or_create` returns a read guard,
        // and two of them alive in one expression deadlock the family's
        // lock when the second one has to insert.
        let with = |family: &Family<Labels2, Counter>, key, value| -> Counter {
            family.get_or_create(&[name, (key, value)]).clone()
        };
        let handshake_failures = HandshakeFailure::ALL
            .map(|reason| with(&self.handshake_failures, "reason", reason.as_str()));
        let reloads_success = with(&self.reloads, "result", "success");
        let reloads_failure = with(&self.reloads, "result", "failure");
        let handshakes_full = with(&self.handshakes, "session", "new");
        let handshakes_resumed = with(&self.handshakes, "session", "resumed");
        let certificate_expiry = self.expiry.get_or_create(&[name]).clone();
        let handshakes_in_progress = self.in_progress.get_or_create(&[name]).clone();
        TlsMetrics {
            listener,
            certificate_expiry,
            reloads_success,
            reloads_failure,
            handshake_failures,
            handshakes_in_progress,
            handshakes_full,
            handshakes_resumed,
        }
    }
}

/// The lifecycle states, in order; the `state` label.
pub const STATE_NAMES: [&str; 4] = ["starting", "serving", "draining", "drained"];

pub struct Metrics {
    registry: Registry,
    connections_active: [Gauge; 3],
    connections_total: [Counter; 3],
    pub connections_rejected: Counter,
    pub requests_in_flight: Gauge,
    /// Indexed by status / 100 - 1 (1xx .. 5xx).
    requests_by_class: [Counter; 5],
    pub request_duration: Histogram,
    upstream_errors: [Counter; 5],
    pub upgrades_active: Gauge,
    pub draining: Gauge,
    state: [Gauge; 4],
    pub drain_started_timestamp: Gauge<f64, AtomicU64>,
    pub drain_duration: Gauge<f64, AtomicU64>,
    pub drain_closed_graceful: Counter,
    pub drain_closed_forced: Counter,
    timeouts: [Counter; 4],
    kubernetes_errors: [Counter; 5],
    pub endpoints_serving: Gauge,
    window_end: [Gauge; 4],
    drain_deadline: [Gauge<f64, AtomicU64>; 4],
    tls: TlsFamilies,
    pub access_log_dropped: Counter,
    /// exported, failed, dropped.
    pub otlp_spans: [Counter; 3],
}

/// Registers a family with one label and returns the handle of each value, in order.
fn labelled<M, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [M; N]
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Clone
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<Labels, M>::default();
    registry.register(name, help, family.clone());
    values.map(|value| family.get_or_create(&[(label, value)]).clone())
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lameduck");
        let connections_active = labelled(
            &mut registry,
            "connections_active",
            "Open downstream connections, including upgraded ones",
            "protocol",
            Protocol::ALL.map(Protocol::as_str),
        );
        let connections_total = labelled(
            &mut registry,
            "connections",
            "Downstream connections accepted",
            "protocol",
            Protocol::ALL.map(Protocol::as_str),
        );
        let connections_rejected = Counter::default();
        registry.register(
            "connections_rejected",
            "Connections closed at accept because --max-connections was reached",
            connections_rejected.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests received and not yet fully answered",
            requests_in_flight.clone(),
        );
        let requests_by_class = labelled(
            &mut registry,
            "requests",
            "Requests answered, by status class",
            "code",
            ["1xx", "2xx", "3xx", "4xx", "5xx"],
        );
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            request_duration.clone(),
        );
        let upstream_errors = labelled(
            &mut registry,
            "upstream_errors",
            "Failed exchanges with the app",
            "kind",
            UpstreamErrorKind::ALL.map(UpstreamErrorKind::as_str),
        );
        let upgrades_active = Gauge::default();
        registry.register(
            "upgrades_active",
            "Upgraded (e.g. WebSocket) tunnels open",
            upgrades_active.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 from the start of the drain on",
            draining.clone(),
        );
        let state = labelled(
            &mut registry,
            "state",
            "1 for the current lifecycle state",
            "state",
            STATE_NAMES,
        );
        let drain_started_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_started_timestamp_seconds",
            "Unix time the drain started (0 before)",
            drain_started_timestamp.clone(),
        );
        let drain_duration = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_duration_seconds",
            "Seconds from drain start to the last connection closing (0 until drained)",
            drain_duration.clone(),
        );
        let [drain_closed_graceful, drain_closed_forced] = labelled(
            &mut registry,
            "drain_connections_closed",
            "Connections that ended during the drain",
            "how",
            ["graceful", "forced"],
        );
        let timeouts = labelled(
            &mut registry,
            "timeouts",
            "Connections cut by a per-connection timeout",
            "kind",
            TimeoutKind::ALL.map(TimeoutKind::as_str),
        );
        let kubernetes_errors = labelled(
            &mut registry,
            "kubernetes_errors",
            "Failed Kubernetes API calls (the drain falls back to its fixed window and deadline)",
            "op",
            KubeOp::ALL.map(KubeOp::as_str),
        );
        let endpoints_serving = Gauge::default();
        registry.register(
            "endpoints_serving",
            "EndpointSlices still routing to this pod, while the drain watches them",
            endpoints_serving.clone(),
        );
        let window_end = labelled(
            &mut registry,
            "drain_window_end",
            "1 for the reason the lame-duck window ended (all 0 before)",
            "reason",
            WindowEnd::ALL.map(WindowEnd::as_str),
        );
        let drain_deadline = labelled(
            &mut registry,
            "drain_deadline_timestamp_seconds",
            "Unix time of the drain's hard deadline, under the source it came from (0 before the drain)",
            "source",
            DeadlineSource::ALL.map(DeadlineSource::as_str),
        );
        let tls = TlsFamilies::register(&mut registry);
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer's queue was full (or writing failed)",
            access_log_dropped.clone(),
        );
        let otlp_spans = labelled(
            &mut registry,
            "otlp_spans",
            "Spans for --otlp-endpoint: exported, failed (collector unreachable or refusing), dropped (queue full)",
            "result",
            ["exported", "failed", "dropped"],
        );
        let build_info = Family::<Labels, Gauge>::default();
        registry.register("build_info", "Build information", build_info.clone());
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);

        Metrics {
            registry,
            connections_active,
            connections_total,
            connections_rejected,
            requests_in_flight,
            requests_by_class,
            request_duration,
            upstream_errors,
            upgrades_active,
            draining,
            state,
            drain_started_timestamp,
            drain_duration,
            drain_closed_graceful,
            drain_closed_forced,
            timeouts,
            kubernetes_errors,
            endpoints_serving,
            window_end,
            drain_deadline,
            tls,
            access_log_dropped,
            otlp_spans,
        }
    }

    /// The `tls_*` series of one listener, created on first use; call it once
    /// per listener at start-up and keep the handles.
    pub fn tls(&self, listener: TlsListener) -> TlsMetrics {
        self.tls.resolve(listener)
    }

    pub fn timed_out(&self, kind: TimeoutKind) {
        self.timeouts[kind as usize].inc();
    }

    /// The counter of one timeout kind, for code that holds no `Metrics`.
    pub fn timeout_counter(&self, kind: TimeoutKind) -> Counter {
        self.timeouts[kind as usize].clone()
    }

    pub fn kubernetes_error(&self, op: KubeOp) {
        self.kubernetes_errors[op as usize].inc();
    }

    pub fn set_window_end(&self, reason: WindowEnd) {
        for (i, gauge) in self.window_end.iter().enumerate() {
            gauge.set(i64::from(i == reason as usize));
        }
    }

    /// Publishes the deadline under its source; the other sources read 0.
    pub fn set_drain_deadline(&self, source: DeadlineSource, unix_seconds: f64) {
        for (i, gauge) in self.drain_deadline.iter().enumerate() {
            gauge.set(if i == source as usize {
                unix_seconds
            } else {
                0.0
            });
        }
    }

    pub fn connections_active(&self, protocol: Protocol) -> &Gauge {
        &self.connections_active[protocol as usize]
    }

    pub fn connection_opened(&self, protocol: Protocol) {
        self.connections_total[protocol as usize].inc();
        self.connections_active[protocol as usize].inc();
    }

    pub fn request_finished(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests_by_class[class].inc();
        self.request_duration.observe(seconds);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    pub fn set_state(&self, index: usize) {
        for (i, gauge) in self.state.iter().enumerate() {
            gauge.set(i64::from(i == index));
        }
    }

    /// For the parts only some commands run (the webhook's figures), which
    /// register their own families before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The whole registry in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Encodes for a scraper's `Accept` header: (content type, body).
    pub fn encode_for(&self, accept: Option<&str>) -> (&'static str, String) {
        let openmetrics = self.encode();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS_CONTENT_TYPE, openmetrics)
        } else {
            (TEXT_CONTENT_TYPE, openmetrics_to_text(&openmetrics))
        }
    }
}

/// Rewrites OpenMetrics text as the classic (0.0.4) format: a counter family
/// is named with its `_total` suffix in HELP and TYPE, and the OpenMetrics-only
/// `# EOF` and `# UNIT` lines go. Sample lines are the same in both formats.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_share_the_registered_series() {
        let metrics = Metrics::new();
        metrics.connection_opened(Protocol::Http2);
        metrics.request_finished(503, 0.01);
        metrics.upstream_error(UpstreamErrorKind::ConnectTimeout);
        let text = metrics.encode();
        assert!(
            text.contains("lameduck_connections_active{protocol=\"http2\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lameduck_requests_total{code=\"5xx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lameduck_upstream_errors_total{kind=\"connect_timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("lameduck_build_info{version="), "{text}");
    }

    #[test]
    fn tls_series_appear_only_for_a_tls_listener() {
        let metrics = Metrics::new();
        assert!(!metrics.encode().contains("listener=\"proxy\""));
        let proxy = metrics.tls(TlsListener::Proxy);
        proxy.handshake_failed(HandshakeFailure::Timeout);
        proxy.reloads_failure.inc();
        proxy.certificate_expiry.set(1.7e9);
        let text = metrics.encode();
        assert!(
            text.contains(
                "lameduck_tls_handshake_failures_total{listener=\"proxy\",reason=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("lameduck_tls_reloads_total{listener=\"proxy\",result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "lameduck_tls_certificate_expiry_timestamp_seconds{listener=\"proxy\"} 1700000000"
            ),
            "{text}"
        );
        assert!(text.contains("lameduck_tls_handshakes_in_progress{listener=\"proxy\"} 0"));
        assert!(!text.contains("listener=\"admin\""), "{text}");
        // Resolving again shares the series.
        assert_eq!(
            metrics
                .tls(TlsListener::Proxy)
                .handshake_failures(HandshakeFailure::Timeout),
            1
        );
    }

    #[test]
    fn classic_text_names_counters_with_their_suffix() {
        let metrics = Metrics::new();
        let (content_type, text) = metrics.encode_for(Some("text/plain"));
        assert_eq!(content_type, TEXT_CONTENT_TYPE);
        assert!(
            text.contains("# TYPE lameduck_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP lameduck_requests_total Requests"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        let (content_type, text) =
            metrics.encode_for(Some("application/openmetrics-text; version=1.0.0"));
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(text.ends_with("# EOF\n"));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn classic_text_keeps_every_sample(lines in proptest::collection::vec("(# (TYPE|HELP|UNIT) [a-z_]{1,8} [a-z ]{0,10}|# EOF|[a-z_]{1,8}(\\{[a-z]=\"[a-z]\"\\})? [0-9]{1,4})", 0..30)) {
                let input = lines.join("\n");
                let output = openmetrics_to_text(&input);
                prop_assert!(!output.lines().any(|l| l == "# EOF" || l.starts_with("# UNIT ")));
                for line in input.lines().filter(|l| !l.starts_with('#')) {
                    prop_assert!(output.lines().any(|o| o == line), "{line} lost");
                }
            }
        }
    }
}
