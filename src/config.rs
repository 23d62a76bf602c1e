//! Command line and environment: clap definitions, parsing of the project's own
//! value types (durations, addresses) and the cross-flag validation.
//!
//! Every error names the flag and the bad value, so the single `error:` line a
//! user sees is enough to fix the problem. Nothing here opens a socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// lameduck: a sidecar proxy that drains without dropping a request.
#[derive(Debug, Parser)]
#[command(
    name = "lameduck",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run(ProxyArgs),
    /// Run a built-in sample app on loopback with the proxy in front of it.
    Demo(ProxyArgs),
    /// Run only the built-in sample app (an upstream for tests and benchmarks).
    DemoApp(DemoAppArgs),
    /// Ask a running lameduck to drain, through its admin port (for preStop hooks).
    Drain(DrainArgs),
    /// Run the sidecar injector: a mutating admission webhook over HTTPS.
    Inject(InjectArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Http,
    Tcp,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// Whether to use the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KubeMode {
    /// Use the API when running in a cluster (or with a kubeconfig) and the
    /// pod's name and namespace are known; otherwise run without it.
    Auto,
    /// Require the configuration and the pod identity; the API being down is
    /// still not fatal.
    On,
    /// Never talk to the API.
    Off,
}

/// What `connect` needs; the lifecycle fills it from the command line and
/// the downward API (`POD_NAME`, `POD_NAMESPACE`).
#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub mode: KubeMode,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// Bound on every API request (the long watch excepted, see `watch.rs`).
    pub api_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    /// An explicit choice wins; otherwise text for a person at a terminal,
    /// JSON for everything that collects logs.
    pub fn resolve(explicit: Option<LogFormat>, stderr_is_terminal: bool) -> LogFormat {
        explicit.unwrap_or(if stderr_is_terminal {
            LogFormat::Text
        } else {
            LogFormat::Json
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessLogFormat {
    Off,
    Json,
    Text,
}

/// The proxy's flags. Each is also read from `LAMEDUCK_<FLAG>`.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Address the proxy listens on.
    #[arg(long, env = "LAMEDUCK_LISTEN", default_value = "0.0.0.0:8000", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,

    /// The app: host:port (a name is resolved once, at start-up).
    #[arg(long, env = "LAMEDUCK_UPSTREAM", default_value = "127.0.0.1:8080", value_parser = parse_upstream)]
    pub upstream: String,

    /// What is proxied: HTTP requests or raw TCP streams.
    #[arg(long, env = "LAMEDUCK_MODE", value_enum, default_value_t = Mode::Http)]
    pub mode: Mode,

    /// Protocol spoken to the app (`http2` is cleartext h2, e.g. for gRPC).
    #[arg(long, env = "LAMEDUCK_UPSTREAM_PROTOCOL", value_enum, default_value_t = UpstreamProtocol::Http1)]
    pub upstream_protocol: UpstreamProtocol,

    /// Address of the admin server (/ready, /live, /metrics, /drain, /drained, /status).
    #[arg(long, env = "LAMEDUCK_ADMIN_LISTEN", default_value = "0.0.0.0:9901", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,

    /// Certificate chain (PEM, leaf first) for TLS on --listen. With
    /// --tls-key, --listen speaks TLS only (HTTP mode: h2 or HTTP/1.1 by
    /// ALPN; TCP mode: cleartext to the app). Reloaded when the file changes
    /// and on SIGHUP.
    #[arg(long, env = "LAMEDUCK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "LAMEDUCK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates: with it, every
    /// client must present a valid one (mTLS); the app gets its identity in
    /// `x-forwarded-client-cert`. Re-read when the file changes and on SIGHUP.
    #[arg(long, env = "LAMEDUCK_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Time a client has to complete the TLS handshake after connecting.
    #[arg(long, env = "LAMEDUCK_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Certificate chain (PEM) for TLS on --admin-listen; the admin port is
    /// cleartext without it (kubelet probes and Prometheus scrape it).
    #[arg(long, env = "LAMEDUCK_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "LAMEDUCK_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,

    /// Lame-duck window after SIGTERM: not ready, but still accepting and
    /// serving. With the Kubernetes API, the upper bound: the window ends
    /// earlier once no EndpointSlice routes to the pod (+ the margin below).
    #[arg(long, env = "LAMEDUCK_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Hard deadline, measured from the start of the drain [default: the
    /// pod's deletionTimestamp or terminationGracePeriodSeconds minus
    /// --deadline-margin, else 25s]. Given explicitly it is an upper bound:
    /// it never lengthens the drain past the pod's SIGKILL.
    #[arg(long, env = "LAMEDUCK_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Use the Kubernetes API for the drain: `auto` when in-cluster config or
    /// a kubeconfig and POD_NAME/POD_NAMESPACE are there, `on` to require it.
    #[arg(long, env = "LAMEDUCK_KUBERNETES", value_enum, default_value_t = KubeMode::Auto)]
    pub kubernetes: KubeMode,

    /// The pod's name (downward API `metadata.name`).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The pod's namespace (downward API `metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// After the pod's endpoints stop serving in the API, time for
    /// kube-proxy, ingress controllers and load balancers to follow.
    #[arg(long, env = "LAMEDUCK_ENDPOINT_PROPAGATION_MARGIN", default_value = "2s", value_parser = parse_duration)]
    pub endpoint_propagation_margin: Duration,

    /// How long before the pod's SIGKILL the drain deadline falls: time for
    /// the app to stop after lameduck (classic sidecar), or for lameduck's own
    /// exit (native sidecar, where the app has already gone).
    #[arg(long, env = "LAMEDUCK_DEADLINE_MARGIN", default_value = "2s", value_parser = parse_duration)]
    pub deadline_margin: Duration,

    /// Bound on each Kubernetes API request (the watch excepted).
    #[arg(long, env = "LAMEDUCK_KUBE_API_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub kube_api_timeout: Duration,

    /// After the drain, keep answering /metrics and /ready this long (capped by the deadline).
    #[arg(long, env = "LAMEDUCK_METRICS_LINGER", default_value = "15s", value_parser = parse_duration)]
    pub metrics_linger: Duration,

    /// Connections above this number are closed as soon as they are accepted.
    #[arg(long, env = "LAMEDUCK_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Time a client has to send a complete request head (and the HTTP/2 preface).
    #[arg(long, env = "LAMEDUCK_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A keep-alive connection with no request for this long is closed. Keep it
    /// longer than the idle timeout of whatever sends traffic to lameduck.
    #[arg(long, env = "LAMEDUCK_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A TCP-mode stream or WebSocket tunnel with no byte in either direction
    /// for this long is closed (Envoy's TCP proxy default).
    #[arg(long, env = "LAMEDUCK_TUNNEL_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Longest pause between two reads of a request body (nginx's
    /// client_body_timeout); the client gets a 408 and the app connection
    /// that had part of the body is closed.
    #[arg(long, env = "LAMEDUCK_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Longest a write to a client may block (a client that stops reading a
    /// response; nginx's send_timeout); the connection is then closed.
    #[arg(long, env = "LAMEDUCK_SEND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub send_timeout: Duration,

    /// Time allowed to open a TCP connection to the app.
    #[arg(long, env = "LAMEDUCK_UPSTREAM_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Time allowed for the app's response headers (504 after).
    #[arg(long, env = "LAMEDUCK_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Log format [default: text when stderr is a terminal, json otherwise
    /// (containers, CI, log shippers)].
    #[arg(long, env = "LAMEDUCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG is used when this is not given.
    #[arg(long, env = "LAMEDUCK_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// A file holding the log filter, re-read on SIGHUP (e.g. mounted from a ConfigMap).
    #[arg(long, env = "LAMEDUCK_LOG_LEVEL_FILE")]
    pub log_level_file: Option<PathBuf>,

    /// Access log: one line per request (per connection in TCP mode) after
    /// its response ends, in JSON or text; on stderr with the other logs
    /// unless --access-log-file is given. Fields: README "Access log".
    #[arg(long, env = "LAMEDUCK_ACCESS_LOG", value_enum, default_value_t = AccessLogFormat::Off)]
    pub access_log: AccessLogFormat,

    /// Write the access log to this file (appended, created if missing) instead of stderr.
    #[arg(long, env = "LAMEDUCK_ACCESS_LOG_FILE")]
    pub access_log_file: Option<PathBuf>,

    /// Keep the query string in the access log's path (it often carries
    /// tokens or personal data, so it is left out by default).
    #[arg(long, env = "LAMEDUCK_ACCESS_LOG_QUERY")]
    pub access_log_query: bool,

    /// Share of new traces (requests without a valid `traceparent`) marked
    /// sampled, from 0 to 1. A request with a valid `traceparent` keeps the
    /// caller's decision. 1 % by default: the app and the collector see every
    /// hundredth root request, which bounds their cost on a busy replica.
    #[arg(long, env = "LAMEDUCK_TRACE_SAMPLE_RATIO", default_value_t = 0.01)]
    pub trace_sample_ratio: f64,

    /// Send OpenTelemetry spans (one per sampled request, one per drain) to
    /// this OTLP/HTTP collector, e.g. http://otel-collector:4318 (the path
    /// /v1/traces is added when none is given). Cleartext: point it at a
    /// collector or agent on the node or in the pod.
    #[arg(long, env = "LAMEDUCK_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Threads serving traffic; 0 means one per CPU available to the process
    /// (its affinity and cgroup CPU limit). With one, a single-threaded runtime.
    #[arg(long, env = "LAMEDUCK_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl ProxyArgs {
    /// The number of runtime threads `--worker-threads` asks for.
    pub fn resolved_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoAppArgs {
    /// Address the sample app listens on.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Admin address of the running lameduck.
    #[arg(long, env = "LAMEDUCK_DRAIN_ADMIN", default_value = "127.0.0.1:9901", value_parser = parse_socket_addr)]
    pub admin: SocketAddr,

    /// Block until the drain has completed.
    #[arg(long)]
    pub wait: bool,

    /// How long --wait waits at most.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `lameduck inject`'s flags: the webhook listener, its certificate, the
/// sidecar settings, and the drain and logging flags it shares with the
/// proxy (the injector is itself a Deployment that must roll without failing
/// an admission).
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Address of the HTTPS webhook listener (POST /mutate).
    #[arg(long, env = "LAMEDUCK_LISTEN", default_value = "0.0.0.0:8443", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,

    /// Address of the admin server (/ready, /live, /metrics, /drain, /drained, /status).
    #[arg(long, env = "LAMEDUCK_ADMIN_LISTEN", default_value = "0.0.0.0:9901", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain of the webhook listener (reloaded when the file changes).
    #[arg(long, env = "LAMEDUCK_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of the webhook listener.
    #[arg(long, env = "LAMEDUCK_TLS_KEY")]
    pub tls_key: PathBuf,

    /// JSON file with the sidecar's settings (the chart's `lameduck` values:
    /// image, nativeSidecar, drainDelay, ...); missing keys take the chart's defaults.
    #[arg(long, env = "LAMEDUCK_SIDECAR_CONFIG")]
    pub sidecar_config: PathBuf,

    /// Lame-duck window (see `lameduck run --help`).
    #[arg(long, env = "LAMEDUCK_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Hard deadline from the start of the drain [default: from the pod, else 25s].
    #[arg(long, env = "LAMEDUCK_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Use the Kubernetes API for the drain (auto | on | off).
    #[arg(long, env = "LAMEDUCK_KUBERNETES", value_enum, default_value_t = KubeMode::Auto)]
    pub kubernetes: KubeMode,

    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// After the drain, keep answering /metrics this long (capped by the deadline).
    #[arg(long, env = "LAMEDUCK_METRICS_LINGER", default_value = "5s", value_parser = parse_duration)]
    pub metrics_linger: Duration,

    /// Webhook connections above this number are closed at accept.
    #[arg(long, env = "LAMEDUCK_MAX_CONNECTIONS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Log format [default: text on a terminal, json otherwise].
    #[arg(long, env = "LAMEDUCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG when not given.
    #[arg(long, env = "LAMEDUCK_LOG_LEVEL")]
    pub log_level: Option<String>,
}

impl InjectArgs {
    /// The lifecycle's configuration for the webhook. The proxy-only fields
    /// (upstream, mode, body and tunnel timeouts, access log) keep the
    /// proxy's defaults and are not used: the lifecycle builds no upstream
    /// and no proxy context for the webhook.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        // The proxy's defaults (and LAMEDUCK_* environment), then the
        // injector's own values on top.
        let mut proxy = Cli::try_parse_from(["lameduck"])
            .map_err(|e| ConfigError::Environment(e.to_string().trim().to_owned()))?
            .proxy;
        proxy.listen = self.listen;
        proxy.admin_listen = self.admin_listen;
        proxy.drain_delay = self.drain_delay;
        proxy.drain_timeout = self.drain_timeout;
        proxy.kubernetes = self.kubernetes;
        proxy.pod_name = self.pod_name;
        proxy.pod_namespace = self.pod_namespace;
        proxy.metrics_linger = self.metrics_linger;
        proxy.max_connections = self.max_connections;
        proxy.log_format = self.log_format;
        proxy.log_level = self.log_level;
        proxy.log_level_file = None;
        proxy.worker_threads = 1;
        // The webhook's certificate is its own (--tls-cert above, the same
        // variables): not a TLS proxy listener as well.
        (proxy.tls_cert, proxy.tls_key, proxy.tls_client_ca) = (None, None, None);
        proxy.into_config()
    }
}

/// The deadline when neither --drain-timeout nor the pod says otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// The validated proxy configuration the rest of the program works with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// What the user wrote, for logs and the Host fallback.
    pub upstream_name: String,
    pub mode: Mode,
    pub upstream_protocol: UpstreamProtocol,
    pub admin_listen: SocketAddr,
    pub drain_delay: Duration,
    /// The fallback deadline (--drain-timeout, or 25s).
    pub drain_timeout: Duration,
    /// --drain-timeout was given: an upper bound on any deadline.
    pub drain_timeout_explicit: bool,
    pub kube: KubeSettings,
    pub endpoint_propagation_margin: Duration,
    pub deadline_margin: Duration,
    pub metrics_linger: Duration,
    pub max_connections: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub send_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub access_log: AccessLogFormat,
    pub access_log_file: Option<PathBuf>,
    pub access_log_query: bool,
    pub trace_sample_ratio: f64,
    pub otlp_endpoint: Option<String>,
    /// TLS on --listen (--tls-cert, --tls-key, --tls-client-ca).
    pub tls: Option<TlsSettings>,
    /// TLS on --admin-listen (--admin-tls-cert, --admin-tls-key).
    pub admin_tls: Option<TlsSettings>,
    pub tls_handshake_timeout: Duration,
}

/// Files of one TLS listener, as given; read and checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--drain-timeout ({timeout}) must not be smaller than --drain-delay ({delay})")]
    DeadlineBeforeWindow { timeout: String, delay: String },
    #[error("--{flag} must be greater than zero")]
    ZeroDuration { flag: &'static str },
    #[error("--upstream {name:?} could not be resolved: {reason}")]
    UnresolvableUpstream { name: String, reason: String },
    #[error("the environment: {0}")]
    Environment(String),
    #[error("--listen and --admin-listen are the same address ({0})")]
    SameListenAddress(SocketAddr),
    #[error("--trace-sample-ratio {0} is not a ratio from 0 to 1 (e.g. 0.01 for 1 %)")]
    SampleRatio(f64),
    #[error("--access-log-file {0} is given but --access-log is off")]
    AccessLogFileWithoutLog(PathBuf),
    #[error(
        "--otlp-endpoint {0:?} is not an http:// URL with a host (e.g. http://otel-collector:4318)"
    )]
    OtlpEndpoint(String),
    #[error("{given} needs {missing} too")]
    IncompleteTls {
        given: &'static str,
        missing: &'static str,
    },
}

/// The TLS files of one listener, complete or absent.
fn tls_pair(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    (cert_flag, key_flag): (&'static str, &'static str),
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::IncompleteTls {
            given: cert_flag,
            missing: key_flag,
        }),
        (None, Some(_)) => Err(ConfigError::IncompleteTls {
            given: key_flag,
            missing: cert_flag,
        }),
    }
}

impl ProxyArgs {
    /// Validates the flags that depend on each other and resolves the upstream.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let drain_timeout = self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        if drain_timeout < self.drain_delay {
            return Err(ConfigError::DeadlineBeforeWindow {
                timeout: humantime::format_duration(drain_timeout).to_string(),
                delay: humantime::format_duration(self.drain_delay).to_string(),
            });
        }
        for (flag, value) in [
            ("drain-timeout", drain_timeout),
            ("kube-api-timeout", self.kube_api_timeout),
            ("header-read-timeout", self.header_read_timeout),
            ("idle-timeout", self.idle_timeout),
            ("tunnel-idle-timeout", self.tunnel_idle_timeout),
            ("body-read-timeout", self.body_read_timeout),
            ("send-timeout", self.send_timeout),
            ("upstream-connect-timeout", self.upstream_connect_timeout),
            ("upstream-timeout", self.upstream_timeout),
            ("tls-handshake-timeout", self.tls_handshake_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { flag });
            }
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(ConfigError::SameListenAddress(self.listen));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(ConfigError::SampleRatio(self.trace_sample_ratio));
        }
        if let (AccessLogFormat::Off, Some(path)) = (self.access_log, &self.access_log_file) {
            return Err(ConfigError::AccessLogFileWithoutLog(path.clone()));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: Option<http::Uri> = endpoint.parse().ok();
            if uri.is_none_or(|u| u.scheme_str() != Some("http") || u.host().is_none()) {
                return Err(ConfigError::OtlpEndpoint(endpoint.clone()));
            }
        }
        let tls = tls_pair(self.tls_cert, self.tls_key, ("--tls-cert", "--tls-key"))?;
        if self.tls_client_ca.is_some() && tls.is_none() {
            return Err(ConfigError::IncompleteTls {
                given: "--tls-client-ca",
                missing: "--tls-cert and --tls-key",
            });
        }
        let admin_tls = tls_pair(
            self.admin_tls_cert,
            self.admin_tls_key,
            ("--admin-tls-cert", "--admin-tls-key"),
        )?;
        let upstream = resolve_upstream(&self.upstream)?;
        Ok(Config {
            listen: self.listen,
            upstream,
            upstream_name: self.upstream,
            mode: self.mode,
            upstream_protocol: self.upstream_protocol,
            admin_listen: self.admin_listen,
            drain_delay: self.drain_delay,
            drain_timeout,
            drain_timeout_explicit: self.drain_timeout.is_some(),
            kube: KubeSettings {
                mode: self.kubernetes,
                pod_name: self.pod_name,
                pod_namespace: self.pod_namespace,
                api_timeout: self.kube_api_timeout,
            },
            endpoint_propagation_margin: self.endpoint_propagation_margin,
            deadline_margin: self.deadline_margin,
            metrics_linger: self.metrics_linger,
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            tunnel_idle_timeout: self.tunnel_idle_timeout,
            body_read_timeout: self.body_read_timeout,
            send_timeout: self.send_timeout,
            upstream_connect_timeout: self.upstream_connect_timeout,
            upstream_timeout: self.upstream_timeout,
            access_log: self.access_log,
            access_log_file: self.access_log_file,
            access_log_query: self.access_log_query,
            trace_sample_ratio: self.trace_sample_ratio,
            otlp_endpoint: self.otlp_endpoint,
            tls: tls.map(|(cert, key)| TlsSettings {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            admin_tls: admin_tls.map(|(cert, key)| TlsSettings {
                cert,
                key,
                client_ca: None,
            }),
            tls_handshake_timeout: self.tls_handshake_timeout,
        })
    }
}

fn resolve_upstream(name: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = name.parse() {
        return Ok(addr);
    }
    let unresolvable = |reason: String| ConfigError::UnresolvableUpstream {
        name: name.to_owned(),
        reason,
    };
    let mut addrs = name
        .to_socket_addrs()
        .map_err(|e| unresolvable(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| unresolvable("no address found".to_owned()))
}

/// Parses a duration in humantime form (`500ms`, `5s`, `1m30s`). A bare number
/// is refused rather than guessed: `5` could mean seconds or milliseconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("empty duration; use e.g. 500ms, 5s, 1m".to_owned());
    }
    if value.bytes().all(|b| b.is_ascii_digit()) && value != "0" {
        return Err(format!(
            "{value:?} has no unit; use e.g. {value}s or {value}ms"
        ));
    }
    humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration ({e}); use e.g. 500ms, 5s, 1m"))
}

/// Parses `ip:port` (IPv6 in brackets). Host names are refused here: listeners
/// bind to addresses, and a name that resolves to several would be ambiguous.
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.trim().parse().map_err(|_| {
        format!("{value:?} is not an address; use ip:port, e.g. 0.0.0.0:8000 or [::1]:8000")
    })
}

/// Accepts `host:port` where host is an IP or a DNS name; the port is required.
pub fn parse_upstream(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.parse::<SocketAddr>().is_ok() {
        return Ok(value.to_owned());
    }
    let bad = || format!("{value:?} is not host:port, e.g. 127.0.0.1:8080 or app:8080");
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']', ':']) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn addresses_are_ip_and_port() {
        assert!(parse_socket_addr("127.0.0.1:8000").is_ok());
        assert!(parse_socket_addr("[::1]:80").is_ok());
        assert!(parse_socket_addr("localhost:80").is_err());
        assert!(parse_socket_addr("127.0.0.1").is_err());
        assert!(parse_upstream("app:8080").is_ok());
        assert!(parse_upstream("app").is_err());
        assert!(parse_upstream("app:http").is_err());
        assert!(parse_upstream(":80").is_err());
    }

    #[test]
    fn deadline_must_cover_the_window() {
        let cli = Cli::parse_from(["lameduck", "--drain-delay", "10s", "--drain-timeout", "5s"]);
        let err = cli.proxy.into_config().unwrap_err().to_string();
        assert!(err.contains("--drain-timeout"), "{err}");
    }

    #[test]
    fn the_sample_ratio_is_a_ratio() {
        for bad in ["1.5", "-0.1", "NaN"] {
            let flag = format!("--trace-sample-ratio={bad}");
            let cli = Cli::parse_from(["lameduck", flag.as_str()]);
            let err = cli.proxy.into_config().unwrap_err().to_string();
            assert!(err.contains("--trace-sample-ratio"), "{err}");
        }
        for bad in ["https://c:4318", "c:4318", "http://"] {
            let cli = Cli::parse_from(["lameduck", "--otlp-endpoint", bad]);
            let err = cli.proxy.into_config().unwrap_err().to_string();
            assert!(err.contains("--otlp-endpoint"), "{bad}: {err}");
        }
        let cli = Cli::parse_from(["lameduck", "--access-log-file", "/tmp/x"]);
        let err = cli.proxy.into_config().unwrap_err().to_string();
        assert!(err.contains("--access-log"), "{err}");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn duration_parsing_never_panics(input in "\\PC{0,40}") {
                let _ = parse_duration(&input);
            }

            #[test]
            fn durations_round_trip(ms in 0u64..10_000_000_000) {
                let d = Duration::from_millis(ms);
                let text = humantime::format_duration(d).to_string();
                prop_assert_eq!(parse_duration(&text), Ok(d));
            }

            #[test]
            fn address_parsing_never_panics(input in "\\PC{0,60}") {
                let _ = parse_socket_addr(&input);
                let _ = parse_upstream(&input);
            }

            #[test]
            fn addresses_round_trip(addr in any::<SocketAddr>()) {
                // Display drops an IPv6 flowinfo, so compare what a user can write.
                let text = addr.to_string();
                prop_assert_eq!(parse_socket_addr(&text).map(|a| a.to_string()), Ok(text));
                prop_assert!(parse_upstream(&addr.to_string()).is_ok());
            }

            #[test]
            fn upstream_names_with_ports_are_accepted(host in "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,10}){0,3}", port in any::<u16>()) {
                let value = format!("{host}:{port}");
                prop_assert_eq!(parse_upstream(&value), Ok(value.clone()));
            }
        }
    }
}
