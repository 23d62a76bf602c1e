//! The upstream pool reuses connections: a keep-alive app sees one connection
//! for sequential requests, whatever framing the response used.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let app = TestApp::start().await;
    let ld = Lameduck::spawn(&["--upstream", &app.addr.to_string()]);
    wait_ready(ld.admin_addr(), Duration::from_secs(5)).await;

    // Content-Length, chunked and empty responses each end the exchange
    // differently; after each, the connection must go back to the pool.
    let paths = [
        "/",
        "/chunked",
        "/empty",
        "/bytes?n=70000",
        "/",
        "/chunked",
        "/empty",
        "/",
    ];
    let mut conn = RawConn::connect(ld.proxy_addr()).await;
    for path in paths {
        let response = conn.get(path).await.expect("response");
        assert!(
            response.status == 200 || response.status == 204,
            "{path}: {}",
            response.status
        );
    }

    let peers: HashSet<_> = app.requests().iter().map(|r| r.peer).collect();
    assert_eq!(
        peers.len(),
        1,
        "{} requests used {} upstream connections: {peers:?}",
        paths.len(),
        peers.len()
    );
}
