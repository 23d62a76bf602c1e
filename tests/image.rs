//! The container image, built here for real: `scripts/image.sh` makes a
//! static binary and an OCI image from scratch with umoci (no container
//! engine), and these tests read what it wrote, byte by byte:
//!
//! - the OCI layout (index.json → manifest → config), every blob checked
//!   against its digest and size;
//! - the config: entrypoint, numeric user, exposed ports, labels;
//! - the one layer: exactly `lameduck`, 0755, statically linked, and the
//!   extracted file runs and reports the crate's version;
//! - name resolution inside the image's root filesystem (a chroot as the
//!   image's user): static glibc resolves `localhost` through /etc/hosts as
//!   the kubelet mounts it, and without one only addresses work;
//! - the oci-archive tarball holds the same layout;
//! - the Dockerfile's final stage declares the same ENTRYPOINT, USER and
//!   EXPOSE.
//!
//! Nothing is skipped: the script installs umoci and file when they are
//! missing, and a missing tool or privilege fails with a message saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The image's user, as the Dockerfile gives it (numeric, for runAsNonRoot).
const USER: &str = "65532:65532";

struct Image {
    layout: PathBuf,
    archive: PathBuf,
    /// The image's root filesystem: the layer, extracted with GNU tar.
    rootfs: tempfile::TempDir,
    /// `tar -tvzf` of the layer.
    listing: String,
}

/// Runs `scripts/image.sh` once per test binary (it is cached across runs:
/// a no-op when nothing changed) and extracts the layer.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = run(Command::new("bash")
            .arg("scripts/image.sh")
            .current_dir(REPO));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| -> PathBuf {
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("scripts/image.sh printed no {key}...: {stdout}"));
            PathBuf::from(line)
        };
        let layout = field("layout=");
        let archive = field("archive=");
        assert!(
            archive.ends_with(format!("lameduck-{VERSION}.tar")),
            "{archive:?}"
        );

        let layer = blob(&layout, &layer_descriptor(&layout)["digest"]);
        let rootfs = tempfile::tempdir().expect("tempdir");
        // GNU tar is strict about the end-of-archive blocks, which umoci 0.4.7's
        // `insert` leaves out: exit 0 here means the layer is complete.
        let listing = run(Command::new("tar").arg("-tvzf").arg(&layer));
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&layer)
            .arg("-C")
            .arg(rootfs.path()));
        Image {
            layout,
            archive,
            rootfs,
            listing: String::from_utf8_lossy(&listing.stdout).into_owned(),
        }
    })
}

/// Runs a command to completion; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The path of a blob, given its digest (`sha256:<hex>`).
fn blob(layout: &Path, digest: &Value) -> PathBuf {
    let digest = digest.as_str().expect("digest is a string");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    layout.join("blobs/sha256").join(hex)
}

fn sha256_of(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

/// Reads the blob a descriptor points at, after checking its size and digest.
fn checked_blob(layout: &Path, desc: &Value) -> PathBuf {
    let path = blob(layout, &desc["digest"]);
    let size = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("blob {}: {e}", path.display()))
        .len();
    assert_eq!(Some(size), desc["size"].as_u64(), "size of {desc}");
    assert_eq!(
        format!("sha256:{}", sha256_of(&path)),
        desc["digest"].as_str().unwrap(),
        "digest of {}",
        path.display()
    );
    path
}

fn index(layout: &Path) -> Value {
    read_json(&layout.join("index.json"))
}

fn manifest(layout: &Path) -> Value {
    let index = index(layout);
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the layout: {index}");
    read_json(&checked_blob(layout, &manifests[0]))
}

fn config(layout: &Path) -> Value {
    read_json(&checked_blob(layout, &manifest(layout)["config"]))
}

fn layer_descriptor(layout: &Path) -> Value {
    let manifest = manifest(layout);
    let layers = manifest["layers"].as_array().expect("manifest.layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    layers[0].clone()
}

/// The runtime settings that both the image config and the Dockerfile give.
#[derive(Debug, PartialEq)]
struct Runtime {
    entrypoint: Vec<String>,
    user: String,
    ports: BTreeSet<String>,
}

fn runtime_of_config(config: &Value) -> Runtime {
    let c = &config["config"];
    Runtime {
        entrypoint: c["Entrypoint"]
            .as_array()
            .expect("config.Entrypoint")
            .iter()
            .map(|v| v.as_str().expect("entrypoint string").to_owned())
            .collect(),
        user: c["User"].as_str().expect("config.User").to_owned(),
        ports: c["ExposedPorts"]
            .as_object()
            .expect("config.ExposedPorts")
            .keys()
            .cloned()
            .collect(),
    }
}

#[test]
fn layout_and_config_are_the_sidecar_image() {
    let img = image();
    let layout = &img.layout;
    assert_eq!(
        read_json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );

    let index = index(layout);
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let annotations = &desc["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], VERSION);
    // What `ctr images import` names the image after.
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("docker.io/library/lameduck:{VERSION}").as_str()
    );

    let manifest = manifest(layout);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layer = layer_descriptor(layout);
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer_path = checked_blob(layout, &layer);

    let config = config(layout);
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    // The diff_id is the digest of the uncompressed layer.
    let unzipped = run(Command::new("bash")
        .args(["-o", "pipefail", "-c", r#"gzip -dc "$1" | sha256sum"#, "_"])
        .arg(&layer_path))
    .stdout;
    let unzipped = String::from_utf8_lossy(&unzipped);
    let diff_id = format!("sha256:{}", unzipped.split_whitespace().next().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));

    assert_eq!(
        runtime_of_config(&config),
        Runtime {
            entrypoint: vec!["/lameduck".to_owned()],
            user: USER.to_owned(),
            ports: ["8000/tcp", "9901/tcp"].map(String::from).into(),
        }
    );
    let c = &config["config"];
    // No CMD (arguments come from the pod spec), no shell, nothing inherited.
    assert!(c.get("Cmd").is_none_or(Value::is_null), "{c}");
    assert!(c.get("Env").is_none_or(Value::is_null), "{c}");

    let labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .expect("config.Labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("label string").to_owned()))
        .collect();
    let label = |name: &str| -> &str {
        labels
            .get(&format!("org.opencontainers.image.{name}"))
            .unwrap_or_else(|| panic!("label org.opencontainers.image.{name} missing: {labels:?}"))
    };
    assert_eq!(label("title"), "lameduck");
    assert_eq!(label("version"), VERSION);
    assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
    assert_eq!(label("description"), env!("CARGO_PKG_DESCRIPTION"));
    assert!(!label("source").is_empty());
    let head = run(Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(REPO))
    .stdout;
    let head = String::from_utf8_lossy(&head).trim().to_owned();
    let revision = label("revision");
    assert!(
        revision == head || revision == format!("{head}-dirty"),
        "revision label {revision:?}, HEAD {head}"
    );
}

#[test]
fn the_layer_is_one_static_lameduck() {
    let img = image();
    let lines: Vec<&str> = img.listing.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "the layer holds one entry:\n{}",
        img.listing
    );
    // `-rwxr-xr-x 0/0 50582184 2026-12-01 11:54 lameduck`
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields[0], "-rwxr-xr-x", "{}", lines[0]);
    assert_eq!(fields[1], "0/0", "owned by root: {}", lines[0]);
    assert_eq!(fields.last(), Some(&"lameduck"), "{}", lines[0]);

    let entries: Vec<_> = std::fs::read_dir(img.rootfs.path())
        .expect("rootfs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        entries,
        ["lameduck"],
        "the image's root holds only /lameduck"
    );
    let bin = img.rootfs.path().join("lameduck");
    let meta = std::fs::metadata(&bin).expect("/lameduck");
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);

    // Static: no program interpreter (the ELF header says so, whatever the
    // tools), and `file` and `ldd` agree.
    let elf = std::fs::read(&bin).expect("read /lameduck");
    assert!(
        !has_interpreter(&elf),
        "/lameduck asks for a dynamic loader"
    );
    // The check itself: cargo's own (dynamically linked) build has one.
    let dynamic = std::fs::read(env!("CARGO_BIN_EXE_lameduck")).expect("read the test binary");
    assert!(has_interpreter(&dynamic), "the ELF check misses PT_INTERP");
    let file = run(Command::new("file").arg("-b").arg(&bin)).stdout;
    let file = String::from_utf8_lossy(&file);
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "file: {file}"
    );
    let ldd = Command::new("ldd").arg(&bin).output().expect("run ldd");
    let ldd = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "ldd: {ldd}"
    );

    let version = run(Command::new(&bin).arg("--version")).stdout;
    assert_eq!(
        String::from_utf8_lossy(&version).trim(),
        format!("lameduck {VERSION}")
    );
}

/// Whether an ELF64 little-endian file has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

/// A tiny HTTP/1.1 app on 127.0.0.1 that answers every request `200 ok`.
fn app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the app");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                loop {
                    let mut line = String::new();
                    // Requests without a body, as `get` sends them.
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0)
                        && !line.ends_with("\r\n\r\n")
                    {}
                    if !line.ends_with("\r\n\r\n") {
                        return;
                    }
                    let body = "ok";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// GET / on 127.0.0.1:port; returns the status line.
fn get(port: u16) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: image-test\r\nconnection: close\r\n\r\n")
        .expect("send");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).ok();
    resp.lines().next().unwrap_or("").to_owned()
}

/// `/lameduck` started inside `root` (chroot, as the image's user), on
/// kernel-chosen loopback ports. Killed on drop.
struct Jailed {
    child: Child,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Jailed {
    fn start(root: &Path, upstream: &str) -> Jailed {
        assert!(
            String::from_utf8_lossy(&run(Command::new("id").arg("-u")).stdout).trim() == "0",
            "tests/image.rs runs /lameduck in a chroot of the image's root filesystem, \
             which needs root (CAP_SYS_CHROOT); run the suite as root"
        );
        // coreutils' chroot lives in /usr/sbin, often not on a test's PATH.
        let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chroot (coreutils) is not installed");
        let mut child = Command::new(chroot)
            .arg(format!("--userspec={USER}"))
            .arg(root)
            .args(["/lameduck", "--upstream", upstream])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--drain-delay", "0s", "--metrics-linger", "0s"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chroot");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Jailed {
            child,
            stderr: rx,
            seen: Vec::new(),
        }
    }

    /// The proxy port from the `listening` log line.
    fn proxy_port(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.stderr.recv_timeout(left) else {
                break;
            };
            self.seen.push(line.clone());
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "listening" {
                let addr = v["proxy"].as_str().expect("proxy address");
                return addr.rsplit(':').next().unwrap().parse().expect("port");
            }
        }
        panic!(
            "no `listening` line; stderr so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits for the exit (it should exit by itself); returns code and stderr.
    fn exit(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status.code(), self.seen.join("\n"));
            }
            assert!(Instant::now() < deadline, "/lameduck did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the image's root filesystem that the test may add files to.
fn scratch_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    // Traversable by the image's user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dst = dir.path().join("lameduck");
    std::fs::copy(image().rootfs.path().join("lameduck"), &dst).expect("copy /lameduck");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `--upstream` takes a name, resolved once at start-up by glibc's
/// getaddrinfo. Linked statically, glibc still has its `files` and `dns`
/// back-ends (built in since 2.34) and no /etc/nsswitch.conf means "files,
/// then dns"; back-ends that would be loaded as libnss_*.so (myhostname,
/// mdns, resolve, sss, ...) cannot be. So in the image:
/// - with /etc/hosts, as the kubelet mounts into every container,
///   `localhost:PORT` resolves and is proxied to;
/// - with no /etc at all (the bare image, e.g. under plain `ctr run`), a name
///   does not resolve and lameduck refuses to start (exit 2); an address
///   works.
#[test]
fn the_image_resolves_upstream_names_through_etc_hosts() {
    let app = app();

    // The bare image: nothing but /lameduck.
    let bare = scratch_root();
    let (code, stderr) = Jailed::start(bare.path(), &format!("localhost:{app}")).exit();
    assert_eq!(code, Some(2), "exit status; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "--upstream \"localhost:{app}\" could not be resolved"
        )),
        "{stderr}"
    );
    let mut by_address = Jailed::start(bare.path(), &format!("127.0.0.1:{app}"));
    let port = by_address.proxy_port();
    assert_eq!(get(port), "HTTP/1.1 200 OK");
    drop(by_address);

    // /etc/hosts as the kubelet writes it (and a hostAliases entry).
    let pod = scratch_root();
    std::fs::create_dir(pod.path().join("etc")).unwrap();
    std::fs::write(
        pod.path().join("etc/hosts"),
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         10.244.0.7\tdemo-7d4b9c\n\n# Entries added by HostAliases.\n127.0.0.1\tmy-app\n",
    )
    .unwrap();
    for name in ["localhost", "my-app"] {
        let mut proxy = Jailed::start(pod.path(), &format!("{name}:{app}"));
        let port = proxy.proxy_port();
        assert_eq!(get(port), "HTTP/1.1 200 OK", "--upstream {name}:{app}");
    }
}

#[test]
fn the_archive_holds_the_layout() {
    let img = image();
    let listing = run(Command::new("tar").arg("-tf").arg(&img.archive)).stdout;
    let in_archive: BTreeSet<String> = String::from_utf8_lossy(&listing)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_owned)
        .collect();
    let mut in_layout = BTreeSet::from(["oci-layout".to_owned(), "index.json".to_owned()]);
    for entry in std::fs::read_dir(img.layout.join("blobs/sha256")).unwrap() {
        let name = entry.unwrap().file_name();
        in_layout.insert(format!("blobs/sha256/{}", name.to_string_lossy()));
    }
    assert_eq!(in_archive, in_layout);
    // And index.json is the same bytes.
    let index = run(Command::new("tar")
        .arg("-xOf")
        .arg(&img.archive)
        .arg("index.json"))
    .stdout;
    assert_eq!(index, std::fs::read(img.layout.join("index.json")).unwrap());
}

/// The Dockerfile cannot be built here (no container engine), but its final
/// stage's runtime settings can be read and must be the image's. Its file
/// list is not comparable: its runtime is distroless cc-debian12 (glibc,
/// libgcc, CA certificates, /etc/passwd, ...) with a dynamically linked
/// binary, where this image is scratch with a static one.
#[test]
fn the_image_agrees_with_the_dockerfile() {
    let dockerfile = std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).unwrap();
    let from_dockerfile = dockerfile_runtime(&dockerfile);
    assert_eq!(from_dockerfile, runtime_of_config(&config(&image().layout)));
}

/// ENTRYPOINT, USER and EXPOSE of the Dockerfile's last stage.
fn dockerfile_runtime(dockerfile: &str) -> Runtime {
    // Join continuation lines, drop comments and blank lines.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.to_ascii_uppercase().starts_with("FROM "))
        .expect("a FROM line");
    let (mut entrypoint, mut user, mut ports) = (None, None, BTreeSet::new());
    for ins in &instructions[last_from + 1..] {
        let (word, rest) = ins.split_once(char::is_whitespace).unwrap_or((ins, ""));
        let rest = rest.trim();
        match word.to_ascii_uppercase().as_str() {
            "ENTRYPOINT" => {
                let v: Vec<String> = serde_json::from_str(rest).unwrap_or_else(|e| {
                    panic!("ENTRYPOINT is not in exec (JSON) form: {rest}: {e}")
                });
                entrypoint = Some(v);
            }
            "USER" => user = Some(rest.to_owned()),
            "EXPOSE" => {
                for p in rest.split_whitespace() {
                    ports.insert(if p.contains('/') {
                        p.to_owned()
                    } else {
                        format!("{p}/tcp")
                    });
                }
            }
            _ => {}
        }
    }
    Runtime {
        entrypoint: entrypoint.expect("the final stage has an ENTRYPOINT"),
        user: user.expect("the final stage has a USER"),
        ports,
    }
}

#[test]
fn the_dockerfile_parser_reads_the_final_stage_only() {
    let runtime = dockerfile_runtime(
        "FROM a AS b\nUSER 0\nEXPOSE 1\nENTRYPOINT [\"/x\"]\n# c\nFROM b\nEXPOSE 8000 \\\n  9901/udp\n\
         USER 65532:65532\nENTRYPOINT [\"/lameduck\", \"run\"]\n",
    );
    assert_eq!(
        runtime,
        Runtime {
            entrypoint: vec!["/lameduck".to_owned(), "run".to_owned()],
            user: "65532:65532".to_owned(),
            ports: ["8000/tcp", "9901/udp"].map(String::from).into(),
        }
    );
}
