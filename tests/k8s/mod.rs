//! A real Kubernetes control plane on loopback for the integration tests:
//! etcd, kube-apiserver and kube-controller-manager (no kubelet, no scheduler,
//! no mocks), built from source once by `scripts/k8s-build.sh` and cached in
//! `${XDG_CACHE_HOME:-$HOME/.cache}/lameduck-tools/k8s-<version>/`.
//!
//! Use it from any test crate:
//!
//! ```ignore
//! #[path = "k8s/mod.rs"]
//! mod k8s;
//!
//! #[tokio::test]
//! async fn something() {
//!     let cp = k8s::ControlPlane::builder().service_account("default", "lameduck").start().await;
//!     let client = cp.client();
//!     // KUBECONFIG=cp.kubeconfig_for("default", "lameduck") for a child process
//! }
//! ```
//!
//! Every component listens on 127.0.0.1 only; the Service CIDR
//! (10.96.0.0/16) and pod IPs set by the helpers are virtual and never
//! contacted. Each `ControlPlane` owns a temporary directory (certificates,
//! token file, kubeconfigs, etcd data, one log file per component); dropping it
//! stops the processes (SIGTERM, then SIGKILL) and removes the directory. When
//! the drop happens during a panic the tail of every log is printed first.
//! `LAMEDUCK_K8S_KEEP=1` keeps the directory for a post-mortem.
//!
//! The processes are started with PR_SET_PDEATHSIG=SIGKILL, bound to the
//! thread that called `start()`: a test binary killed by a timeout leaves no
//! control plane behind. Consequently: one `ControlPlane` per test, started on
//! the test's own runtime (not from `spawn_blocking`, not in a `static`).
#![allow(dead_code)]

mod apply;
mod objects;

#[allow(unused_imports)]
pub use objects::{EndpointView, endpoint_for_ip, wait_until};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The Kubernetes version `scripts/k8s-build.sh` builds.
pub const K8S_VERSION: &str = "v1.37.2";
/// The etcd version (the one kubernetes v1.37.2's go.mod requires).
pub const ETCD_VERSION: &str = "v3.7.0";
/// The Service CIDR given to the apiserver (virtual: nothing routes it).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Deadline for one start attempt (apiserver ready, controllers running).
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// Default deadline of the waiting helpers.
pub const WAIT: Duration = Duration::from_secs(30);
/// How long a component gets between SIGTERM and SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Attempts of a start (a free port taken by someone else in between, etc.).
const START_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------
// The binaries
// ---------------------------------------------------------------------------

static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory holding `etcd`, `kube-apiserver`, `kube-controller-manager`
/// (and, after a full `scripts/k8s-build.sh`, `kubectl` & co). Runs the build
/// script once per process (it is a no-op when the binaries are cached; it
/// takes a flock, so concurrent test binaries do not build twice).
/// `LAMEDUCK_K8S_BIN_DIR` overrides it.
pub fn bin_dir() -> &'static Path {
    BIN_DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LAMEDUCK_K8S_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s-build.sh");
        let t = Instant::now();
        // Only what the harness needs; `scripts/test.sh` builds the rest.
        let out = Command::new("bash")
            .arg(&script)
            .env("K8S_BUILD_ONLY", "core")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the Kubernetes binaries could not be built",
            script.display(),
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        assert!(
            dir.join("kube-apiserver").is_file(),
            "{} printed {stdout:?}, not the binaries' directory",
            script.display()
        );
        if t.elapsed() > Duration::from_secs(2) {
            eprintln!("k8s: binaries built in {:.1?}", t.elapsed());
        }
        dir
    })
}

/// Path of one of the built binaries (`kubectl`, `kube-scheduler`, ...), if
/// it exists (the harness itself only builds the control plane's three).
pub fn binary(name: &str) -> Option<PathBuf> {
    let p = bin_dir().join(name);
    p.is_file().then_some(p)
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

/// Options of a [`ControlPlane`]; see [`ControlPlane::builder`].
#[derive(Debug, Default, Clone)]
pub struct Builder {
    service_accounts: Vec<(String, String)>,
    apiserver_args: Vec<String>,
    controller_manager_args: Vec<String>,
    san_ips: Vec<String>,
}

impl Builder {
    /// A ServiceAccount identity `system:serviceaccount:<ns>:<name>` that gets
    /// a static bearer token (see [`ControlPlane::token_for`],
    /// [`ControlPlane::kubeconfig_for`]). The ServiceAccount object itself is
    /// not created (authentication does not need it; create it if the test
    /// wants it to exist).
    pub fn service_account(mut self, namespace: &str, name: &str) -> Self {
        let id = (namespace.to_string(), name.to_string());
        if !self.service_accounts.contains(&id) {
            self.service_accounts.push(id);
        }
        self
    }

    /// An extra kube-apiserver flag (`--name=value`), after the defaults.
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.apiserver_args.push(arg.into());
        self
    }

    /// An extra IP address in the apiserver's serving certificate (the lab
    /// advertises the API on its node IP, which pods reach through the
    /// `kubernetes` Service).
    pub fn apiserver_san_ip(mut self, ip: impl Into<String>) -> Self {
        self.san_ips.push(ip.into());
        self
    }

    /// An extra kube-controller-manager flag (`--name=value`), after the
    /// defaults (e.g. `--node-monitor-grace-period=20s` to have a Node without
    /// kubelet go NotReady; the default here is 1h so that it never does).
    pub fn controller_manager_arg(mut self, arg: impl Into<String>) -> Self {
        self.controller_manager_args.push(arg.into());
        self
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager; returns once
    /// the apiserver is ready and the controllers run (the `default`
    /// ServiceAccount and the `kube-root-ca.crt` ConfigMap exist in
    /// `default`). Panics (with the components' logs) if that fails.
    pub async fn start(self) -> ControlPlane {
        install_crypto_provider();
        let bins = bin_dir().to_path_buf();
        let t = Instant::now();
        let mut last_err = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut cp = match ControlPlane::launch(&self, &bins) {
                Ok(cp) => cp,
                Err(e) => panic!("k8s: cannot set up the control plane: {e}"),
            };
            match cp.wait_started(Instant::now() + START_DEADLINE).await {
                Ok(()) => {
                    cp.started_in = t.elapsed();
                    eprintln!(
                        "k8s: control plane {K8S_VERSION} up in {:.1?} at {} ({})",
                        cp.started_in,
                        cp.server,
                        cp.dir().display()
                    );
                    return cp;
                }
                Err(e) => {
                    eprintln!("k8s: start attempt {attempt}/{START_ATTEMPTS} failed: {e}");
                    cp.dump_logs();
                    last_err = e;
                    // Dropping `cp` tears this attempt down.
                }
            }
        }
        panic!("k8s: the control plane did not start ({START_ATTEMPTS} attempts): {last_err}");
    }
}

/// Installs rustls' ring provider for kube's client (once; an already
/// installed provider is fine).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------
// The control plane
// ---------------------------------------------------------------------------

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running control plane; see the module documentation.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    components: Vec<Component>,
    server: String,
    etcd_url: String,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    tokens: BTreeMap<(String, String), String>,
    kubeconfigs: BTreeMap<(String, String), PathBuf>,
    client: Option<Client>,
    started_in: Duration,
}

impl ControlPlane {
    /// A builder, to add ServiceAccount identities or flags before starting.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A control plane with no ServiceAccount tokens (admin only).
    pub async fn start() -> ControlPlane {
        Builder::default().start().await
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// etcd's client URL, `http://127.0.0.1:<port>`.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The CA certificate (PEM) that signed the apiserver's serving cert.
    pub fn ca_cert(&self) -> PathBuf {
        self.path.join("pki/ca.crt")
    }

    /// The temporary directory (pki/, kubeconfigs, etcd data, logs/).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// How long `start()` took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The cluster-admin bearer token (user `admin`, group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig for the admin (token auth, CA file), for `KUBECONFIG=`.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The bearer token of a ServiceAccount identity given to the builder.
    pub fn token_for(&self, namespace: &str, name: &str) -> &str {
        self.tokens
            .get(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| {
                panic!("no token for {namespace}/{name}: pass it to builder().service_account()")
            })
    }

    /// A kubeconfig for a ServiceAccount identity given to the builder (its
    /// context's namespace is the ServiceAccount's).
    pub fn kubeconfig_for(&self, namespace: &str, name: &str) -> &Path {
        self.kubeconfigs
            .get(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| {
                panic!(
                    "no kubeconfig for {namespace}/{name}: pass it to builder().service_account()"
                )
            })
    }

    /// A kube client for the admin.
    pub fn client(&self) -> Client {
        self.client.clone().expect("client is set once started")
    }

    /// A kube client for a ServiceAccount identity (built from its kubeconfig).
    pub async fn client_for(&self, namespace: &str, name: &str) -> Client {
        client_from_kubeconfig(self.kubeconfig_for(namespace, name))
            .await
            .unwrap_or_else(|e| panic!("client for {namespace}/{name}: {e}"))
    }

    /// PIDs of the components, by name (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.components
            .iter()
            .map(|c| (c.name, c.child.id()))
            .collect()
    }

    /// Resident set size of each component in KiB (from /proc), by name.
    pub fn rss_kib(&self) -> Vec<(&'static str, u64)> {
        self.components
            .iter()
            .map(|c| {
                let status = fs::read_to_string(format!("/proc/{}/status", c.child.id()))
                    .unwrap_or_default();
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (c.name, kib)
            })
            .collect()
    }

    /// The log file of a component.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.path.join("logs").join(format!("{component}.log"))
    }

    /// Prints the last lines of every component's log to stderr.
    pub fn dump_logs(&self) {
        self.dump_logs_tail(60);
    }

    /// Prints the last `lines` lines of every component's log to stderr.
    pub fn dump_logs_tail(&self, lines: usize) {
        for c in &self.components {
            let text = fs::read_to_string(&c.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            let mut out = format!(
                "----- {} ({}), last {} lines -----\n",
                c.name,
                c.log.display(),
                all.len() - from
            );
            for l in &all[from..] {
                let _ = writeln!(out, "{l}");
            }
            eprint!("{out}");
        }
    }

    /// A `kubectl` command with `KUBECONFIG` set to the admin's, if kubectl
    /// was built (`bash scripts/k8s-build.sh` builds it; the harness does not).
    pub fn kubectl(&self) -> Option<Command> {
        let bin = binary("kubectl")?;
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.admin_kubeconfig)
            .stdin(Stdio::null());
        Some(cmd)
    }

    // -- start-up ---------------------------------------------------------

    /// Writes certificates, tokens and kubeconfigs, and spawns the three
    /// components (the apiserver and controller-manager retry their backends).
    fn launch(opts: &Builder, bins: &Path) -> Result<ControlPlane, String> {
        sweep_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix("lameduck-k8s-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let path = dir.path().to_path_buf();
        // etcd makes its own data dir (0700).
        for sub in ["pki", "logs", "kcm-certs"] {
            fs::create_dir_all(path.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        write(&path.join(OWNER_FILE), &std::process::id().to_string())?;
        let pki = path.join("pki");
        make_pki(&pki, &opts.san_ips)?;

        let etcd_port = free_port();
        let peer_port = free_port();
        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");

        // Static tokens: user,token,uid,"groups".
        let admin_token = random_token();
        let mut token_file = format!("{admin_token},admin,admin,\"system:masters\"\n");
        let mut tokens = BTreeMap::new();
        let mut kubeconfigs = BTreeMap::new();
        for (ns, name) in &opts.service_accounts {
            let token = random_token();
            let user = format!("system:serviceaccount:{ns}:{name}");
            let _ = writeln!(
                token_file,
                "{token},{user},sa-{ns}-{name},\"system:serviceaccounts,system:serviceaccounts:{ns},system:authenticated\""
            );
            let kc = path.join(format!("kubeconfig-{ns}-{name}"));
            write_kubeconfig(&kc, &server, &pki.join("ca.crt"), name, &token, ns)?;
            tokens.insert((ns.clone(), name.clone()), token);
            kubeconfigs.insert((ns.clone(), name.clone()), kc);
        }
        write(&path.join("tokens.csv"), &token_file)?;
        let admin_kubeconfig = path.join("kubeconfig-admin");
        write_kubeconfig(
            &admin_kubeconfig,
            &server,
            &pki.join("ca.crt"),
            "admin",
            &admin_token,
            "default",
        )?;

        let mut cp = ControlPlane {
            dir: Some(dir),
            path: path.clone(),
            components: Vec::new(),
            server,
            etcd_url: etcd_url.clone(),
            admin_token,
            admin_kubeconfig: admin_kubeconfig.clone(),
            tokens,
            kubeconfigs,
            client: None,
            started_in: Duration::ZERO,
        };

        let peer = format!("http://127.0.0.1:{peer_port}");
        let p = |f: &str| pki.join(f).display().to_string();
        let etcd_args = vec![
            "--name=default".to_string(),
            format!("--data-dir={}", path.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=default={peer}"),
            "--initial-cluster-state=new".to_string(),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
            "--quota-backend-bytes=268435456".to_string(),
        ];
        cp.spawn("etcd", &bins.join("etcd"), &etcd_args)?;

        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", path.join("tokens.csv").display()),
            "--authorization-mode=Node,RBAC".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
            // One apiserver: no lease-based endpoint reconciliation to wait for.
            "--endpoint-reconciler-type=none".to_string(),
            "--v=0".to_string(),
        ];
        api_args.extend(opts.apiserver_args.iter().cloned());
        cp.spawn("kube-apiserver", &bins.join("kube-apiserver"), &api_args)?;

        let mut kcm_args = vec![
            format!("--kubeconfig={}", admin_kubeconfig.display()),
            "--bind-address=127.0.0.1".to_string(),
            "--secure-port=0".to_string(),
            "--leader-elect=false".to_string(),
            "--use-service-account-credentials=false".to_string(),
            "--controllers=*".to_string(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--cluster-signing-cert-file={}", p("ca.crt")),
            format!("--cluster-signing-key-file={}", p("ca.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--cert-dir={}", path.join("kcm-certs").display()),
            // Without a kubelet the Nodes never heartbeat: do not mark them
            // NotReady (and their pods not ready) during a test.
            "--node-monitor-grace-period=1h".to_string(),
            "--concurrent-service-endpoint-syncs=5".to_string(),
            "--v=0".to_string(),
        ];
        kcm_args.extend(opts.controller_manager_args.iter().cloned());
        cp.spawn(
            "kube-controller-manager",
            &bins.join("kube-controller-manager"),
            &kcm_args,
        )?;
        Ok(cp)
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[String]) -> Result<(), String> {
        let log = self.log_path(name);
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", bin.display()))?;
        self.components.push(Component { name, child, log });
        Ok(())
    }

    /// The first component that exited, as an error.
    fn check_alive(&mut self) -> Result<(), String> {
        for c in &mut self.components {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(format!("{} exited ({status}) during start-up", c.name));
            }
        }
        Ok(())
    }

    async fn wait_started(&mut self, deadline: Instant) -> Result<(), String> {
        let client = client_from_kubeconfig(&self.admin_kubeconfig).await?;
        self.client = Some(client.clone());

        // The apiserver: /readyz answers "ok" (storage, RBAC bootstrap, ...).
        loop {
            self.check_alive()?;
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            let last = match tokio::time::timeout(Duration::from_secs(2), client.request_text(req))
                .await
            {
                Ok(Ok(body)) if body.trim() == "ok" => break,
                Ok(Ok(body)) => body,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "apiserver /readyz not ok before the deadline: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The controllers: the root-ca-cert-publisher and serviceaccount
        // controllers have done their work in `default`.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        loop {
            self.check_alive()?;
            let cm = cms.get_opt("kube-root-ca.crt").await;
            let sa = sas.get_opt("default").await;
            if matches!(cm, Ok(Some(_))) && matches!(sa, Ok(Some(_))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "controller-manager: kube-root-ca.crt {:?} / ServiceAccount default {:?} in default",
                    cm.map(|c| c.is_some()),
                    sa.map(|s| s.is_some())
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // -- teardown ---------------------------------------------------------

    fn stop(&mut self) {
        // Reverse start order: controller-manager, apiserver, etcd.
        for c in self.components.iter_mut().rev() {
            if let Ok(None) = c.child.try_wait() {
                let _ = kill(Pid::from_raw(c.child.id() as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for c in self.components.iter_mut().rev() {
            loop {
                match c.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.child.kill();
                        let _ = c.child.wait();
                        break;
                    }
                }
            }
        }
        self.components.clear();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("k8s: test panicked; control plane logs follow");
            self.dump_logs();
        }
        self.stop();
        if std::env::var_os("LAMEDUCK_K8S_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                // Not for sweep_stale_dirs to remove.
                let _ = fs::remove_file(dir.path().join(OWNER_FILE));
                eprintln!("k8s: kept {}", dir.keep().display());
            }
        }
        // Otherwise the TempDir removes itself.
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Holds the PID of the test process owning a control plane's directory.
const OWNER_FILE: &str = "owner.pid";

/// Removes the directories of control planes whose test process is gone
/// (killed, so no Drop ran; PR_SET_PDEATHSIG took care of the processes).
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("lameduck-k8s-") {
            continue;
        }
        let Ok(pid) = fs::read_to_string(e.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = pid
            .trim()
            .parse::<u32>()
            .map(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(true);
        if !alive {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A 127.0.0.1 port that was free a moment ago (bound then released).
/// helm, from `deploy/tools.sh helm` (which builds it once, cached, when it
/// is missing; HELM=/path overrides).
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tools.sh"))
            .arg("helm")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run deploy/tools.sh");
        assert!(
            out.status.success(),
            "deploy/tools.sh helm failed ({})",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        assert!(
            path.is_file(),
            "deploy/tools.sh helm printed {stdout:?}, not helm's path"
        );
        path
    })
}

/// Runs helm with `args` (panics with its stderr on failure); its stdout.
pub fn run_helm(args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm output is UTF-8")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// 32 hex characters from /dev/urandom.
fn random_token() -> String {
    let mut buf = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The CA, the apiserver's serving certificate and the ServiceAccount
/// signing key pair, with the openssl CLI (P-256 keys: instant to generate).
fn make_pki(dir: &Path, san_ips: &[String]) -> Result<(), String> {
    let mut ext = "basicConstraints=critical,CA:FALSE\n\
               keyUsage=critical,digitalSignature,keyEncipherment\n\
               extendedKeyUsage=serverAuth\n\
               subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
               DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1"
        .to_string();
    for ip in san_ips {
        let _ = write!(ext, ",IP:{ip}");
    }
    ext.push('\n');
    write(&dir.join("apiserver.ext"), &ext)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<&str>> = vec![
        [
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "3650"],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &["-keyout", "apiserver.key", "-out", "apiserver.csr"],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "3650",
            "-extfile",
            "apiserver.ext",
        ],
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sa.key",
        ],
        vec!["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    ];
    let subjects = ["/CN=lameduck-test-ca", "/CN=kube-apiserver"];
    for (i, args) in steps.iter().enumerate() {
        let mut args = args.clone();
        if let Some(subj) = subjects.get(i) {
            args.extend(["-subj", subj]);
            if i == 0 {
                args.extend(CA_EXTENSIONS);
            }
        }
        openssl(dir, &args)?;
    }
    Ok(())
}

const CA_EXTENSIONS: [&str; 4] = [
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
];

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run openssl (is it installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A kubeconfig with token auth and the CA as a file.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    token: &str,
    namespace: &str,
) -> Result<(), String> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: lameduck-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: {user}\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: {user}@lameduck-test\n  context:\n    cluster: lameduck-test\n    user: {user}\n    namespace: {namespace}\n\
         current-context: {user}@lameduck-test\n",
        ca = ca.display()
    );
    write(path, &text)
}

async fn client_from_kubeconfig(path: &Path) -> Result<Client, String> {
    install_crypto_provider();
    let kc = Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Client::try_from(config).map_err(|e| format!("client from {}: {e}", path.display()))
}
