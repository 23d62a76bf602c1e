//! W3C Trace Context through the real binary: what the app receives in
//! `traceparent`/`tracestate` for valid, missing and each kind of malformed
//! header, on the own HTTP/1 path and on hyper's (HTTP/2 clients).

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client;
use support::*;
use tokio::net::TcpStream;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The malformed `traceparent` values of the specification (§3.2), each of
/// which must start a new trace.
const MALFORMED: &[&str] = &[
    // version ff is invalid
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    // all-zero trace id, all-zero parent id
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    // uppercase hex
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    // not hex
    "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
    // wrong lengths
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    // version 00 followed by more data
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    // a future version without '-' after its known prefix
    "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.",
    // separators
    "00-4bf92f3577b34da6a3ce929d0e0e4736+00f067aa0ba902b7-01",
    "garbage",
];

/// The app's view of `traceparent` and `tracestate` for one request through
/// the own HTTP/1 path.
async fn via_http1(
    app: &TestApp,
    proxy: SocketAddr,
    headers: &[(&str, &str)],
) -> (Vec<String>, Vec<String>) {
    let r = http_request(proxy, "GET", "/headers", headers, b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    seen(app)
}

fn seen(app: &TestApp) -> (Vec<String>, Vec<String>) {
    let req = app.last_request("/headers").unwrap();
    let all = |name| {
        req.header_all(name)
            .into_iter()
            .map(str::to_owned)
            .collect()
    };
    (all("traceparent"), all("tracestate"))
}

/// A well-formed version-00 traceparent: (trace id, parent id, flags).
fn parts(value: &str) -> (String, String, String) {
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(value.len(), 55, "{value}");
    assert_eq!(fields.len(), 4, "{value}");
    assert_eq!(fields[0], "00", "{value}");
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(fields.iter().all(|f| hex(f)), "{value}");
    assert_ne!(fields[1], "0".repeat(32));
    assert_ne!(fields[2], "0".repeat(16));
    (fields[1].into(), fields[2].into(), fields[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_traceparent_is_continued_with_lameduck_as_the_parent() {
    let (app, ld) = app_behind_lameduck(&["--access-log", "json"]).await;
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let (parents, states) = via_http1(
        &app,
        ld.proxy_addr(),
        &[
            ("traceparent", &incoming),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ("x-request-id", "valid"),
        ],
    )
    .await;
    assert_eq!(parents.len(), 1, "{parents:?}");
    let (trace, parent, flags) = parts(&parents[0]);
    assert_eq!(trace, TRACE, "same trace");
    assert_ne!(parent, PARENT, "lameduck's span is the app's parent");
    assert_eq!(flags, "01", "the caller's sampling decision is kept");
    assert_eq!(states, ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]);
    // The span the app names as its parent is the one lameduck logs.
    let line = ld
        .wait_for_log(|v| field_str(v, "request_id") == Some("valid"), secs(5))
        .await;
    assert_eq!(field_str(&line, "span_id"), Some(parent.as_str()));
    assert_eq!(field_str(&line, "trace_id"), Some(TRACE));

    // An unsampled caller stays unsampled.
    let (parents, _) = via_http1(
        &app,
        ld.proxy_addr(),
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))],
    )
    .await;
    assert_eq!(parts(&parents[0]).2, "00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_version_is_read_by_its_known_prefix_and_sent_as_version_00() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let incoming = format!("cc-{TRACE}-{PARENT}-01-some-future-field");
    let (parents, _) = via_http1(&app, ld.proxy_addr(), &[("traceparent", &incoming)]).await;
    let (trace, parent, flags) = parts(&parents[0]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, PARENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_traceparent_starts_a_new_trace_and_drops_tracestate() {
    let (app, ld) = app_behind_lameduck(&["--trace-sample-ratio", "0"]).await;
    for bad in MALFORMED {
        let (parents, states) = via_http1(
            &app,
            ld.proxy_addr(),
            &[("traceparent", bad), ("tracestate", "rojo=1")],
        )
        .await;
        assert_eq!(parents.len(), 1, "{bad}: {parents:?}");
        let (trace, _, flags) = parts(&parents[0]);
        assert_ne!(trace, TRACE, "{bad} was continued");
        assert_ne!(trace, TRACE.to_uppercase());
        assert_eq!(
            flags, "00",
            "{bad}: new traces follow --trace-sample-ratio 0"
        );
        assert!(
            states.is_empty(),
            "{bad}: tracestate of a broken parent passed on"
        );
    }
    // Two traceparent lines: neither is trusted.
    let (parents, _) = via_http1(
        &app,
        ld.proxy_addr(),
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
        ],
    )
    .await;
    assert_eq!(parents.len(), 1);
    assert_ne!(parts(&parents[0]).0, TRACE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_tracestate_is_dropped_and_the_traceparent_kept() {
    let (app, ld) = app_behind_lameduck(&[]).await;
    let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    let too_many = members.join(",");
    for bad in ["Upper=1", "a=1,a=2", "novalue", "a=b=c", too_many.as_str()] {
        let (parents, states) = via_http1(
            &app,
            ld.proxy_addr(),
            &[
                ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
                ("tracestate", bad),
            ],
        )
        .await;
        assert_eq!(parts(&parents[0]).0, TRACE, "{bad}");
        assert!(states.is_empty(), "{bad} passed on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_trace_context_get_a_new_trace_sampled_by_the_ratio() {
    let (app, ld) = app_behind_lameduck(&["--trace-sample-ratio", "1"]).await;
    let (a, _) = via_http1(&app, ld.proxy_addr(), &[]).await;
    let (b, _) = via_http1(&app, ld.proxy_addr(), &[]).await;
    let (a, b) = (parts(&a[0]), parts(&b[0]));
    assert_eq!((a.2.as_str(), b.2.as_str()), ("01", "01"));
    assert_ne!(a.0, b.0, "a new trace per request");

    let (app0, ld0) = app_behind_lameduck(&["--trace-sample-ratio", "0"]).await;
    let (c, _) = via_http1(&app0, ld0.proxy_addr(), &[]).await;
    assert_eq!(parts(&c[0]).2, "00");
}

async fn via_http2(
    app: &TestApp,
    proxy: SocketAddr,
    headers: &[(&str, &str)],
) -> (Vec<String>, Vec<String>) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (send, conn): (client::SendRequest<Bytes>, _) = client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let mut req = http::Request::get(format!("http://{proxy}/headers"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    drop(send);
    conn.abort();
    seen(app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_s_path_applies_the_same_rules() {
    let (app, ld) = app_behind_lameduck(&["--trace-sample-ratio", "0"]).await;
    let proxy = ld.proxy_addr();
    let (parents, states) = via_http2(
        &app,
        proxy,
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "rojo=1"),
        ],
    )
    .await;
    let (trace, parent, flags) = parts(&parents[0]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(parent, PARENT);
    assert_eq!(states, ["rojo=1"]);
    for bad in MALFORMED {
        let (parents, states) = via_http2(
            &app,
            proxy,
            &[("traceparent", bad), ("tracestate", "rojo=1")],
        )
        .await;
        assert_eq!(parents.len(), 1, "{bad}");
        let (trace, _, flags) = parts(&parents[0]);
        assert_ne!(trace, TRACE, "{bad} was continued");
        assert_eq!(flags, "00", "{bad}");
        assert!(states.is_empty(), "{bad}");
    }
}
