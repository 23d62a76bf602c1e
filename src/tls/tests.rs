//! Real certificates (made by the openssl CLI, as scripts/test.sh installs
//! it), real loopback handshakes with a rustls client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::metrics::{HandshakeFailure, Metrics, TlsListener};

// The suite's one test PKI (a CA per test and leaves it signs, by the
// openssl CLI), shared with tests/tls.rs and the e2e suite.
#[path = "../../tests/support/pki.rs"]
mod pki;
use pki::Pki;

/// A leaf as the files a listener is given.
fn files((cert, key): (PathBuf, PathBuf)) -> CertFiles {
    CertFiles {
        cert,
        key,
        cert_flag: "--tls-cert",
        key_flag: "--tls-key",
    }
}

/// A server certificate for localhost and 127.0.0.1.
fn server(pki: &Pki, name: &str) -> CertFiles {
    files(pki.server(name))
}

/// A client trusting the PKI's CA, offering h2 and http/1.1, with `client`
/// as its own certificate.
fn client_config(pki: &Pki, client: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let pair = client.map(|f| (f.cert.clone(), f.key.clone()));
    pki.client_config(ALPN_HTTP, pair.as_ref())
}

fn metrics() -> crate::metrics::TlsMetrics {
    Metrics::new().tls(TlsListener::Proxy)
}

fn der_of(cert: &ReloadableCert) -> Vec<u8> {
    cert.current().key.cert[0].as_ref().to_vec()
}

#[test]
fn loads_a_pair_and_reads_its_expiry() {
    let pki = Pki::new();
    let files = server(&pki, "server");
    let loaded = load_pair(&files, &provider()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // -days 1
    assert!(
        (now + 86_000..=now + 86_500).contains(&loaded.not_after),
        "{}",
        loaded.not_after
    );
    assert_eq!(loaded.subject, "CN=server");
    let tls = metrics();
    let cert = ReloadableCert::load(files, tls.clone()).unwrap();
    assert_eq!(tls.certificate_expiry.get(), loaded.not_after as f64);
    assert_eq!(cert.current().not_after, loaded.not_after);
}

#[test]
fn a_key_of_another_certificate_is_refused_naming_both_flags() {
    let pki = Pki::new();
    let mut files = server(&pki, "a");
    files.key = server(&pki, "b").key;
    let e = load_pair(&files, &provider()).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains("--tls-key") && message.contains("--tls-cert"),
        "{message}"
    );
    assert!(
        message.contains("b.key") && message.contains("a.crt"),
        "{message}"
    );
}

#[test]
fn missing_and_garbage_files_name_the_flag_and_the_path() {
    let pki = Pki::new();
    let mut files = server(&pki, "server");
    files.cert = pki.path("absent.crt");
    let e = load_pair(&files, &provider()).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Read {
                flag: "--tls-cert",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("--tls-cert "), "{e}");
    assert!(e.to_string().contains("absent.crt"), "{e}");

    std::fs::write(pki.path("garbage.crt"), "not a certificate\n").unwrap();
    files.cert = pki.path("garbage.crt");
    let e = load_pair(&files, &provider()).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");

    files = server(&pki, "server");
    files.key = files.cert.clone();
    let e = load_pair(&files, &provider()).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::NoKey {
                flag: "--tls-key",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_broken_reload_keeps_the_previous_pair_and_a_good_one_replaces_it() {
    let pki = Pki::new();
    let files = server(&pki, "live");
    let tls = metrics();
    let cert = ReloadableCert::load(files.clone(), tls.clone()).unwrap();
    let before = der_of(&cert);

    // A mismatched pair, then a truncated certificate: both refused.
    let other = server(&pki, "other");
    std::fs::copy(&other.cert, &files.cert).unwrap();
    assert!(matches!(cert.reload(), Err(TlsError::KeyMismatch { .. })));
    std::fs::write(&files.cert, b"-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    assert!(cert.reload().is_err());
    assert_eq!(der_of(&cert), before);
    assert_eq!(tls.reloads_failure.get(), 2);
    assert_eq!(tls.reloads_success.get(), 0);

    // The complete new pair is taken.
    std::fs::copy(&other.key, &files.key).unwrap();
    std::fs::copy(&other.cert, &files.cert).unwrap();
    let reloaded = cert.reload().unwrap();
    assert_eq!(reloaded.subject, "CN=other");
    assert_ne!(der_of(&cert), before);
    assert_eq!(tls.reloads_success.get(), 1);
}

/// `serve` with the server certificate of `pki`, HTTP ALPN, `client_ca`
/// and a handshake `timeout`.
async fn serve_server_cert(
    pki: &Pki,
    tls: &crate::metrics::TlsMetrics,
    client_ca: Option<&ClientCa>,
    timeout: Duration,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    let cert = ReloadableCert::load(server(pki, "server"), tls.clone()).unwrap();
    let config = server_config(cert, ALPN_HTTP, client_ca).unwrap();
    serve(Handshaker::new(config, timeout, tls.clone()), 2).await
}

/// A listener that accepts `n` connections through `handshaker` and answers
/// each with the negotiated ALPN, or the failure reason.
async fn serve(
    handshaker: Handshaker,
    n: usize,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for _ in 0..n {
            let (tcp, _) = listener.accept().await.unwrap();
            match handshaker.accept(tcp).await {
                Ok(mut stream) => {
                    let conn = stream.get_ref().1;
                    let alpn = String::from_utf8_lossy(conn.alpn_protocol().unwrap_or(b"none"))
                        .into_owned();
                    let identity = PeerIdentity::of(conn)
                        .map(|p| p.header_value())
                        .unwrap_or_default();
                    stream
                        .write_all(format!("{alpn} {identity}").as_bytes())
                        .await
                        .unwrap();
                    // close_notify, so the client reads a clean end.
                    stream.shutdown().await.unwrap();
                    outcomes.push(alpn);
                }
                Err(e) => outcomes.push(e.reason.as_str().to_string()),
            }
        }
        outcomes
    });
    (addr, task)
}

async fn client(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(String, bool)> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((answer, resumed))
}

#[tokio::test]
async fn handshakes_negotiate_h2_and_resume_the_session() {
    let pki = Pki::new();
    let tls = metrics();
    let (addr, server) = serve_server_cert(&pki, &tls, None, Duration::from_secs(5)).await;
    let client_config = client_config(&pki, None);
    let (answer, resumed) = client(addr, client_config.clone()).await.unwrap();
    assert!(answer.starts_with("h2 "), "{answer}");
    assert!(!resumed);
    let (_, resumed) = client(addr, client_config).await.unwrap();
    assert!(
        resumed,
        "the second connection resumes the first one's session"
    );
    assert_eq!(server.await.unwrap(), ["h2", "h2"]);
    assert_eq!(tls.handshakes_full.get(), 1);
    assert_eq!(tls.handshakes_resumed.get(), 1);
    assert_eq!(tls.handshakes_in_progress.get(), 0);
}

#[tokio::test]
async fn cleartext_http_gets_a_400_and_a_silent_client_times_out() {
    let pki = Pki::new();
    let tls = metrics();
    let (addr, server) = serve_server_cert(&pki, &tls, None, Duration::from_millis(300)).await;

    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("use https:// instead.\n"), "{answer}");

    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).await.unwrap_or(0), 0, "closed");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(server.await.unwrap(), ["plaintext_http", "timeout"]);
    assert_eq!(tls.handshake_failures(HandshakeFailure::PlaintextHttp), 1);
    assert_eq!(tls.handshake_failures(HandshakeFailure::Timeout), 1);
    assert_eq!(tls.handshakes_in_progress.get(), 0);
}

#[tokio::test]
async fn client_certificates_are_required_and_their_identity_is_exported() {
    let pki = Pki::new();
    let tls = metrics();
    let ca = ClientCa::load(&pki.path("ca.crt"), "--tls-client-ca").unwrap();
    let (addr, server) = serve_server_cert(&pki, &tls, Some(&ca), Duration::from_secs(5)).await;

    // rustls clients finish their side before the server checks the
    // certificate (TLS 1.3), so the refusal shows on the first read.
    assert!(client(addr, client_config(&pki, None)).await.is_err());
    let workload = files(pki.leaf(
        "workload",
        "URI:spiffe://cluster.local/ns/a/sa/b,DNS:b.a.svc",
    ));
    let (answer, _) = client(addr, client_config(&pki, Some(&workload)))
        .await
        .unwrap();
    assert!(answer.starts_with("h2 Hash="), "{answer}");
    assert!(
        answer
            .ends_with(";Subject=\"CN=workload\";URI=spiffe://cluster.local/ns/a/sa/b;DNS=b.a.svc"),
        "{answer}"
    );
    assert_eq!(server.await.unwrap(), ["client_certificate", "h2"]);
}

/// The layout kubelet writes for a Secret volume: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<timestamp>`, updated by renaming a new `..data` over the old.
fn secret_volume(dir: &Path, version: &str, from: &CertFiles) {
    let target = dir.join(version);
    std::fs::create_dir(&target).unwrap();
    std::fs::copy(&from.cert, target.join("tls.crt")).unwrap();
    std::fs::copy(&from.key, target.join("tls.key")).unwrap();
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

#[tokio::test]
async fn the_watcher_follows_a_secret_volume_swap_and_reloads_on_request() {
    let pki = Pki::new();
    let volume = tempfile::tempdir().unwrap();
    secret_volume(volume.path(), "..v1", &server(&pki, "first"));
    let files = CertFiles {
        cert: volume.path().join("tls.crt"),
        key: volume.path().join("tls.key"),
        cert_flag: "--tls-cert",
        key_flag: "--tls-key",
    };
    let tls = metrics();
    let cert = ReloadableCert::load(files, tls.clone()).unwrap();
    let signal = ReloadSignal::new();
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_files(
        cert.clone(),
        signal.subscribe(),
        Duration::from_millis(20),
        stop.clone(),
    ));

    secret_volume(volume.path(), "..v2", &server(&pki, "second"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cert.current().subject != "CN=second" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the swap was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tls.reloads_success.get(), 1);

    signal.trigger();
    while tls.reloads_success.get() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP-style reload not done"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    watcher.await.unwrap();
}
