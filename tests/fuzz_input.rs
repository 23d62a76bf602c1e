//! Property test against the real binary: arbitrary bytes and mutated
//! requests never hang a connection, never crash the process, and garbage is
//! never answered with anything but a well-formed 4xx (or a plain close).
//! Deterministic seed, bounded number of cases.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: &[u8] = b"GET /headers HTTP/1.1\r\nhost: 127.0.0.1\r\nx-a: b\r\n\r\n";

#[derive(Debug, Clone)]
enum Input {
    Garbage(Vec<u8>),
    Mutated(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    let garbage = proptest::collection::vec(any::<u8>(), 1..2048).prop_map(Input::Garbage);
    let mutated = proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4).prop_map(|muts| {
        let mut req = BASE.to_vec();
        for (i, b) in muts {
            let at = i.index(req.len());
            req[at] = b;
        }
        Input::Mutated(req)
    });
    prop_oneof![garbage, mutated]
}

/// Sends `bytes`, half-closes, and reads until EOF (5s). None on timeout.
async fn exchange(proxy: std::net::SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut c = RawConn::connect(proxy).await;
    // The proxy may answer and close before reading everything.
    let _ = c.stream.write_all(bytes).await;
    let _ = c.stream.shutdown().await;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let line = resp.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("HTTP/1.1 ")?;
    rest.get(..3)?.parse().ok()
}

#[test]
fn arbitrary_bytes_and_mutated_requests_never_hang_or_crash_the_proxy() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::start());
    let up = app.addr.to_string();
    let mut ld = Lameduck::spawn(&["--upstream", &up, "--header-read-timeout", "2s"]);
    rt.block_on(wait_ready(ld.admin_addr(), secs(10)));
    let proxy = ld.proxy_addr();

    let config = Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&input(), |inp| {
        ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (bytes, garbage) = match &inp {
            Input::Garbage(b) => (b.as_slice(), true),
            Input::Mutated(b) => (b.as_slice(), false),
        };
        let out = rt
            .block_on(exchange(proxy, bytes))
            .ok_or_else(|| TestCaseError::fail("connection not closed within 5s"))?;
        if !out.is_empty() {
            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let status = status_of(&out).ok_or_else(|| {
                TestCaseError::fail(format!(
                    "not an HTTP/1.1 response: {:?}",
                    String::from_utf8_lossy(&out[..out.len().min(200)])
                ))
            })?;
            if garbage {
                prop_assert!(
                    (400..500).contains(&status),
                    "garbage answered with {status}"
                );
            } else {
                prop_assert!(status < 500, "mutated request answered with {status}");
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let ran = ran.into_inner();
    let answered = answered.into_inner();
    eprintln!("fuzz: {ran} cases, {answered} answered with an HTTP response");
    assert!(ran >= 64, "only {ran} cases ran");

    assert!(ld.is_running(), "the proxy died during the fuzzing");
    rt.block_on(async {
        let r = http_get(proxy, "/").await;
        assert_eq!(r.status, 200);
        wait_no_active_connections(ld.admin_addr(), secs(5)).await;
    });
    drop(ld);
    drop(app);
}
