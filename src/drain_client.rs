//! `lameduck drain`: asks a running instance to drain through its admin port
//! and, with `--wait`, blocks until it has. Made for an exec preStop hook.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::DrainArgs;

#[derive(Debug, thiserror::Error)]
pub enum DrainClientError {
    #[error("cannot reach the admin port {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{method} {path} on {addr} answered {status}: {body}")]
    Refused {
        method: Method,
        path: String,
        addr: SocketAddr,
        status: StatusCode,
        body: String,
    },
    #[error("{0} timed out")]
    TimedOut(String),
}

/// The connection of a finished exchange, kept open for as long as the value
/// lives: lameduck waits for its `/drained` clients to close before it exits,
/// so the hook that waited must close it as late as it can (at process exit),
/// not before printing its answer.
pub struct OpenConnection(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    limit: Duration,
) -> Result<(StatusCode, String, OpenConnection), DrainClientError> {
    let unreachable = |reason: String| DrainClientError::Unreachable { addr, reason };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let driver = OpenConnection(tokio::spawn(conn));
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        Ok((status, body, driver))
    };
    timeout(limit, exchange)
        .await
        .map_err(|_| DrainClientError::TimedOut(format!("{method} {path} on {addr}")))?
}

/// Returns what to print on success, and the `/drained` connection to close
/// only after printing it (see [`OpenConnection`]).
pub async fn run(args: DrainArgs) -> Result<(String, Option<OpenConnection>), DrainClientError> {
    let refused = |method: Method, path: &str, status, body| DrainClientError::Refused {
        method,
        path: path.to_owned(),
        addr: args.admin,
        status,
        body,
    };
    let (status, body, _) =
        call(args.admin, Method::POST, "/drain", Duration::from_secs(5)).await?;
    // 200: it had already drained; --wait then returns its summary at once.
    if status != StatusCode::ACCEPTED && status != StatusCode::OK {
        return Err(refused(Method::POST, "/drain", status, body));
    }
    if !args.wait {
        return Ok((format!("drain started on {}", args.admin), None));
    }
    // hook=1: lameduck waits for this connection to close before it exits.
    let path = format!("/drained?timeout={}ms&hook=1", args.timeout.as_millis());
    let (status, body, connection) = call(
        args.admin,
        Method::GET,
        &path,
        args.timeout + Duration::from_secs(5),
    )
    .await?;
    if status != StatusCode::OK {
        return Err(refused(Method::GET, &path, status, body));
    }
    Ok((body, Some(connection)))
}
