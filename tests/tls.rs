//! TLS on the proxy listener, against the real binary with real clients:
//! curl (HTTP/1.1 and h2 by ALPN), `openssl s_client` (versions,
//! resumption), a rustls client (rotation under load, the drain, mTLS,
//! close_notify). Certificates are made per test by the openssl CLI.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rustls::pki_types::ServerName;
use support::pki::Pki;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// lameduck with TLS on --listen, in front of the demo app.
async fn start(pki: &Pki, cert: &(PathBuf, PathBuf), extra: &[&str]) -> (DemoApp, Lameduck) {
    let app = DemoApp::start().await;
    let up = app.addr.to_string();
    let (crt, key) = (path_str(&cert.0), path_str(&cert.1));
    let mut args = vec!["--upstream", &up, "--tls-cert", &crt, "--tls-key", &key];
    args.extend_from_slice(extra);
    let ld = Lameduck::spawn(&args);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let _ = pki;
    (app, ld)
}

// === clients ===

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs")
}

fn https_url(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One HTTP/1.1 response read off `stream` (Content-Length framing, as the
/// demo app answers): (head, body).
async fn read_response<S: AsyncReadExt + Unpin>(
    stream: &mut S,
) -> std::io::Result<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    Ok((head, body))
}

async fn send_get<S: AsyncWriteExt + Unpin>(stream: &mut S, path: &str, close: bool) {
    let connection = if close { "connection: close\r\n" } else { "" };
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{connection}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn metric(ld: &Lameduck, series: &str) -> f64 {
    parse_metric(&metrics_text(ld.admin_addr()).await, series).unwrap_or(0.0)
}

async fn wait_metric(ld: &Lameduck, series: &str, at_least: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let value = metric(ld, series).await;
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {value}, wanted {at_least}"
        );
        tokio::time::sleep(ms(50)).await;
    }
}

// === tests ===

#[tokio::test]
async fn curl_gets_http1_and_h2_by_alpn_with_the_ca() {
    let pki = Pki::new();
    let (_app, ld) = start(&pki, &pki.server("server"), &[]).await;
    let url = https_url(ld.proxy_addr(), "/headers");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = curl(&[
            "--cacert",
            &pki.ca(),
            flag,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.ends_with(&format!("\n{version} 200")),
            "{flag}: {text}"
        );
        assert!(text.contains("x-forwarded-proto: https"), "{text}");
    }
    // Without the CA, curl refuses the certificate: nothing is served.
    let out = curl(&[&url]);
    assert!(!out.status.success());
    let text = metrics_text(ld.admin_addr()).await;
    assert_eq!(
        parse_metric(&text, r#"lameduck_connections_total{protocol="http2"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        parse_metric(
            &text,
            r#"lameduck_tls_certificate_expiry_timestamp_seconds{listener="proxy"}"#
        )
        .unwrap()
            > 1.7e9
    );
}

/// `openssl s_client` sending one request (so that TLS 1.3 tickets, which
/// follow the handshake, arrive before it quits).
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    use std::io::Write;
    let port = addr.port().to_string();
    let connect = format!("127.0.0.1:{port}");
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "localhost",
            "-ign_eof",
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client runs");
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn h2load_over_tls_gets_every_response() {
    let pki = Pki::new();
    let (_app, ld) = start(&pki, &pki.server("server"), &[]).await;
    let url = https_url(ld.proxy_addr(), "/");
    let out = Command::new("h2load")
        .args(["-n", "400", "-c", "4", "-m", "8", &url])
        .output()
        .expect("h2load runs (scripts/test.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(
        text.contains("400 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_spoken_and_sessions_resume() {
    let pki = Pki::new();
    let (_app, ld) = start(&pki, &pki.server("server"), &[]).await;
    let addr = ld.proxy_addr();
    let ca = pki.ca();
    for old in ["-tls1", "-tls1_1"] {
        // OpenSSL 3 will not even offer these at its default security level.
        let out = s_client(
            addr,
            &[old, "-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", &ca],
        );
        assert!(
            out.contains("Cipher is (NONE)"),
            "{old} was accepted: {out}"
        );
    }
    let out = s_client(addr, &["-tls1_2", "-CAfile", &ca, "-reconnect"]);
    assert!(
        out.contains("Protocol  : TLSv1.2") && out.contains("Verify return code: 0 (ok)"),
        "{out}"
    );
    assert!(
        out.contains("Reused, TLSv1.2"),
        "TLS 1.2 session not resumed: {out}"
    );

    // TLS 1.3: a ticket from the first connection resumes the second.
    let session = pki.path("tls13.session");
    let sess = path_str(&session);
    let first = s_client(addr, &["-tls1_3", "-CAfile", &ca, "-sess_out", &sess]);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let second = s_client(addr, &["-tls1_3", "-CAfile", &ca, "-sess_in", &sess]);
    assert!(
        second.contains("Reused, TLSv1.3"),
        "TLS 1.3 session not resumed: {second}"
    );

    // An SNI the certificate does not cover: the one certificate is served
    // anyway and the client decides (here: verification fails, no crash).
    let other = s_client(
        addr,
        &[
            "-servername",
            "elsewhere.example",
            "-CAfile",
            &ca,
            "-verify_hostname",
            "elsewhere.example",
        ],
    );
    assert!(other.contains("Cipher is TLS_"), "{other}");
    assert!(
        other.contains("Verify return code: 62"),
        "hostname mismatch reported: {other}"
    );

    let text = metrics_text(ld.admin_addr()).await;
    let failures = |reason: &str| {
        parse_metric(
            &text,
            &format!(
                r#"lameduck_tls_handshake_failures_total{{listener="proxy",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(failures("protocol_version"), Some(2.0), "{text}");
    assert!(
        parse_metric(
            &text,
            r#"lameduck_tls_handshakes_total{listener="proxy",session="resumed"}"#
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );
}

#[tokio::test]
async fn cleartext_garbage_and_silence_on_the_tls_port_stall_no_one() {
    let pki = Pki::new();
    let (_app, ld) = start(
        &pki,
        &pki.server("server"),
        &["--tls-handshake-timeout", "1s"],
    )
    .await;
    let addr = ld.proxy_addr();

    // A silent client and one sending garbage, held open meanwhile.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .unwrap();

    // Cleartext HTTP gets a plaintext 400 saying why.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    send_get(&mut plain, "/", false).await;
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("use https://"), "{answer}");

    // Others are served at once.
    let started = Instant::now();
    let config = pki.client_config(&[b"http/1.1"], None);
    let mut tls = tls_connect(addr, config).await.unwrap();
    send_get(&mut tls, "/", true).await;
    let (head, body) = read_response(&mut tls).await.unwrap();
    assert_eq!(status_of(&head), 200);
    assert_eq!(body, "hello from the demo app\n");
    assert!(
        started.elapsed() < secs(1),
        "served after {:?}",
        started.elapsed()
    );

    // The garbage is refused; the silent client is cut at the timeout.
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(secs(2), garbage.read(&mut buf))
        .await
        .expect("garbage connection closed");
    let started = Instant::now();
    let closed = tokio::time::timeout(secs(3), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(started.elapsed() < secs(2));
    // Counted just after the close the client saw: wait for the counters.
    for reason in ["plaintext_http", "timeout", "malformed"] {
        let series = format!(
            r#"lameduck_tls_handshake_failures_total{{listener="proxy",reason="{reason}"}}"#
        );
        wait_metric(&ld, &series, 1.0, secs(2)).await;
        assert_eq!(metric(&ld, &series).await, 1.0, "{series}");
    }
    let text = metrics_text(ld.admin_addr()).await;
    assert_eq!(
        parse_metric(
            &text,
            r#"lameduck_tls_handshakes_in_progress{listener="proxy"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_and_owns_the_identity_header() {
    let pki = Pki::new();
    let ca = pki.ca();
    let (_app, ld) = start(&pki, &pki.server("server"), &["--tls-client-ca", &ca]).await;
    let url = https_url(ld.proxy_addr(), "/headers");
    let forged = "x-forwarded-client-cert: Hash=00;Subject=\"CN=admin\"";

    let out = curl(&["--cacert", &ca, "-H", forged, &url]);
    assert!(!out.status.success(), "served without a client certificate");

    let (crt, key) = pki.leaf("workload", "URI:spiffe://cluster.local/ns/a/sa/b");
    let out = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &path_str(&crt),
        "--key",
        &path_str(&key),
        "-H",
        forged,
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xfcc: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("x-forwarded-client-cert:"))
        .collect();
    assert_eq!(xfcc.len(), 1, "{text}");
    assert!(
        xfcc[0].ends_with(";Subject=\"CN=workload\";URI=spiffe://cluster.local/ns/a/sa/b"),
        "{text}"
    );
    assert!(
        !text.contains("CN=admin"),
        "the forged header reached the app: {text}"
    );
    let text = metrics_text(ld.admin_addr()).await;
    assert_eq!(
        parse_metric(
            &text,
            r#"lameduck_tls_handshake_failures_total{listener="proxy",reason="client_certificate"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

/// Writes a pair the way kubelet updates a Secret volume: a new directory,
/// then `..data` renamed over to point at it.
fn secret_volume(dir: &Path, version: &str, crt: &Path, key: &Path) {
    let target = dir.join(version);
    std::fs::create_dir(&target).unwrap();
    std::fs::copy(crt, target.join("tls.crt")).unwrap();
    std::fs::copy(key, target.join("tls.key")).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
        }
    }
}

fn subject_of(stream: &TlsStream<TcpStream>) -> String {
    let der = &stream.get_ref().1.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.subject().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_nothing_and_a_broken_pair_is_refused() {
    let pki = Pki::new();
    let volume = tempfile::tempdir().unwrap();
    let first = pki.server("first");
    secret_volume(volume.path(), "..v1", &first.0, &first.1);
    let (crt, key) = (volume.path().join("tls.crt"), volume.path().join("tls.key"));
    let (_app, ld) = start(&pki, &(crt, key), &[]).await;
    let addr = ld.proxy_addr();
    let config = pki.client_config(&[b"http/1.1"], None);

    // Steady, bounded load: 4 clients, a new TLS connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, config) = (stop.clone(), ok.clone(), failed.clone(), config.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = async {
                    let mut tls = tls_connect(addr, config.clone()).await?;
                    send_get(&mut tls, "/", true).await;
                    let (head, _) = read_response(&mut tls).await?;
                    std::io::Result::Ok(status_of(&head))
                }
                .await;
                match outcome {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(ms(300)).await;

    // A half-updated Secret: the new certificate with the old key. Refused.
    let second = pki.server("second");
    secret_volume(volume.path(), "..v2", &second.0, &first.1);
    wait_metric(
        &ld,
        r#"lameduck_tls_reloads_total{listener="proxy",result="failure"}"#,
        1.0,
        secs(5),
    )
    .await;
    // A fresh client each time: a resumed session reports the certificate
    // of the session it resumed, not the one being served.
    let fresh = || pki.client_config(&[b"http/1.1"], None);
    let tls = tls_connect(addr, fresh()).await.unwrap();
    assert_eq!(
        subject_of(&tls),
        "CN=first",
        "the broken pair must not be served"
    );
    const REFUSED: &str = "TLS certificate reload refused, still serving the previous certificate";
    ld.wait_for_log(|line| message(line) == REFUSED, secs(5))
        .await;

    // The complete pair: taken, served to new handshakes.
    secret_volume(volume.path(), "..v3", &second.0, &second.1);
    wait_metric(
        &ld,
        r#"lameduck_tls_reloads_total{listener="proxy",result="success"}"#,
        1.0,
        secs(5),
    )
    .await;
    let tls = tls_connect(addr, fresh()).await.unwrap();
    assert_eq!(subject_of(&tls), "CN=second");

    // SIGHUP reloads too.
    ld.signal(Signal::SIGHUP);
    wait_metric(
        &ld,
        r#"lameduck_tls_reloads_total{listener="proxy",result="success"}"#,
        2.0,
        secs(5),
    )
    .await;
    tokio::time::sleep(ms(300)).await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    // Polled every second for seconds since: the broken version was refused once.
    assert_eq!(
        ld.logs_with_message(REFUSED).len(),
        1,
        "one log line per refused version"
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation under load: {ok} requests, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 20, "only {ok} requests in the test");
    let text = metrics_text(ld.admin_addr()).await;
    assert_eq!(
        parse_metric_sum(&text, "lameduck_tls_handshake_failures_total"),
        Some(0.0),
        "{text}"
    );
}

/// Writes a CA bundle the way kubelet updates a Secret volume (see
/// `secret_volume`): `ca.crt` reached through `..data`.
fn ca_volume(dir: &Path, version: &str, bundle: &[u8]) {
    let target = dir.join(version);
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("ca.crt"), bundle).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("ca.crt");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/ca.crt", link).unwrap();
    }
}

/// One GET / over a new TLS connection with `config`: the status, or the
/// error a refused client certificate shows as (with TLS 1.3 the client
/// learns of the refusal at its first read, as an alert or a close).
async fn get_over_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<u16> {
    let mut tls = tls_connect(addr, config).await?;
    send_get(&mut tls, "/", true).await;
    let (head, _) = read_response(&mut tls).await?;
    Ok(status_of(&head))
}

#[tokio::test]
async fn a_client_ca_bundle_swapped_in_the_volume_is_used_without_restart_and_a_broken_one_refused()
{
    let pki = Pki::new();
    let second_ca = Pki::new();
    let volume = tempfile::tempdir().unwrap();
    ca_volume(
        volume.path(),
        "..v1",
        &std::fs::read(pki.path("ca.crt")).unwrap(),
    );
    let bundle = path_str(&volume.path().join("ca.crt"));
    let (_app, ld) = start(&pki, &pki.server("server"), &["--tls-client-ca", &bundle]).await;
    let addr = ld.proxy_addr();
    // Both clients trust the server's CA; each presents a certificate of
    // its own CA. One config each for the whole test, so a session ticket
    // it got is offered again.
    let first_client = pki.client_config(&[b"http/1.1"], Some(&pki.leaf("one", "DNS:one")));
    let second_client = pki.client_config(
        &[b"http/1.1"],
        Some(&second_ca.leaf("two", "URI:spiffe://cluster.local/ns/a/sa/two")),
    );
    const CLIENT_CERT_FAILURES: &str =
        r#"lameduck_tls_handshake_failures_total{listener="proxy",reason="client_certificate"}"#;
    const RELOADED: &str = r#"lameduck_tls_reloads_total{listener="proxy",result="success"}"#;
    const REFUSED_RELOADS: &str =
        r#"lameduck_tls_reloads_total{listener="proxy",result="failure"}"#;

    assert_eq!(get_over_tls(addr, first_client.clone()).await.unwrap(), 200);
    assert_eq!(get_over_tls(addr, first_client.clone()).await.unwrap(), 200);
    wait_metric(
        &ld,
        r#"lameduck_tls_handshakes_total{listener="proxy",session="resumed"}"#,
        1.0,
        secs(5),
    )
    .await;
    let refused = get_over_tls(addr, second_client.clone()).await;
    assert!(refused.is_err(), "CA-2's client served: {refused:?}");
    wait_metric(&ld, CLIENT_CERT_FAILURES, 1.0, secs(5)).await;

    // The bundle becomes CA-2 by a `..data` swap: no restart, no signal.
    ca_volume(
        volume.path(),
        "..v2",
        &std::fs::read(second_ca.path("ca.crt")).unwrap(),
    );
    wait_metric(&ld, RELOADED, 1.0, secs(5)).await;
    let loaded = ld
        .wait_for_log(
            |line| {
                message(line)
                    == "TLS client CA bundle loaded; new handshakes verify client certificates with it"
            },
            secs(5),
        )
        .await;
    assert_eq!(field_u64(&loaded, "certificates"), Some(1), "{loaded}");
    assert_eq!(
        get_over_tls(addr, second_client.clone()).await.unwrap(),
        200
    );
    // CA-1's client is refused now, its session ticket from before the swap
    // included: resuming does not verify the certificate again, so the
    // sessions of the old bundle must end with it.
    let refused = get_over_tls(addr, first_client.clone()).await;
    assert!(refused.is_err(), "CA-1's client still served: {refused:?}");
    wait_metric(&ld, CLIENT_CERT_FAILURES, 2.0, secs(5)).await;

    // Garbage, then an empty bundle: each refused once, CA-2 stays in use.
    const REFUSED: &str = "TLS client CA reload refused, still verifying client certificates with the previous bundle";
    ca_volume(
        volume.path(),
        "..v3",
        b"-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    wait_metric(&ld, REFUSED_RELOADS, 1.0, secs(5)).await;
    assert_eq!(
        get_over_tls(addr, second_client.clone()).await.unwrap(),
        200
    );
    let fresh_second =
        pki.client_config(&[b"http/1.1"], Some(&second_ca.leaf("three", "DNS:three")));
    assert_eq!(get_over_tls(addr, fresh_second).await.unwrap(), 200);
    ca_volume(volume.path(), "..v4", b"");
    wait_metric(&ld, REFUSED_RELOADS, 2.0, secs(5)).await;
    assert_eq!(
        get_over_tls(addr, second_client.clone()).await.unwrap(),
        200
    );
    let refused = get_over_tls(addr, first_client.clone()).await;
    assert!(
        refused.is_err(),
        "CA-1's client served after a refused reload: {refused:?}"
    );

    // Back to a valid bundle, then SIGHUP: both reload (the same bundle
    // twice: the second load finds it unchanged).
    ca_volume(
        volume.path(),
        "..v5",
        &std::fs::read(second_ca.path("ca.crt")).unwrap(),
    );
    wait_metric(&ld, RELOADED, 2.0, secs(5)).await;
    ld.signal(Signal::SIGHUP);
    wait_metric(&ld, RELOADED, 3.0, secs(5)).await;
    assert_eq!(get_over_tls(addr, second_client).await.unwrap(), 200);

    // Polled every second all along: one log line per refused version.
    let refusals = ld.logs_with_message(REFUSED);
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        field_str(&refusals[1], "error").is_some_and(|e| e.contains("no PEM certificate")),
        "{:?}",
        refusals[1]
    );
    assert_eq!(metric(&ld, REFUSED_RELOADS).await, 2.0);
}

#[tokio::test]
async fn the_drain_over_tls_closes_http1_and_finishes_in_flight_requests() {
    let pki = Pki::new();
    let (_app, mut ld) = start(
        &pki,
        &pki.server("server"),
        &["--drain-delay", "1s", "--drain-timeout", "10s"],
    )
    .await;
    let addr = ld.proxy_addr();
    let config = pki.client_config(&[b"http/1.1"], None);

    let mut keepalive = tls_connect(addr, config.clone()).await.unwrap();
    send_get(&mut keepalive, "/", false).await;
    let (head, _) = read_response(&mut keepalive).await.unwrap();
    assert_eq!(status_of(&head), 200);
    assert!(!head.contains("connection: close"), "{head}");

    let mut slow = tls_connect(addr, config.clone()).await.unwrap();
    send_get(&mut slow, "/slow?ms=2000", false).await;
    tokio::time::sleep(ms(200)).await;

    ld.signal(Signal::SIGTERM);
    wait_admin(
        ld.admin_addr(),
        "/ready",
        |status, _| status == 503,
        secs(5),
    )
    .await
    .expect("/ready turns 503");
    // Still accepting during the window, with `Connection: close` over TLS.
    send_get(&mut keepalive, "/", false).await;
    let (head, _) = read_response(&mut keepalive).await.unwrap();
    assert_eq!(status_of(&head), 200);
    assert!(head.contains("connection: close"), "{head}");
    // Closed with close_notify: rustls reports a bare TCP close as an error.
    let mut rest = Vec::new();
    keepalive
        .read_to_end(&mut rest)
        .await
        .expect("a clean close_notify");
    assert!(rest.is_empty());

    let (head, body) = read_response(&mut slow).await.unwrap();
    assert_eq!((status_of(&head), body.as_str()), (200, "slept 2000 ms\n"));
    assert!(head.contains("connection: close"), "{head}");
    let status = ld.wait_exit(secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn the_drain_over_tls_sends_h2_goaway_and_the_deadline_cuts_the_rest() {
    let pki = Pki::new();
    let (_app, mut ld) = start(
        &pki,
        &pki.server("server"),
        &["--drain-delay", "500ms", "--drain-timeout", "3s"],
    )
    .await;
    let addr = ld.proxy_addr();
    let config = pki.client_config(&[b"h2"], None);
    let tls = tls_connect(addr, config.clone()).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let request = |path: &str| {
        http::Request::get(format!("https://localhost{path}"))
            .body(())
            .unwrap()
    };
    let (finishes, _) = send.send_request(request("/slow?ms=1500"), true).unwrap();
    let (cut, _) = send.send_request(request("/slow?ms=20000"), true).unwrap();
    tokio::time::sleep(ms(200)).await;

    let started = Instant::now();
    ld.signal(Signal::SIGTERM);
    let response = finishes.await.unwrap();
    assert_eq!(response.status(), 200);
    // GOAWAY at the end of the window: no new stream is accepted after it.
    tokio::time::sleep(ms(800)).await;
    let refused = match send.ready().await {
        Ok(mut ready) => match ready.send_request(request("/"), true) {
            Ok((response, _)) => response.await.is_err(),
            Err(_) => true,
        },
        Err(_) => true,
    };
    assert!(refused, "a new stream was served after GOAWAY");
    // The deadline cuts the stream still running.
    assert!(cut.await.is_err());
    let status = ld.wait_exit(secs(10)).await;
    assert_eq!(status.code(), Some(3), "forced at the deadline");
    assert!(started.elapsed() < secs(6));
    let _ = conn.await;
}

#[tokio::test]
async fn start_up_errors_name_the_tls_flag() {
    let pki = Pki::new();
    let (crt, key) = pki.server("server");
    let (_, other_key) = pki.server("other");
    // (certificate, key) → the exit status and what stderr must say.
    let cases = [
        (
            PathBuf::from("/nonexistent/tls.crt"),
            key,
            1,
            "--tls-cert /nonexistent/tls.crt: cannot read",
        ),
        (
            crt.clone(),
            other_key,
            1,
            "does not belong to the certificate in --tls-cert",
        ),
    ];
    for (cert, key, code, says) in cases {
        let (cert, key) = (path_str(&cert), path_str(&key));
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        let out = run_cmd(&args, &[], secs(10)).await;
        assert_eq!(out.status.code(), Some(code), "{}", out.stderr);
        assert!(out.stderr.contains(says), "{}", out.stderr);
    }
    let out = run_cmd(&["--tls-cert", &path_str(&crt)], &[], secs(10)).await;
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--tls-cert needs --tls-key too"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn the_admin_port_speaks_tls_only_when_asked() {
    let pki = Pki::new();
    let (crt, key) = pki.server("admin");
    let app = DemoApp::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn(&[
        "--upstream",
        &up,
        "--admin-tls-cert",
        &path_str(&crt),
        "--admin-tls-key",
        &path_str(&key),
    ]);
    let url = https_url(ld.admin_addr(), "/live");
    let out = curl(&[
        "--cacert",
        &pki.ca(),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The proxy listener stays cleartext.
    let (status, _) = get(ld.proxy_addr(), "/").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_idle_h2_connection_over_tls_ends_with_goaway_and_close_notify() {
    let pki = Pki::new();
    let (_app, mut ld) = start(
        &pki,
        &pki.server("server"),
        &["--drain-delay", "300ms", "--drain-timeout", "5s"],
    )
    .await;
    let tls = tls_connect(ld.proxy_addr(), pki.client_config(&[b"h2"], None))
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::get("https://localhost/").body(()).unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);

    ld.signal(Signal::SIGTERM);
    // h2 reports a TCP close without close_notify as an error (rustls'
    // UnexpectedEof): Ok means GOAWAY, then a clean TLS close.
    let ended = tokio::time::timeout(secs(5), conn)
        .await
        .expect("closed at the window's end");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    assert_eq!(ld.wait_exit(secs(10)).await.code(), Some(0));
}
