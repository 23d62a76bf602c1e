//! The node lab: a real single-node Kubernetes cluster inside one network
//! namespace the harness creates — etcd, kube-apiserver,
//! kube-controller-manager (the control plane of `tests/k8s`), kube-scheduler,
//! containerd + runc, kubelet, kube-proxy (iptables), a CNI bridge, the pods,
//! and the test's own load generator. The namespace has no link to the host's,
//! so no packet of the lab can leave it.
//!
//! ```ignore
//! #[path = "lab/mod.rs"]
//! mod lab;
//! #[test]
//! fn something() {
//!     lab::run(async |lab| { lab.kubectl(&["get", "nodes"]); });
//! }
//! ```
//!
//! How (see issue 11 for what was verified on these machines):
//! - [`run`] adds a netns (`ip netns add`), and a dedicated thread `setns`es
//!   into it and runs a tokio runtime: every socket the test opens, and every
//!   process it spawns, lives in the lab.
//! - A holder process (`unshare -m`) owns a private mount namespace in which a
//!   fresh sysfs (the lab netns' view), the host's cgroup hierarchies
//!   (re-mounted from `/proc/1/mountinfo`), read-only files over the
//!   `/proc/sys` entries the kubelet insists on, and lab directories over the
//!   paths that ignore `--root-dir` are mounted. containerd, the kubelet and
//!   kube-proxy join it (`nsenter -m`), so host values and paths never change.
//! - Teardown is by identity, not by name: every process whose netns or mount
//!   namespace is the lab's, or whose cgroup is under the lab's cgroup root,
//!   is killed and waited for (`/proc/PID/stat`, since PID 1 reaps orphaned
//!   shims late); then the cgroups, the netns and the directories go. A lab
//!   left by a killed test process is swept at the next start.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, ServiceAccount};
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[path = "../k8s/mod.rs"]
pub mod k8s;

pub use k8s::ControlPlane;

pub mod load;
pub mod rollout;

/// The node IP, on the lab's `lo` (the kubelet refuses 127/8 as node IP).
pub const NODE_IP: &str = "10.200.0.1";
/// The node's name.
pub const NODE_NAME: &str = "lab-node";
/// The pods' subnet (the CNI bridge `cni0` is its .1).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// How long the lab may take from nothing to a usable node.
pub const START_DEADLINE: Duration = Duration::from_secs(120);
/// The lameduck image `scripts/image.sh` builds and annotates.
pub const LAMEDUCK_IMAGE: &str = "docker.io/library/lameduck:0.1.0";

const NETNS_PREFIX: &str = "lameduck-lab-";

// ---------------------------------------------------------------------------
// Binaries and images
// ---------------------------------------------------------------------------

fn run_script(script: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed ({})",
        path.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    PathBuf::from(stdout.lines().last().unwrap_or("").trim())
}

/// containerd, ctr, the shim, runc, crictl and `pause.tar`
/// (`scripts/node-build.sh`, cached).
pub fn node_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = run_script("scripts/node-build.sh");
        assert!(
            d.join("containerd").is_file(),
            "node-build.sh printed {d:?}"
        );
        d
    })
}

/// The lameduck image archive (`scripts/image.sh`, cached).
pub fn lameduck_image() -> &'static Path {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh");
        let out = Command::new("bash")
            .arg(&path)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "scripts/image.sh failed ({})",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let tar = stdout
            .lines()
            .find_map(|l| l.strip_prefix("archive="))
            .unwrap_or_else(|| panic!("scripts/image.sh printed no archive=: {stdout}"));
        PathBuf::from(tar)
    })
}

/// The full Kubernetes set (kubelet, kube-proxy, scheduler, kubectl).
fn k8s_bins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = run_script("scripts/k8s-build.sh");
        for b in ["kubelet", "kube-proxy", "kube-scheduler", "kubectl"] {
            assert!(d.join(b).is_file(), "{} missing in {}", b, d.display());
        }
        d
    })
}

// ---------------------------------------------------------------------------
// Running a test in the lab
// ---------------------------------------------------------------------------

/// Creates a lab, runs `f` in it (on a runtime whose sockets are in the lab's
/// netns), tears the lab down (also when `f` panics) and re-raises a panic.
pub fn run<F>(f: F)
where
    F: AsyncFnOnce(&Lab) + Send + 'static,
{
    // Built outside the lab (cargo, go and the image script need the host).
    let bins = k8s_bins().to_path_buf();
    let node = node_dir().to_path_buf();
    let image = lameduck_image().to_path_buf();
    // One lab at a time per test binary: the host mount points and the
    // machine's two cores are shared.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    sweep_stale_labs();

    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{NETNS_PREFIX}{}-{seq}", std::process::id());
    sh(Command::new("ip").args(["netns", "add", &name])).expect("ip netns add");

    let thread_name = name.clone();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            // Per-thread: the network namespace is a property of the task,
            // and threads and processes created from here inherit it.
            let ns = File::open(format!("/run/netns/{thread_name}")).expect("open the lab netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the lab netns");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let lab = Lab::start(thread_name, &bins, &node, &image).await;
                f(&lab).await;
                drop(lab);
            });
        })
        .expect("spawn the lab thread");
    let result = handle.join();
    // The thread's Lab dropped (its Drop removes the netns too); this is for
    // a panic before the Lab existed.
    let _ = sh(Command::new("ip").args(["netns", "del", &name]));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    let left = leftovers(&name);
    assert!(left.is_empty(), "lab {name} left behind: {left:?}");
}

/// What a torn-down lab left on the host: processes (recorded by the
/// teardown, which alone knows the namespaces), the netns, cgroups,
/// directories, mount points made for it.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut left: Vec<String> = LEFT_PIDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .map(|p| format!("process {p}"))
        .collect();
    if Path::new(&format!("/run/netns/{name}")).exists() {
        left.push(format!("netns {name}"));
    }
    left.extend(
        cgroup_dirs(&format!("/{name}"))
            .into_iter()
            .map(|d| format!("cgroup {}", d.display())),
    );
    let dir = std::env::temp_dir().join(name);
    if dir.exists() && std::env::var_os("LAMEDUCK_LAB_KEEP").is_none() {
        left.push(format!("directory {}", dir.display()));
    }
    for d in HOST_DIRS_MADE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        if d.exists() {
            left.push(format!("directory {}", d.display()));
        }
    }
    left
}

static LEFT_PIDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static HOST_DIRS_MADE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

// ---------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------

struct Proc {
    name: &'static str,
    child: Child,
}

/// A running lab; see the module documentation.
pub struct Lab {
    netns: String,
    dir: PathBuf,
    cp: Option<ControlPlane>,
    procs: Vec<Proc>,
    holder: Option<Child>,
    cgroup_root: String,
    host_dirs_made: Vec<PathBuf>,
    node_bins: PathBuf,
    k8s_bins: PathBuf,
    /// Nothing to a Ready, untainted node with `kube-root-ca.crt`.
    pub started_in: Duration,
    /// Of which: importing the images into containerd.
    pub images_in: Duration,
}

impl Lab {
    async fn start(netns: String, bins: &Path, node: &Path, image: &Path) -> Lab {
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(&netns);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("lab dir");
        fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("owner.pid");
        let mut lab = Lab {
            cgroup_root: format!("/{netns}"),
            netns,
            dir,
            cp: None,
            procs: Vec::new(),
            holder: None,
            host_dirs_made: Vec::new(),
            node_bins: node.to_path_buf(),
            k8s_bins: bins.to_path_buf(),
            started_in: Duration::ZERO,
            images_in: Duration::ZERO,
        };
        if let Err(e) = lab.network() {
            panic!("lab: network: {e}");
        }
        // The kubelet refuses a cgroupRoot that does not exist.
        for h in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::create_dir(h.path().join(&lab.netns));
        }
        if let Err(e) = lab.mount_namespace() {
            panic!("lab: mount namespace: {e}");
        }
        if let Err(e) = lab.spawn_containerd() {
            panic!("lab: containerd: {e}");
        }
        let cp = ControlPlane::builder()
            .apiserver_arg("--bind-address=0.0.0.0")
            .apiserver_arg(format!("--advertise-address={NODE_IP}"))
            // Pods reach the API through the `kubernetes` Service, whose
            // endpoint the lease reconciler publishes.
            .apiserver_arg("--endpoint-reconciler-type=lease")
            .apiserver_san_ip(NODE_IP)
            // `kubectl logs`: the node's name resolves nowhere in the lab.
            .apiserver_arg("--kubelet-preferred-address-types=InternalIP")
            .controller_manager_arg("--node-monitor-grace-period=40s")
            .start()
            .await;
        lab.cp = Some(cp);
        let ti = Instant::now();
        if let Err(e) = lab.wait_containerd().and_then(|()| lab.import(image)) {
            lab.dump_logs();
            panic!("lab: containerd: {e}");
        }
        lab.images_in = ti.elapsed();
        if let Err(e) = lab.spawn_node() {
            panic!("lab: node components: {e}");
        }
        if let Err(e) = lab.wait_node(t0 + START_DEADLINE).await {
            lab.dump_logs();
            panic!("lab: node not usable: {e}");
        }
        lab.started_in = t0.elapsed();
        eprintln!(
            "lab: node Ready and untainted in {:.1?} (images imported in {:.1?}); RSS {} MiB",
            lab.started_in,
            lab.images_in,
            lab.rss_kib() / 1024
        );
        lab
    }

    /// The control plane (admin client, kubeconfig, logs).
    pub fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("control plane started")
    }

    /// The lab's directory (logs/, configs, containerd's state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kubectl` with the admin kubeconfig; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The kubectl binary.
    pub fn kubectl_path(&self) -> PathBuf {
        self.k8s_bins.join("kubectl")
    }

    /// `kubectl` with the admin kubeconfig, its output whatever the status.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new(self.k8s_bins.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", self.cp().admin_kubeconfig())
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// `kubectl apply -f -` of a YAML document stream.
    pub fn apply_yaml(&self, yaml: &str) {
        let path = self.dir.join(format!("apply-{}.yaml", random_suffix()));
        fs::write(&path, yaml).expect("write manifest");
        self.kubectl(&["apply", "-f", &path.display().to_string()]);
    }

    /// Resident memory of every lab process (control plane, node, pods,
    /// shims), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.lab_pids()
            .iter()
            .map(|pid| {
                fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Processes of the lab: in its netns or mount namespace, or in a cgroup
    /// under its cgroup root (pods have netns and mount namespaces of their
    /// own).
    pub fn lab_pids(&self) -> Vec<i32> {
        // The inode of the netns' bind mount is the namespace's.
        let netns = fs::metadata(format!("/run/netns/{}", self.netns))
            .ok()
            .map(|m| m.ino());
        let mnt = self
            .holder
            .as_ref()
            .and_then(|h| ns_inode(&h.id().to_string(), "mnt"));
        let me = std::process::id() as i32;
        pids_matching(|pid| {
            pid != me
                && ((netns.is_some() && ns_inode(&pid.to_string(), "net") == netns)
                    || (mnt.is_some() && ns_inode(&pid.to_string(), "mnt") == mnt)
                    || in_cgroup(pid, &self.cgroup_root))
        })
    }

    /// `ip <args>` in the lab's netns; panics on failure.
    /// The image of the lab's hostile pod (`tests/lab/flood.c`, built by
    /// `scripts/node-build.sh`).
    pub fn flood_image(&self) -> String {
        let name = fs::read_to_string(self.node_bins.join("flood.name"))
            .unwrap_or_else(|e| panic!("flood.name from node-build.sh: {e}"));
        name.trim().to_owned()
    }

    pub fn ip(&self, args: &[&str]) {
        sh(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Pod cgroups (`pod<uid>` directories) under the lab's cgroup root, in
    /// the pids hierarchy.
    pub fn pod_cgroups(&self) -> usize {
        fn count(dir: &Path) -> usize {
            let Ok(entries) = fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| {
                    let own = usize::from(e.file_name().to_string_lossy().starts_with("pod"));
                    own + count(&e.path())
                })
                .sum()
        }
        count(&Path::new("/sys/fs/cgroup/pids").join(self.cgroup_root.trim_start_matches('/')))
    }

    /// The lab's cgroup directories still on the host (all hierarchies).
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        cgroup_dirs(&self.cgroup_root)
    }

    /// Number of network namespaces of pods (containerd's) still mounted.
    pub fn pod_netns_count(&self) -> usize {
        fs::read_dir(
            self.dir
                .join("containerd/state/io.containerd.grpc.v1.cri/netns"),
        )
        .map(|d| d.count())
        .unwrap_or(0)
    }

    /// Prints the tail of every component's log.
    pub fn dump_logs(&self) {
        if let Some(cp) = &self.cp {
            cp.dump_logs_tail(30);
        }
        for p in &self.procs {
            let text = fs::read_to_string(self.log(p.name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!("----- {} -----\n{}", p.name, lines[from..].join("\n"));
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    // -- start-up ---------------------------------------------------------

    fn network(&self) -> Result<(), String> {
        // Run from the lab thread: `ip` acts on the lab's netns.
        sh(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        sh(Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]))?;
        // ClusterIPs are virtual: kube-proxy DNATs them in OUTPUT, but the
        // first route lookup needs a route, and the source is the node IP.
        sh(Command::new("ip").args([
            "route",
            "add",
            k8s::SERVICE_CIDR,
            "dev",
            "lo",
            "src",
            NODE_IP,
        ]))?;
        Ok(())
    }

    /// The holder of the lab's mount namespace, with everything mounted.
    fn mount_namespace(&mut self) -> Result<(), String> {
        let d = &self.dir;
        for sub in [
            "logs",
            "sysctl",
            "host/device-plugins",
            "host/containers-log",
            "host/cni",
            "host/shim-s",
            "kubelet",
            "pod-logs",
            "cni/net.d",
            "cni/ipam",
            "containerd",
        ] {
            fs::create_dir_all(d.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let mut script = String::from("set -eu\n");
        // A sysfs of the lab's netns (`/sys/class/net` shows cni0 and the
        // veths), which hides the host's cgroup mounts: re-mount each
        // hierarchy as PID 1 has it.
        script.push_str("mount -t sysfs sysfs /sys\n");
        script.push_str("mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n");
        let mountinfo = fs::read_to_string("/proc/1/mountinfo").map_err(|e| e.to_string())?;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mp = left.split_whitespace().nth(4).unwrap_or("");
            let mut r = right.split_whitespace();
            let (fstype, _src, opts) = (
                r.next().unwrap_or(""),
                r.next().unwrap_or(""),
                r.next().unwrap_or(""),
            );
            if !mp.starts_with("/sys/fs/cgroup/") {
                continue;
            }
            match fstype {
                "cgroup" => {
                    let _ = writeln!(
                        script,
                        "mkdir -p {mp} && mount -t cgroup -o {opts} cgroup {mp}"
                    );
                }
                "cgroup2" => {
                    let _ = writeln!(script, "mkdir -p {mp} && mount -t cgroup2 cgroup2 {mp}");
                }
                _ => {}
            }
        }
        // The kubelet (protectKernelDefaults: true) only checks these; read-only
        // copies with its values stand in for the host's.
        for (key, want) in [
            ("vm/overcommit_memory", "1"),
            ("vm/panic_on_oom", "0"),
            ("kernel/panic", "10"),
            ("kernel/panic_on_oops", "1"),
            ("kernel/keys/root_maxkeys", "1000000"),
            ("kernel/keys/root_maxbytes", "25000000"),
        ] {
            let have = fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
            if have.trim() == want {
                continue;
            }
            let file = d.join("sysctl").join(key.replace('/', "."));
            fs::write(&file, format!("{want}\n")).map_err(|e| e.to_string())?;
            let _ = writeln!(
                script,
                "mount --bind {f} /proc/sys/{key} && mount -o remount,bind,ro /proc/sys/{key}",
                f = file.display()
            );
        }
        // Paths that ignore --root-dir and the configured state dirs.
        for (host, lab) in [
            ("/var/lib/kubelet/device-plugins", "host/device-plugins"),
            ("/var/log/containers", "host/containers-log"),
            ("/var/lib/cni", "host/cni"),
            ("/run/containerd/s", "host/shim-s"),
        ] {
            let host = Path::new(host);
            if !host.exists() {
                // The mount point must exist on the host; made (and removed
                // at teardown) only when missing, from the top-most missing
                // ancestor so that nothing is left behind.
                let mut top = host.to_path_buf();
                while let Some(parent) = top.parent() {
                    if parent.exists() {
                        break;
                    }
                    top = parent.to_path_buf();
                }
                fs::create_dir_all(host).map_err(|e| format!("mkdir {}: {e}", host.display()))?;
                self.host_dirs_made.push(top);
            }
            let _ = writeln!(
                script,
                "mount --bind {} {}",
                d.join(lab).display(),
                host.display()
            );
        }
        let ready = d.join("mounts.ready");
        let _ = writeln!(script, ": >{}\nexec sleep infinity", ready.display());
        let path = d.join("mounts.sh");
        fs::write(&path, &script).map_err(|e| e.to_string())?;
        let log = File::create(self.log("mounts")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        with_pdeathsig(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("unshare: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "mounts.sh exited {st}: {}",
                    fs::read_to_string(self.log("mounts")).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err("mounts.sh did not finish in 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.holder = Some(child);
        Ok(())
    }

    /// A command run inside the lab's mount namespace (and netns).
    fn in_mount_ns(&self, bin: &Path) -> Command {
        let holder = self.holder.as_ref().expect("holder").id();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{holder}/ns/mnt"))
            .arg("--")
            .arg(bin);
        cmd
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> Result<(), String> {
        let log = File::create(self.log(name)).map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .current_dir(&self.dir);
        with_pdeathsig(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        self.procs.push(Proc { name, child });
        Ok(())
    }

    fn containerd_sock(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    fn spawn_containerd(&mut self) -> Result<(), String> {
        let c = self.dir.join("containerd");
        let pause = fs::read_to_string(self.node_bins.join("pause.name"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        let config = format!(
            r#"version = 3
root = "{c}/root"
state = "{c}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"
[plugins."io.containerd.cri.v1.runtime"]
  # No CAP_SYS_RESOURCE here: never ask for an oom_score_adj below ours.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pod netns under the lab's state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "{runc}"
      # runc's state, else under the host's /run/containerd/runc.
      Root = "{c}/runc"
      SystemdCgroup = false
"#,
            c = c.display(),
            d = self.dir.display(),
            sock = self.containerd_sock().display(),
            runc = self.node_bins.join("runc").display(),
        );
        fs::write(c.join("config.toml"), config).map_err(|e| e.to_string())?;
        let cni = format!(
            r#"{{"cniVersion":"1.0.0","name":"lab","plugins":[{{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"hairpinMode":true,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{POD_CIDR}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{d}/cni/ipam"}}}}]}}"#,
            d = self.dir.display()
        );
        fs::write(self.dir.join("cni/net.d/10-lab.conflist"), cni).map_err(|e| e.to_string())?;
        let mut cmd = self.in_mount_ns(&self.node_bins.join("containerd"));
        cmd.arg("--config").arg(c.join("config.toml"));
        // The shim is found on PATH.
        cmd.env(
            "PATH",
            format!(
                "{}:{}",
                self.node_bins.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
        self.spawn("containerd", cmd)
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.node_bins.join("ctr"))
            .arg("--address")
            .arg(self.containerd_sock())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn wait_containerd(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            match self.ctr(&["version"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn import(&self, image: &Path) -> Result<(), String> {
        let node_images = ["pause.tar", "flood.tar"].map(|tar| self.node_bins.join(tar));
        for tar in node_images.iter().chain([&image.to_path_buf()]) {
            self.ctr(&["images", "import", &tar.display().to_string()])?;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for p in &mut self.procs {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(format!("{} exited ({st})", p.name));
            }
        }
        Ok(())
    }

    fn spawn_node(&mut self) -> Result<(), String> {
        let kubeconfig = self.cp().admin_kubeconfig().to_path_buf();
        let d = self.dir.clone();
        let hard_nofile =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, h)| h)
                .unwrap_or(65536);
        let resolv = d.join("resolv.conf");
        fs::write(&resolv, "").map_err(|e| e.to_string())?;
        let kubelet_config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 on these machines, deprecated upstream: opt in explicitly.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {root}
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
# No CAP_SYS_RESOURCE: keep the inherited values.
oomScoreAdj: 0
maxOpenFiles: {hard_nofile}
protectKernelDefaults: true
failSwapOn: false
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: unix://{sock}
podLogsDir: {d}/pod-logs
resolvConf: {resolv}
clusterDomain: cluster.local
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
fileCheckFrequency: 60s
"#,
            root = self.cgroup_root,
            port = k8s::free_port(),
            sock = self.containerd_sock().display(),
            d = d.display(),
            resolv = resolv.display(),
        );
        fs::write(d.join("kubelet.yaml"), kubelet_config).map_err(|e| e.to_string())?;
        let mut cmd = self.in_mount_ns(&self.k8s_bins.join("kubelet"));
        cmd.arg(format!("--config={}", d.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--cert-dir={}", d.join("kubelet/pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=1");
        self.spawn("kubelet", cmd)?;

        let mut cmd = Command::new(self.k8s_bins.join("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--leader-elect=false", "--secure-port=0", "--v=0"]);
        self.spawn("kube-scheduler", cmd)?;

        let proxy_config = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
oomScoreAdj: 0
# 0: leave the host-wide conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
healthzBindAddress: ""
metricsBindAddress: ""
"#,
            kubeconfig = kubeconfig.display()
        );
        fs::write(d.join("kube-proxy.yaml"), proxy_config).map_err(|e| e.to_string())?;
        let mut cmd = self.in_mount_ns(&self.k8s_bins.join("kube-proxy"));
        cmd.arg(format!("--config={}", d.join("kube-proxy.yaml").display()))
            .arg("--v=0");
        self.spawn("kube-proxy", cmd)?;
        Ok(())
    }

    /// The node is Ready without taints, and the controllers have published
    /// `kube-root-ca.crt` and the `default` ServiceAccount (pods fail to start
    /// without them).
    async fn wait_node(&mut self, deadline: Instant) -> Result<(), String> {
        let client = self.cp().client();
        let nodes: Api<Node> = Api::all(client.clone());
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        loop {
            self.check_alive()?;
            let node = nodes.get_opt(NODE_NAME).await.ok().flatten();
            let ready = node.as_ref().is_some_and(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            let untainted = node.as_ref().is_some_and(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_none_or(|t| t.is_empty())
            });
            let cm = matches!(cms.get_opt("kube-root-ca.crt").await, Ok(Some(_)));
            let sa = matches!(sas.get_opt("default").await, Ok(Some(_)));
            if ready && untainted && cm && sa {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node exists {} ready {ready} untainted {untainted} kube-root-ca.crt {cm} sa {sa}",
                    node.is_some()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // -- teardown ---------------------------------------------------------

    fn teardown(&mut self) {
        let t = Instant::now();
        // Everything of the lab, by identity; the holder last (its exit frees
        // the mount namespace and with it every mount made inside).
        let holder = self.holder.as_ref().map(|h| h.id() as i32);
        // A few rounds: a shim may start a process while the first round
        // kills. Whatever survives is recorded below and fails `run`.
        for _ in 0..3 {
            let pids: Vec<i32> = self
                .lab_pids()
                .into_iter()
                .filter(|p| Some(*p) != holder)
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            for p in &mut self.procs {
                let _ = p.child.wait();
            }
            if let Some(cp) = self.cp.take() {
                drop(cp);
            }
            wait_gone(&pids, Duration::from_secs(10));
        }
        self.procs.clear();
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let left = self.lab_pids();
        if !left.is_empty() {
            let mut rec = LEFT_PIDS.lock().unwrap_or_else(|p| p.into_inner());
            for pid in left {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                rec.push(format!("{pid} ({})", comm.trim()));
            }
        }
        remove_cgroups(&self.cgroup_root);
        let _ = sh(Command::new("ip").args(["netns", "del", &self.netns]));
        for d in self.host_dirs_made.drain(..).rev() {
            // Empty directories only: a real node's files are never removed.
            remove_empty_tree(&d);
            HOST_DIRS_MADE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d);
        }
        if std::env::var_os("LAMEDUCK_LAB_KEEP").is_some() {
            let _ = fs::remove_file(self.dir.join("owner.pid"));
            eprintln!("lab: kept {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab: cannot remove {}: {e}", self.dir.display());
        }
        eprintln!("lab: torn down in {:.1?}", t.elapsed());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("lab: test panicked; logs follow");
            self.dump_logs();
        }
        self.teardown();
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn with_pdeathsig(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            Ok(())
        });
    }
}

fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn random_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

fn ns_inode(pid: &str, ns: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

fn pids_matching(mut f: impl FnMut(i32) -> bool) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .filter(|pid| f(*pid))
        .collect()
}

/// Alive and not a zombie (an orphan waits for PID 1 to reap it).
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command, which is in parentheses and may hold
    // spaces: look after the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("");
    state != "Z" && state != "X"
}

fn in_cgroup(pid: i32, root: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| {
            c.lines().any(|l| {
                l.splitn(3, ':')
                    .nth(2)
                    .is_some_and(|p| p == root || p.starts_with(&format!("{root}/")))
            })
        })
        .unwrap_or(false)
}

fn wait_gone(pids: &[i32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(hier) = fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for h in hier.flatten() {
        let d = h.path().join(root.trim_start_matches('/'));
        if d.is_dir() {
            out.push(d);
        }
    }
    out
}

/// Removes a cgroup tree deepest first (rmdir: a cgroup's files are not
/// files; a cgroup with processes stays and is reported).
fn remove_cgroups(root: &str) {
    fn rm(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path());
                }
            }
        }
        if let Err(e) = fs::remove_dir(dir) {
            eprintln!("lab: cannot remove cgroup {}: {e}", dir.display());
        }
    }
    for d in cgroup_dirs(root) {
        rm(&d);
    }
}

fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Labs of test processes that are gone (killed before their Drop ran):
/// their pods, shims and containerd outlive them (PR_SET_PDEATHSIG covers
/// only our direct children). Kill by netns / cgroup identity, then remove.
fn sweep_stale_labs() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    let mut names: BTreeSet<String> = BTreeSet::new();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(NETNS_PREFIX) {
            names.insert(n);
        }
    }
    for h in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for c in fs::read_dir(h.path()).into_iter().flatten().flatten() {
            let n = c.file_name().to_string_lossy().to_string();
            if n.starts_with(NETNS_PREFIX) {
                names.insert(n);
            }
        }
    }
    for name in names {
        let owner: Option<i32> = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse().ok());
        if owner.is_some_and(alive) {
            continue;
        }
        eprintln!("lab: sweeping {name}, left by a test process that is gone");
        let netns = fs::metadata(format!("/run/netns/{name}"))
            .ok()
            .map(|m| m.ino());
        let root = format!("/{name}");
        let pids = pids_matching(|pid| {
            (netns.is_some() && ns_inode(&pid.to_string(), "net") == netns) || in_cgroup(pid, &root)
        });
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        wait_gone(&pids, Duration::from_secs(10));
        remove_cgroups(&root);
        let _ = sh(Command::new("ip").args(["netns", "del", &name]));
        let _ = fs::remove_dir_all(std::env::temp_dir().join(&name));
    }
}
