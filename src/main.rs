//! Command line → configuration → runtime → lifecycle → exit status.
//! The only place the process decides how it exits.
//!
//! Exit status: 0 drained gracefully (or a client command succeeded);
//! 1 start-up or runtime failure; 2 invalid flags or configuration;
//! 3 drain deadline reached, connections closed forcibly;
//! 4 a second signal forced the exit.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use lameduck::config::{Cli, Command, Config, InjectArgs, LogFormat, ProxyArgs};
use lameduck::metrics::TlsListener;
use lameduck::{demo, drain_client, inject, lifecycle, telemetry, tls};

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// One line on stderr, then the exit status: what a user sees for bad input.
fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line says what is wrong and names the flag.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let worker_threads = match &cli.command {
        None => cli.proxy.resolved_worker_threads(),
        Some(Command::Run(args) | Command::Demo(args)) => args.resolved_worker_threads(),
        // The helpers are light: one thread is plenty.
        Some(Command::DemoApp(_) | Command::Drain(_) | Command::Inject(_)) => 1,
    };
    // One TLS crypto provider for every part that uses rustls (the
    // Kubernetes client today), chosen here rather than by whichever
    // dependency asks first. Err only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match runtime_builder(worker_threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    match cli.command {
        None => runtime.block_on(run_proxy(cli.proxy, None, |_| {})),
        Some(Command::Run(args)) => runtime.block_on(run_proxy(args, None, |_| {})),
        Some(Command::Demo(args)) => runtime.block_on(run_demo(args)),
        Some(Command::DemoApp(args)) => runtime.block_on(run_demo_app(args.listen)),
        Some(Command::Inject(args)) => runtime.block_on(run_inject(args)),
        Some(Command::Drain(args)) => match runtime.block_on(drain_client::run(args)) {
            Ok((output, connection)) => {
                println!("{output}");
                // Closed by the process exit, after the answer is out.
                drop(connection);
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_FAILURE, e),
        },
    }
}

/// One thread (a CPU limit of a core or less, or pinning): a current-thread
/// runtime, without the work-stealing machinery one thread cannot use
/// (measurably faster; BENCHMARKS.md). More: the multi-thread runtime.
fn runtime_builder(threads: usize) -> tokio::runtime::Builder {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    }
}

fn configure(args: ProxyArgs) -> Result<(Config, telemetry::LogReloader), ExitCode> {
    let logs = telemetry::init(
        LogFormat::resolve(args.log_format, std::io::stderr().is_terminal()),
        args.log_level.as_deref(),
        args.log_level_file.as_deref(),
    )
    .map_err(|e| fail(EXIT_USAGE, e))?;
    let config = args.into_config().map_err(|e| fail(EXIT_USAGE, e))?;
    Ok((config, logs))
}

/// `before_serving` sees the bound addresses before the lifecycle starts.
async fn run_proxy(
    args: ProxyArgs,
    upstream_override: Option<SocketAddr>,
    before_serving: impl FnOnce(&lifecycle::Bound),
) -> ExitCode {
    let (mut config, logs) = match configure(args) {
        Ok(configured) => configured,
        Err(code) => return code,
    };
    if let Some(upstream) = upstream_override {
        config.upstream = upstream;
        config.upstream_name = upstream.to_string();
    }
    let bound = match lifecycle::bind_all(&config) {
        Ok(bound) => bound,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    before_serving(&bound);
    let outcome = lifecycle::run(config, bound, logs, lifecycle::Service::Proxy).await;
    tracing::info!(exit_code = outcome.exit_code(), "exiting");
    ExitCode::from(outcome.exit_code())
}

async fn run_inject(args: InjectArgs) -> ExitCode {
    let logs = match telemetry::init(
        LogFormat::resolve(args.log_format, std::io::stderr().is_terminal()),
        args.log_level.as_deref(),
        None,
    ) {
        Ok(logs) => logs,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let settings = match inject::load_settings(&args.sidecar_config) {
        Ok(settings) => settings,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let cert_files = tls::CertFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        cert_flag: "--tls-cert",
        key_flag: "--tls-key",
    };
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let bound = match lifecycle::bind_all(&config) {
        Ok(bound) => bound,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    let cert = tls::ReloadableCert::load(cert_files, bound.metrics.tls(TlsListener::Webhook));
    let injector = match cert.and_then(|cert| inject::Injector::new(settings, cert)) {
        Ok(injector) => Arc::new(injector),
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let outcome = lifecycle::run(config, bound, logs, lifecycle::Service::Webhook(injector)).await;
    tracing::info!(exit_code = outcome.exit_code(), "exiting");
    ExitCode::from(outcome.exit_code())
}

async fn run_demo(args: ProxyArgs) -> ExitCode {
    let app = match TcpListener::bind("127.0.0.1:0").await {
        Ok(app) => app,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the demo app: {e}")),
    };
    let app_addr = match app.local_addr() {
        Ok(addr) => addr,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the demo app: {e}")),
    };
    // The app outlives the proxy: it stops only after the drain is over.
    let stop_app = CancellationToken::new();
    let app_task = tokio::spawn(demo::serve(app, stop_app.clone()));
    let code = run_proxy(args, Some(app_addr), |bound| {
        let proxy = loopback_for(bound.proxy_addr);
        let admin = loopback_for(bound.admin_addr);
        println!(
            "lameduck demo: app on {app_addr}, proxy on {proxy}, admin on {admin}, pid {pid}\n\
             try, in another terminal:\n\
             \x20 curl -i http://{proxy}/\n\
             \x20 curl -i http://{admin}/ready\n\
             \x20 curl -s http://{admin}/metrics | grep lameduck_\n\
             \x20 curl -s 'http://{proxy}/slow?ms=8000' & sleep 1; kill -TERM {pid}   # the slow request still completes\n\
             \x20 curl -s http://{admin}/status\n",
            pid = std::process::id()
        );
    })
    .await;
    stop_app.cancel();
    let _ = app_task.await;
    code
}

async fn run_demo_app(listen: SocketAddr) -> ExitCode {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            return fail(
                EXIT_FAILURE,
                format!("cannot listen on --listen {listen}: {e}"),
            );
        }
    };
    let stop = CancellationToken::new();
    let app = tokio::spawn(demo::serve(listener, stop.clone()));
    // SIGTERM (a container stop) and SIGINT both end it; open requests finish.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    stop.cancel();
    let _ = app.await;
    ExitCode::SUCCESS
}

/// The address a local curl should use for a listen address.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}
