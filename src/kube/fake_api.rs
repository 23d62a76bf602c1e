//! Tests of `Kube` against a scripted API server on a local port: the
//! list-then-watch with a failure and an expired resourceVersion on the way,
//! the Pod read, the Event, and an API that accepts connections and never
//! answers. Plain HTTP, so no certificates; kube's connector takes `http://`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// One scripted answer: a status and the body's lines; `hold` keeps the
/// response open after them, as a watch does.
struct Reply {
    status: u16,
    lines: Vec<String>,
    hold: bool,
}

impl Reply {
    fn json(status: u16, body: &str) -> Self {
        Reply {
            status,
            lines: vec![body.to_owned()],
            hold: false,
        }
    }

    fn watch(lines: Vec<String>) -> Self {
        Reply {
            status: 200,
            lines,
            hold: true,
        }
    }
}

#[derive(Default)]
struct Script {
    lists: VecDeque<Reply>,
    watches: VecDeque<Reply>,
    /// The query string of every watch request, in order.
    watch_queries: Vec<String>,
    /// The bodies of created Events.
    events: Vec<serde_json::Value>,
}

fn body(reply: Reply) -> Body {
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = reply
        .lines
        .into_iter()
        .map(|line| Ok(Frame::data(Bytes::from(line + "\n"))))
        .collect();
    let stream = futures_util::stream::iter(frames);
    if reply.hold {
        BodyExt::boxed(StreamBody::new(
            stream.chain(futures_util::stream::pending()),
        ))
    } else {
        BodyExt::boxed(StreamBody::new(stream))
    }
}

async fn answer(script: Arc<Mutex<Script>>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let method = request.method().clone();
    let posted = request.into_body().collect().await.map(|b| b.to_bytes());
    let mut script = script.lock().unwrap();
    let reply = match (method.as_str(), path.as_str()) {
        ("GET", "/api/v1/namespaces/shop/pods/web-0") => Reply::json(200, POD),
        ("GET", "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices") => {
            if query.contains("watch=true") {
                script.watch_queries.push(query);
                script.watches.pop_front()
            } else {
                script.lists.pop_front()
            }
            .unwrap_or_else(|| Reply::json(500, "script exhausted"))
        }
        ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events") => {
            let posted = posted.unwrap_or_default();
            script
                .events
                .push(serde_json::from_slice(&posted).unwrap_or_default());
            Reply::json(201, &String::from_utf8_lossy(&posted))
        }
        _ => Reply::json(
            404,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404}"#,
        ),
    };
    let status = reply.status;
    let mut response = Response::new(body(reply));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// Serves `script` until the test ends (the runtime drops the task).
async fn serve(script: Arc<Mutex<Script>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let script = script.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| {
                    let script = script.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(script, r).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-0","namespace":"shop","uid":"uid-1"},
"spec":{"containers":[{"name":"app","image":"app"}],"terminationGracePeriodSeconds":30},
"status":{"podIP":"10.0.0.5","podIPs":[{"ip":"10.0.0.5"}]}}"#;

fn slice(name: &str, rv: &str, with_us: bool) -> String {
    let endpoints = if with_us {
        r#"[{"addresses":["10.0.0.5"],"conditions":{"ready":true,"serving":true},"targetRef":{"kind":"Pod","name":"web-0","namespace":"shop","uid":"uid-1"}}]"#
    } else {
        "[]"
    };
    format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","addressType":"IPv4","metadata":{{"name":"{name}","namespace":"shop","resourceVersion":"{rv}"}},"endpoints":{endpoints}}}"#
    )
}

fn list(rv: &str, slices: &[String]) -> Reply {
    Reply::json(
        200,
        &format!(
            r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSliceList","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#,
            slices.join(",")
        ),
    )
}

fn event(kind: &str, object: &str) -> String {
    format!(r#"{{"type":"{kind}","object":{object}}}"#)
}

async fn kube_at(addr: SocketAddr, api_timeout: Duration, metrics: &Metrics) -> Kube {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    Kube::build(config, api_timeout, "web-0", "shop", metrics)
        .await
        .unwrap()
}

fn errors(metrics: &Metrics, op: &str) -> String {
    let text = metrics.encode();
    text.lines()
        .find(|l| l.starts_with(&format!("lameduck_kubernetes_errors_total{{op=\"{op}\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_owned()
}

#[tokio::test]
async fn watch_survives_a_failure_and_an_expiry_and_ends_when_no_slice_routes() {
    let script = Arc::new(Mutex::new(Script::default()));
    {
        let mut s = script.lock().unwrap();
        s.lists.push_back(list(
            "100",
            &[slice("web-a", "90", true), slice("admin-a", "95", true)],
        ));
        // First watch: the API is unhappy.
        s.watches.push_back(Reply::json(
            500,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcd","reason":"InternalError","code":500}"#,
        ));
        // Second: one slice lets go, then the resourceVersion expires.
        s.watches.push_back(Reply::watch(vec![
            event("MODIFIED", &slice("web-a", "101", false)),
            event(
                "ERROR",
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old","reason":"Expired","code":410}"#,
            ),
        ]));
        // The re-list still shows the other slice; the third watch deletes it.
        s.lists.push_back(list(
            "200",
            &[slice("web-a", "101", false), slice("admin-a", "150", true)],
        ));
        s.watches.push_back(Reply::watch(vec![
            event(
                "BOOKMARK",
                r#"{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"210"}}"#,
            ),
            event("DELETED", &slice("admin-a", "220", true)),
        ]));
    }
    let addr = serve(script.clone()).await;
    let metrics = Metrics::new();
    let kube = kube_at(addr, Duration::from_secs(2), &metrics).await;
    assert_eq!(kube.facts().uid.as_deref(), Some("uid-1"));
    assert_eq!(kube.facts().grace_period, Some(Duration::from_secs(30)));

    let facts = kube.facts().clone();
    let released = tokio::time::timeout(
        Duration::from_secs(10),
        kube.endpoints_released(&facts, &metrics),
    )
    .await
    .expect("released within the test's patience");
    assert_eq!(released.unwrap(), EndpointsReleased::Removed);
    assert_eq!(metrics.endpoints_serving.get(), 0);
    assert_eq!(errors(&metrics, "watch_endpointslices"), "1");
    assert_eq!(errors(&metrics, "list_endpointslices"), "0");
    let queries = script.lock().unwrap().watch_queries.clone();
    assert_eq!(queries.len(), 3, "{queries:?}");
    assert!(queries[0].contains("resourceVersion=100"), "{queries:?}");
    assert!(queries[1].contains("resourceVersion=100"), "{queries:?}");
    assert!(queries[2].contains("resourceVersion=200"), "{queries:?}");
    assert!(
        queries.iter().all(|q| q.contains("timeoutSeconds=60")),
        "{queries:?}"
    );
}

#[tokio::test]
async fn a_pod_in_no_slice_is_not_listed_and_a_failed_list_is_an_error() {
    let script = Arc::new(Mutex::new(Script::default()));
    script
        .lock()
        .unwrap()
        .lists
        .push_back(list("100", &[slice("other", "90", false)]));
    let addr = serve(script.clone()).await;
    let metrics = Metrics::new();
    let kube = kube_at(addr, Duration::from_secs(2), &metrics).await;
    let facts = kube.facts().clone();
    let released = kube.endpoints_released(&facts, &metrics).await.unwrap();
    assert_eq!(released, EndpointsReleased::NotListed);
    assert!(script.lock().unwrap().watch_queries.is_empty());

    // The script has no second list: 500.
    let error = kube.endpoints_released(&facts, &metrics).await.unwrap_err();
    assert!(
        error.to_string().contains("list EndpointSlices in shop"),
        "{error}"
    );
    assert_eq!(errors(&metrics, "list_endpointslices"), "1");
}

#[tokio::test]
async fn events_name_the_pod_and_the_reporter() {
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = serve(script.clone()).await;
    let metrics = Metrics::new();
    let kube = kube_at(addr, Duration::from_secs(2), &metrics).await;
    assert!(
        kube.publish(DrainEvent::forced("3 connections closed"), &metrics)
            .await
    );
    let events = script.lock().unwrap().events.clone();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e["reason"], "DrainForced");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["action"], "Exit");
    assert_eq!(e["note"], "3 connections closed");
    assert_eq!(e["reportingController"], "lameduck");
    assert_eq!(e["reportingInstance"], "web-0");
    assert_eq!(e["regarding"]["kind"], "Pod");
    assert_eq!(e["regarding"]["uid"], "uid-1");
    assert_eq!(errors(&metrics, "create_event"), "0");
}

#[tokio::test]
async fn an_api_that_never_answers_costs_one_timeout_per_call() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let metrics = Metrics::new();
    let api_timeout = Duration::from_millis(300);
    let started = tokio::time::Instant::now();
    let kube = kube_at(addr, api_timeout, &metrics).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(kube.facts(), &PodFacts::unknown("web-0", "shop"));
    assert_eq!(errors(&metrics, "get_pod"), "1");

    let error = kube.read_pod(&metrics).await.unwrap_err();
    assert!(
        matches!(error, KubeError::Timeout { .. } | KubeError::Api { .. }),
        "{error}"
    );
    let facts = kube.facts().clone();
    assert!(kube.endpoints_released(&facts, &metrics).await.is_err());
    assert!(!kube.publish(DrainEvent::started("t0"), &metrics).await);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(errors(&metrics, "get_pod"), "2");
    assert_eq!(errors(&metrics, "list_endpointslices"), "1");
    assert_eq!(errors(&metrics, "create_event"), "1");
}
