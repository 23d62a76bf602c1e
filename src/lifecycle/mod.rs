//! The one lifecycle: start-up, the drain timeline and the single way out.
//!
//! `run` owns every long-lived task (signals, admin server, accept loop,
//! connections, upstream probe, upstream pool) and closes them in dependency
//! order: downstream connections, then the upstream pool, then the admin
//! server last. It returns how the drain ended; `main` turns that into the
//! exit status. Nothing else in the program exits the process.

mod deadline;
pub mod signals;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drain::{DrainState, DrainSummary, Event, Outcome, Phase};
use crate::kube::{DrainEvent, EndpointsReleased, Kube, KubeError, PodFacts};
use deadline::{DeadlineFacts, drain_deadline};

use crate::admin::AdminServer;
use crate::config::{AccessLogFormat, Config, Mode, TlsSettings};
use crate::inject::{self, Injector};
use crate::metrics::{DeadlineSource, Metrics, TlsListener, WindowEnd};
use crate::observe::Observer;
use crate::observe::access_log::{self, AccessLog, Destination};
use crate::observe::otlp::{self, SpanCounters, SpanSink, TimelineEvent};
use crate::proxy::{self, ProxyContext, upstream::Upstream};
use crate::telemetry::{LogReloader, ReloadOutcome};
use crate::tls::{
    ALPN_HTTP, CertFiles, CurrentServerConfig, DEFAULT_POLL_INTERVAL, Handshaker, ReloadSignal,
    ReloadableCert, ReloadableClientCa, TlsError,
};
use opentelemetry::KeyValue;
use std::sync::Mutex;

/// How long connection tasks get to notice a forced close.
const FORCE_GRACE: Duration = Duration::from_secs(2);
/// The least time the access-log writer gets to flush at exit.
const FLUSH_AT_LEAST: Duration = Duration::from_millis(200);
/// How long the upstream pool and the admin server get to close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Readiness probe of the app: how often while it is up, and while it is down
/// (a refused connect on loopback costs microseconds; a new pod turns ready
/// within 50 ms of its app listening).
const PROBE_INTERVAL_UP: Duration = Duration::from_secs(1);
const PROBE_INTERVAL_DOWN: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {flag} {addr}: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("--kubernetes on: {0}")]
    Kubernetes(KubeError),
    #[error("cannot open --access-log-file {path}: {source}")]
    AccessLogFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let error = |source| StartError::Bind { flag, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    // A deep backlog absorbs bursts of new connections (and a rolling update
    // moving traffic here) without SYN drops.
    socket.listen(4096).map_err(error)
}

/// Start-up's fallible part: signal handlers first (so a SIGTERM during
/// start-up is a drain, not a crash), then both listeners. Nothing is served
/// yet; an error here leaves nothing half-started.
pub struct Bound {
    signals: signals::OsSignals,
    proxy: TcpListener,
    admin: TcpListener,
    /// The bound addresses (a port 0 in the flags is resolved here).
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where the access log goes, opened here so a bad path fails start-up.
    access_log: Option<Destination>,
    /// Created here: the certificates loaded at start-up (the webhook's
    /// too, by `main`) report into it; `run` shares it.
    pub metrics: Metrics,
    proxy_tls: Option<ListenerTls>,
    admin_tls: Option<ListenerTls>,
}

/// A TLS listener's certificate and client CA bundle (both watched for
/// changes) and handshake.
struct ListenerTls {
    cert: Arc<ReloadableCert>,
    client_ca: Option<Arc<ReloadableClientCa>>,
    handshaker: Handshaker,
}

/// Loads and checks a listener's certificate, key and client CA: a missing,
/// unreadable or mismatched file is a start-up error naming its flag.
fn load_tls(
    settings: &TlsSettings,
    (cert_flag, key_flag): (&'static str, &'static str),
    listener: TlsListener,
    alpn: &[&[u8]],
    config: &Config,
    metrics: &Metrics,
) -> Result<ListenerTls, StartError> {
    let files = CertFiles {
        cert: settings.cert.clone(),
        key: settings.key.clone(),
        cert_flag,
        key_flag,
    };
    let tls_metrics = metrics.tls(listener);
    let cert = ReloadableCert::load(files, tls_metrics.clone())?;
    let client_ca = settings
        .client_ca
        .as_deref()
        .map(|path| {
            ReloadableClientCa::load(
                path,
                "--tls-client-ca",
                cert.clone(),
                alpn,
                tls_metrics.clone(),
            )
        })
        .transpose()?;
    let server_config = match &client_ca {
        Some(ca) => ca.config().clone(),
        None => Arc::new(CurrentServerConfig::new(crate::tls::server_config(
            cert.clone(),
            alpn,
            None,
        )?)),
    };
    let loaded = cert.current();
    tracing::info!(
        listener = listener.as_str(),
        cert = %settings.cert.display(),
        subject = %loaded.subject,
        not_after = loaded.not_after,
        client_certificates = client_ca.is_some(),
        "TLS certificate loaded"
    );
    Ok(ListenerTls {
        cert,
        client_ca,
        handshaker: Handshaker::following(server_config, config.tls_handshake_timeout, tls_metrics),
    })
}

/// Must be called inside the runtime (signal handlers register with it).
pub fn bind_all(config: &Config) -> Result<Bound, StartError> {
    let signals = signals::OsSignals::register().map_err(StartError::Signals)?;
    crate::kube::precheck(&config.kube).map_err(StartError::Kubernetes)?;
    let metrics = Metrics::new();
    // TCP mode relays whatever the client speaks inside TLS: no ALPN.
    let proxy_alpn = match config.mode {
        Mode::Http => ALPN_HTTP,
        Mode::Tcp => &[],
    };
    let proxy_tls = config
        .tls
        .as_ref()
        .map(|tls| {
            let flags = ("--tls-cert", "--tls-key");
            load_tls(tls, flags, TlsListener::Proxy, proxy_alpn, config, &metrics)
        })
        .transpose()?;
    // The admin server speaks HTTP/1.1 only.
    let admin_tls = config
        .admin_tls
        .as_ref()
        .map(|tls| {
            let flags = ("--admin-tls-cert", "--admin-tls-key");
            load_tls(
                tls,
                flags,
                TlsListener::Admin,
                &[b"http/1.1"],
                config,
                &metrics,
            )
        })
        .transpose()?;
    let proxy = bind("--listen", config.listen)?;
    let admin = bind("--admin-listen", config.admin_listen)?;
    let access_log = match config.access_log {
        AccessLogFormat::Off => None,
        _ => Some(
            Destination::open(config.access_log_file.as_ref()).map_err(|source| {
                StartError::AccessLogFile {
                    path: config.access_log_file.clone().unwrap_or_default(),
                    source,
                }
            })?,
        ),
    };
    Ok(Bound {
        access_log,
        metrics,
        proxy_tls,
        admin_tls,
        signals,
        proxy_addr: proxy.local_addr().unwrap_or(config.listen),
        admin_addr: admin.local_addr().unwrap_or(config.admin_listen),
        proxy,
        admin,
    })
}

/// What the listener serves.
pub enum Service {
    /// The proxy, in front of the app (`--upstream`).
    Proxy,
    /// The sidecar injector's admission webhook; there is no app behind it.
    Webhook(Arc<Injector>),
}

/// Runs lameduck until it has drained; returns how the drain ended.
pub async fn run(config: Config, bound: Bound, logs: LogReloader, service: Service) -> Outcome {
    let (events_tx, events) = mpsc::channel(16);
    let signal_task = AbortOnDrop(tokio::spawn(bound.signals.forward(events_tx.clone())));
    let (proxy_listener, admin_listener) = (bound.proxy, bound.admin);
    let (proxy_addr, admin_addr) = (bound.proxy_addr, bound.admin_addr);

    let mut metrics = bound.metrics;
    // Certificate watchers (polled files and SIGHUP), owned here, stopped
    // once the admin server (the last TLS user) is gone.
    let tls_watchers = TaskTracker::new();
    let tls_stop = CancellationToken::new();
    let tls_reload = ReloadSignal::new();
    let mut certificates: Vec<Arc<ReloadableCert>> = [&bound.proxy_tls, &bound.admin_tls]
        .into_iter()
        .flatten()
        .map(|tls| tls.cert.clone())
        .collect();
    if let Service::Webhook(injector) = &service {
        injector.metrics.register(metrics.registry_mut());
        certificates.push(injector.certificate().clone());
    }
    for cert in &certificates {
        tls_watchers.spawn(crate::tls::watch_files(
            cert.clone(),
            tls_reload.subscribe(),
            DEFAULT_POLL_INTERVAL,
            tls_stop.clone(),
        ));
    }
    let client_cas: Vec<Arc<ReloadableClientCa>> = [&bound.proxy_tls, &bound.admin_tls]
        .into_iter()
        .flatten()
        .filter_map(|tls| tls.client_ca.clone())
        .collect();
    for ca in client_cas {
        tls_watchers.spawn(crate::tls::watch_files(
            ca,
            tls_reload.subscribe(),
            DEFAULT_POLL_INTERVAL,
            tls_stop.clone(),
        ));
    }
    let any_tls = !certificates.is_empty();
    let lifecycle = Arc::new(DrainState::new(metrics));
    let connections = TaskTracker::new();
    let observability = Observability::start(&config, bound.access_log, &lifecycle.metrics);
    let probe_stop = CancellationToken::new();
    let (accept_loop, upstream, probe) = match service {
        Service::Proxy => {
            tracing::info!(
                proxy = %proxy_addr,
                admin = %admin_addr,
                mode = config.mode.as_str(),
                upstream = %config.upstream_name,
                drain_delay = ?config.drain_delay,
                drain_timeout = ?config.drain_timeout,
                "listening"
            );
            let upstream = Upstream::new(&config);
            let ctx = Arc::new(
                ProxyContext::new(
                    config.clone(),
                    lifecycle.clone(),
                    upstream.clone(),
                    connections.clone(),
                )
                .with_observer(observability.observer.clone())
                .with_tls(bound.proxy_tls.map(|tls| tls.handshaker)),
            );
            let accept_loop = tokio::spawn(proxy::serve(proxy_listener, ctx));
            let probe = tokio::spawn(probe_upstream(
                upstream.clone(),
                lifecycle.clone(),
                probe_stop.clone(),
            ));
            (accept_loop, Some(upstream), Some(probe))
        }
        Service::Webhook(injector) => {
            tracing::info!(
                webhook = %proxy_addr,
                admin = %admin_addr,
                drain_delay = ?config.drain_delay,
                drain_timeout = ?config.drain_timeout,
                "listening"
            );
            let ctx = Arc::new(inject::server::WebhookContext {
                lifecycle: lifecycle.clone(),
                injector,
                tasks: connections.clone(),
                max_connections: config.max_connections as usize,
            });
            // Nothing behind the webhook to wait for: ready once it listens.
            lifecycle.set_upstream_up(true);
            (
                tokio::spawn(inject::server::serve(proxy_listener, ctx)),
                None,
                None,
            )
        }
    };
    let admin = AdminServer::start(
        admin_listener,
        lifecycle.clone(),
        events_tx,
        bound.admin_tls.map(|tls| tls.handshaker),
    );
    // Facts, never control: the API client connects in the background (the
    // proxy serves meanwhile) and is consulted when the drain starts.
    let kube_connect = {
        let (settings, lifecycle) = (config.kube.clone(), lifecycle.clone());
        AbortOnDrop(tokio::spawn(async move {
            Kube::connect(&settings, &lifecycle.metrics).await
        }))
    };
    // Event publications, owned here and awaited before the admin server goes.
    let kube_tasks = TaskTracker::new();

    let mut driver = Driver {
        config: &config,
        lifecycle: &lifecycle,
        events,
        logs,
        tls_reload: any_tls.then_some(tls_reload),
        force_on_signal: false,
        // Set when the drain starts.
        deadline: Instant::now() + config.drain_timeout,
        deadline_source: DeadlineSource::DrainTimeout,
        kube_connect: Some(kube_connect),
        kube: None,
        kube_tasks: &kube_tasks,
        timeline: Mutex::new(Vec::new()),
    };
    let trigger = driver.wait_for_drain_request().await;
    let outcome = driver.drain(trigger).await;

    // Downstream first: the accept loop and every connection task are done
    // (or were forced) before the things they depend on go away.
    connections.close();
    if timeout(FORCE_GRACE, connections.wait()).await.is_err() {
        tracing::warn!("connection tasks still running after the forced close");
    }
    let _ = accept_loop.await;
    probe_stop.cancel();
    if let Some(probe) = probe {
        let _ = probe.await;
    }
    if let Some(upstream) = upstream {
        upstream.close(CLOSE_GRACE).await;
    }

    let summary = lifecycle.finish_drain(outcome);
    tracing::info!(
        outcome = summary.outcome.as_str(),
        duration_ms = summary.duration_ms,
        requests_during_drain = summary.requests_during_drain,
        connections_graceful = summary.connections_graceful,
        connections_forced = summary.connections_forced,
        exit_code = summary.exit_code,
        "drain complete"
    );
    // Every request has ended, so what they logged and traced is queued:
    // add the drain's span and write it all out.
    driver.mark(
        "drained",
        vec![KeyValue::new(
            "lameduck.drain.outcome",
            summary.outcome.as_str(),
        )],
    );
    observability.submit_drain_span(&lifecycle, &summary, driver.take_timeline());
    observability.finish(driver.deadline).await;
    // Then the Kubernetes part: the drain's last Event, and the ones still
    // being published.
    driver.publish_outcome(&summary).await;
    kube_tasks.close();
    if timeout(config.kube.api_timeout, kube_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("Kubernetes Events still being published at exit");
    }
    if outcome == Outcome::Graceful {
        driver.linger().await;
    }
    // The admin server goes last: /metrics and /ready answered until the end.
    admin.shutdown(CLOSE_GRACE).await;
    tls_stop.cancel();
    tls_watchers.close();
    tls_watchers.wait().await;
    drop(signal_task);
    outcome
}

/// The access-log writer (and span exporter): started before the proxy
/// serves, finished after its connections are done.
struct Observability {
    observer: Observer,
    stop: CancellationToken,
    writer: Option<AbortOnDrop>,
    spans: Option<SpanSink>,
    exporter: Option<AbortOnDrop>,
}

impl Observability {
    fn start(config: &Config, destination: Option<Destination>, metrics: &Metrics) -> Self {
        let mut observer = Observer::off(config.trace_sample_ratio);
        let stop = CancellationToken::new();
        let format = match config.access_log {
            AccessLogFormat::Json => Some(access_log::Format::Json),
            AccessLogFormat::Text => Some(access_log::Format::Text),
            AccessLogFormat::Off => None,
        };
        let writer = match (format, destination) {
            (Some(format), Some(destination)) => {
                let dropped = metrics.access_log_dropped.clone();
                let (log, writer) = AccessLog::new(format, config.access_log_query, dropped);
                observer.access_log = Some(log);
                Some(AbortOnDrop(tokio::spawn(
                    writer.run(destination, stop.clone()),
                )))
            }
            _ => None,
        };
        let exporter = config.otlp_endpoint.as_deref().and_then(|endpoint| {
            let [exported, failed, dropped] = metrics.otlp_spans.clone();
            let counters = SpanCounters {
                exported,
                failed,
                dropped,
            };
            let resource = otlp::resource(
                config.kube.pod_name.as_deref(),
                config.kube.pod_namespace.as_deref(),
            );
            match otlp::start(endpoint, resource, counters) {
                Ok((sink, exporter)) => {
                    observer.spans = Some(sink);
                    Some(AbortOnDrop(tokio::spawn(exporter.run(stop.clone()))))
                }
                Err(error) => {
                    // Never fatal: serving matters more than tracing.
                    tracing::warn!(%error, "OTLP export disabled");
                    None
                }
            }
        });
        Observability {
            spans: observer.spans.clone(),
            observer,
            stop,
            writer,
            exporter,
        }
    }

    /// One span for the drain, from its start to now, with its timeline.
    fn submit_drain_span(
        &self,
        lifecycle: &DrainState,
        summary: &DrainSummary,
        timeline: Vec<TimelineEvent>,
    ) {
        let (Some(spans), Some(started_ms)) = (&self.spans, lifecycle.drain_started_unix_ms())
        else {
            return;
        };
        let started = SystemTime::UNIX_EPOCH + Duration::from_millis(started_ms);
        let attributes = vec![
            KeyValue::new("lameduck.drain.outcome", summary.outcome.as_str()),
            KeyValue::new(
                "lameduck.drain.requests_during_drain",
                summary.requests_during_drain as i64,
            ),
            KeyValue::new(
                "lameduck.drain.connections_graceful",
                summary.connections_graceful as i64,
            ),
            KeyValue::new(
                "lameduck.drain.connections_forced",
                summary.connections_forced as i64,
            ),
            KeyValue::new("lameduck.drain.exit_code", i64::from(summary.exit_code)),
        ];
        let failed = summary.outcome != Outcome::Graceful;
        spans.submit(otlp::drain_span(
            started,
            SystemTime::now(),
            timeline,
            attributes,
            failed,
        ));
    }

    /// Writes what is queued, within the drain deadline (at least a moment,
    /// so a forced exit still gets the lines of what it forced).
    async fn finish(self, deadline: Instant) {
        self.stop.cancel();
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .clamp(FLUSH_AT_LEAST, CLOSE_GRACE);
        let writer = async {
            if let Some(writer) = self.writer {
                writer.join().await;
            }
        };
        let exporter = async {
            if let Some(exporter) = self.exporter {
                exporter.join().await;
            }
        };
        // Both at once: a collector that does not answer must not cost the
        // access log its flush.
        if timeout(budget, async { tokio::join!(writer, exporter) })
            .await
            .is_err()
        {
            tracing::warn!("access log or spans not flushed in time at exit");
        }
    }
}

/// The part of `run` that reacts to events while time passes.
struct Driver<'a> {
    config: &'a Config,
    lifecycle: &'a Arc<DrainState>,
    events: mpsc::Receiver<Event>,
    logs: LogReloader,
    /// Asks the certificate watchers to reload (SIGHUP), when TLS is on.
    tls_reload: Option<ReloadSignal>,
    /// A stop signal forces the exit (true once a signal started the drain).
    force_on_signal: bool,
    /// The hard deadline; moved once the pod's deletionTimestamp is known.
    deadline: Instant,
    deadline_source: DeadlineSource,
    /// The API client being connected at start-up, then the client (if any).
    kube_connect: Option<AbortOnDrop<Result<Option<Kube>, KubeError>>>,
    kube: Option<Kube>,
    kube_tasks: &'a TaskTracker,
    /// The drain's steps, for its span (`--otlp-endpoint`).
    timeline: Mutex<Vec<TimelineEvent>>,
}

impl<'a> Driver<'a> {
    fn mark(&self, name: &'static str, attributes: Vec<KeyValue>) {
        let event = TimelineEvent {
            at: SystemTime::now(),
            name,
            attributes,
        };
        // Never contended: the driver is one task; a poisoned Vec is still a Vec.
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    fn take_timeline(&self) -> Vec<TimelineEvent> {
        std::mem::take(&mut *self.timeline.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn reload(&self) {
        if let Some(tls) = &self.tls_reload {
            // The watchers log the outcome, one line per certificate.
            tracing::info!("SIGHUP: reloading the TLS certificates and client CA bundles");
            tls.trigger();
        }
        match self.logs.reload() {
            Ok(ReloadOutcome::Applied(filter)) => {
                tracing::info!(%filter, "SIGHUP: log filter reloaded")
            }
            Ok(ReloadOutcome::NothingToReload) => {
                tracing::info!("SIGHUP: nothing to reload (no --log-level-file)")
            }
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: reload failed; keeping the current log filter")
            }
        }
    }

    /// Waits for SIGTERM/SIGINT or `POST /drain` and returns what started
    /// the drain. After a signal, the next signal forces the exit.
    async fn wait_for_drain_request(&mut self) -> &'static str {
        loop {
            match self.events.recv().await {
                Some(Event::Reload) => self.reload(),
                Some(Event::Stop(signal)) => {
                    tracing::info!(signal, "signal received; starting the drain");
                    self.force_on_signal = true;
                    return signal;
                }
                Some(Event::DrainRequested) => {
                    tracing::info!("drain requested through the admin port");
                    return "admin /drain";
                }
                // Every sender is owned by `run`; this cannot end first.
                None => return "admin /drain",
            }
        }
    }

    /// Runs `work` to completion unless the deadline or a forcing signal comes first.
    async fn until<F: Future>(&mut self, work: F) -> Result<F::Output, Outcome> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Ok(output),
                () = sleep_until(self.deadline) => return Err(Outcome::Deadline),
                Some(event) = self.events.recv() => match event {
                    Event::Reload => self.reload(),
                    Event::DrainRequested => {}
                    Event::Stop(signal) if self.force_on_signal => {
                        tracing::warn!(signal, "second signal; forcing the exit");
                        return Err(Outcome::Signal);
                    }
                    Event::Stop(signal) => {
                        // The drain came from the admin port (a preStop hook); this
                        // is kubelet's SIGTERM after it, not an impatient operator.
                        tracing::info!(signal, "signal received while draining; the next one forces the exit");
                        self.force_on_signal = true;
                    }
                },
            }
        }
    }

    async fn drain(&mut self, trigger: &'static str) -> Outcome {
        let lifecycle = self.lifecycle;
        // t0 first: readiness fails before anything else, the API included.
        lifecycle.begin_drain();
        let started = SystemTime::now();
        let delay_end = Instant::now() + self.config.drain_delay;
        // Until the facts are in (bounded by the API timeout), the fallback.
        self.deadline = Instant::now() + self.config.drain_timeout;
        let facts = match self.pod_facts().await {
            Ok(facts) => facts,
            Err(outcome) => return self.force(outcome).await,
        };
        self.mark(
            "drain started",
            vec![KeyValue::new("lameduck.drain.trigger", trigger)],
        );
        self.set_deadline(started, facts.as_ref());
        self.mark(
            "deadline set",
            vec![KeyValue::new(
                "lameduck.drain.deadline_source",
                self.deadline_source.as_str(),
            )],
        );
        self.publish(DrainEvent::started(format!(
            "{trigger}: lame-duck window at most {} (ends once no EndpointSlice routes here, + {}); deadline {} ({})",
            humantime::format_duration(self.config.drain_delay),
            humantime::format_duration(self.config.endpoint_propagation_margin),
            humantime::format_rfc3339_millis(unix_time(self.lifecycle.drain_deadline_unix_ms())),
            self.deadline_source.as_str(),
        )));
        let reason = match self.until(self.window(facts.as_ref(), delay_end)).await {
            Ok(reason) => reason,
            Err(outcome) => return self.force(outcome).await,
        };
        lifecycle.metrics.set_window_end(reason);
        self.mark(
            "lame-duck window ended",
            vec![KeyValue::new("lameduck.drain.window_end", reason.as_str())],
        );
        lifecycle.set_phase(Phase::Closing);
        lifecycle.tokens.stop_accepting.cancel();
        tracing::info!(
            reason = reason.as_str(),
            connections_active = lifecycle.connections.active(),
            "lame-duck window over; waiting for connections to finish"
        );
        match self.until(lifecycle.connections.wait_all_closed()).await {
            Ok(()) => Outcome::Graceful,
            Err(outcome) => self.force(outcome).await,
        }
    }

    /// The pod as the API sees it now (its deletionTimestamp above all), or
    /// what start-up learned if the API does not answer in time; None
    /// without the API. Waits at most the API timeout twice (the start-up
    /// connection, normally long done, and the read).
    async fn pod_facts(&mut self) -> Result<Option<PodFacts>, Outcome> {
        let api_timeout = self.config.kube.api_timeout;
        if let Some(connect) = self.kube_connect.take() {
            self.kube = match self.until(timeout(api_timeout, connect.join())).await? {
                Ok(Some(Ok(kube))) => kube,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "Kubernetes API not used; the fixed window and deadline apply");
                    None
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(
                        "Kubernetes client not connected in time; the fixed window and deadline apply"
                    );
                    None
                }
            };
        }
        let Some(kube) = self.kube.clone() else {
            return Ok(None);
        };
        let metrics = &self.lifecycle.metrics;
        Ok(Some(match self.until(kube.read_pod(metrics)).await? {
            Ok(facts) => facts,
            Err(error) => {
                tracing::warn!(%error, "own Pod unreadable at the drain; deadline from what start-up learned");
                kube.facts().clone()
            }
        }))
    }

    /// Moves the deadline to what the facts say (see `deadline.rs`).
    fn set_deadline(&mut self, started: SystemTime, facts: Option<&PodFacts>) {
        let (at, source) = drain_deadline(DeadlineFacts {
            drain_started: started,
            drain_timeout: self.config.drain_timeout,
            drain_timeout_explicit: self.config.drain_timeout_explicit,
            margin: self.config.deadline_margin,
            grace_period: facts.and_then(|f| f.grace_period),
            deletion: facts.and_then(|f| f.deletion),
            deletion_grace_period: facts.and_then(|f| f.deletion_grace_period),
        });
        self.lifecycle.set_deadline(at, source);
        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
        self.deadline = Instant::now() + left;
        self.deadline_source = source;
        tracing::info!(
            deadline = %humantime::format_rfc3339_millis(at),
            source = source.as_str(),
            in_ms = left.as_millis() as u64,
            "drain deadline"
        );
    }

    /// The lame-duck window: until no EndpointSlice routes to the pod (plus
    /// the propagation margin), at most --drain-delay.
    fn window(
        &self,
        facts: Option<&PodFacts>,
        delay_end: Instant,
    ) -> impl Future<Output = WindowEnd> + use<'a> {
        let kube = self.kube.clone();
        let facts = facts.cloned();
        let (lifecycle, tasks) = (self.lifecycle, self.kube_tasks);
        let margin = self.config.endpoint_propagation_margin;
        let endpoints = async move {
            let (Some(kube), Some(facts)) = (kube, facts) else {
                return std::future::pending().await;
            };
            match kube.endpoints_released(&facts, &lifecycle.metrics).await {
                Ok(EndpointsReleased::NotListed) => {
                    tracing::info!(
                        "the pod is in no EndpointSlice; waiting only the propagation margin"
                    );
                    sleep(margin).await;
                    WindowEnd::NoEndpoints
                }
                Ok(EndpointsReleased::Removed) => {
                    let after = lifecycle
                        .drain_started()
                        .map(|t| t.elapsed())
                        .unwrap_or_default();
                    tracing::info!(
                        after_ms = after.as_millis() as u64,
                        "no EndpointSlice routes to the pod any more"
                    );
                    let event = DrainEvent::endpoints_removed(format!(
                        "no EndpointSlice routes to this pod {} after the drain started; closing the listener in {}",
                        humantime::format_duration(round_ms(after)),
                        humantime::format_duration(margin),
                    ));
                    publish_in_background(tasks, &kube, lifecycle, event);
                    sleep(margin).await;
                    WindowEnd::EndpointsRemoved
                }
                Err(error) => {
                    tracing::warn!(%error, "EndpointSlices unreadable; the fixed --drain-delay applies");
                    sleep_until(delay_end).await;
                    WindowEnd::ApiUnavailable
                }
            }
        };
        async move {
            tokio::select! {
                // At the same instant, the API's failure is the reason to report.
                biased;
                reason = endpoints => reason,
                () = sleep_until(delay_end) => WindowEnd::DelayElapsed,
            }
        }
    }

    fn publish(&self, event: DrainEvent) {
        if let Some(kube) = &self.kube {
            publish_in_background(self.kube_tasks, kube, self.lifecycle, event);
        }
    }

    /// The drain's last Event, awaited (bounded by the API timeout).
    async fn publish_outcome(&self, summary: &DrainSummary) {
        let Some(kube) = &self.kube else { return };
        let took = humantime::format_duration(round_ms(Duration::from_millis(summary.duration_ms)));
        let event = match summary.outcome {
            Outcome::Graceful => DrainEvent::completed(format!(
                "drained in {took}: {} requests served during the drain, {} connections closed gracefully",
                summary.requests_during_drain, summary.connections_graceful,
            )),
            forced => DrainEvent::forced(format!(
                "{} after {took} (deadline from {}): {} connections closed forcibly, {} gracefully, {} requests served during the drain; exit {}",
                match forced {
                    Outcome::Signal => "second signal",
                    _ => "deadline reached",
                },
                self.deadline_source.as_str(),
                summary.connections_forced,
                summary.connections_graceful,
                summary.requests_during_drain,
                summary.exit_code,
            )),
        };
        kube.publish(event, &self.lifecycle.metrics).await;
    }

    async fn force(&self, outcome: Outcome) -> Outcome {
        let lifecycle = self.lifecycle;
        lifecycle.set_phase(Phase::Forcing);
        self.mark(
            "forcing",
            vec![
                KeyValue::new("lameduck.drain.outcome", outcome.as_str()),
                KeyValue::new(
                    "lameduck.connections_active",
                    lifecycle.connections.active() as i64,
                ),
            ],
        );
        tracing::warn!(
            reason = outcome.as_str(),
            connections_active = lifecycle.connections.active(),
            "closing the remaining connections forcibly"
        );
        lifecycle.tokens.force.cancel();
        if timeout(FORCE_GRACE, lifecycle.connections.wait_all_closed())
            .await
            .is_err()
        {
            tracing::error!(
                connections_active = lifecycle.connections.active(),
                "connections still counted after the forced close"
            );
        }
        outcome
    }

    /// Keeps the admin server up so one more scrape sees the final figures;
    /// never past the deadline, and any stop signal ends it at once.
    async fn linger(&mut self) {
        let until = (Instant::now() + self.config.metrics_linger).min(self.deadline);
        if until <= Instant::now() {
            return;
        }
        tracing::info!(linger = ?until.duration_since(Instant::now()), "drained; lingering for a last metrics scrape");
        loop {
            tokio::select! {
                () = sleep_until(until) => return,
                Some(event) = self.events.recv() => match event {
                    Event::Reload => self.reload(),
                    Event::DrainRequested => {}
                    Event::Stop(signal) => {
                        tracing::info!(signal, "signal received while lingering; exiting");
                        return;
                    }
                },
            }
        }
    }
}

/// Watches whether the app accepts TCP connections: `starting → serving` on the
/// first success, and `/ready` fails while the app refuses.
async fn probe_upstream(upstream: Upstream, lifecycle: Arc<DrainState>, stop: CancellationToken) {
    loop {
        let up = tokio::select! {
            connected = upstream.connect_tcp() => connected.is_ok(),
            () = stop.cancelled() => return,
        };
        lifecycle.set_upstream_up(up);
        let pause = if up {
            PROBE_INTERVAL_UP
        } else {
            PROBE_INTERVAL_DOWN
        };
        tokio::select! {
            () = sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A task that must not outlive its owner.
struct AbortOnDrop<T = ()>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// The task's output; None if it panicked.
    async fn join(mut self) -> Option<T> {
        (&mut self.0).await.ok()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes an Event without holding up the drain; `tasks` (owned by
/// `run`) is awaited, bounded, before the admin server goes.
fn publish_in_background(
    tasks: &TaskTracker,
    kube: &Kube,
    lifecycle: &Arc<DrainState>,
    event: DrainEvent,
) {
    let (kube, lifecycle) = (kube.clone(), lifecycle.clone());
    tasks.spawn(async move {
        kube.publish(event, &lifecycle.metrics).await;
    });
}

fn unix_time(ms: Option<u64>) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.unwrap_or_default())
}

/// Durations in Events and logs, to the millisecond.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
