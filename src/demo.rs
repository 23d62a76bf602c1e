//! The built-in sample app: what `lameduck demo` puts behind the proxy and
//! what tests and benchmarks can use as a real upstream. Speaks HTTP/1.1 and
//! h2c. It has a slow endpoint so a drain has something to wait for.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Body = BoxBody<Bytes, hyper::Error>;

const MAX_SLOW: Duration = Duration::from_secs(600);
const MAX_BYTES: usize = 64 * 1024 * 1024;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

fn query_number(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

async fn handle(req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => full(StatusCode::OK, "hello from the demo app\n"),
        (&Method::GET, "/healthz") => full(StatusCode::OK, "ok\n"),
        (&Method::GET, "/slow") => {
            let ms = query_number(&req, "ms").unwrap_or(3000);
            tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLOW)).await;
            full(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        (&Method::GET, "/bytes") => {
            let n = (query_number(&req, "n").unwrap_or(1024) as usize).min(MAX_BYTES);
            full(StatusCode::OK, vec![b'x'; n])
        }
        (&Method::GET, "/headers") => {
            let mut out = String::new();
            for (name, value) in req.headers() {
                out.push_str(name.as_str());
                out.push_str(": ");
                out.push_str(&String::from_utf8_lossy(value.as_bytes()));
                out.push('\n');
            }
            full(StatusCode::OK, out)
        }
        (&Method::POST, "/echo") => Response::new(req.into_body().boxed()),
        _ => full(
            StatusCode::NOT_FOUND,
            "try / /slow?ms=3000 /bytes?n=1024 /headers POST /echo\n",
        ),
    }
}

/// Serves the sample app until `stop`, then lets open requests finish.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        connections.spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                service_fn(|req| async { Ok::<_, Infallible>(handle(req).await) }),
            );
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}
