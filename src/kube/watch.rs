//! The lame-duck window's signal: list the namespace's EndpointSlices, then
//! watch them from the list's resourceVersion until none routes to this pod.
//!
//! The watch is read here, over `Client::send` and `http_body_util`, rather
//! than through `Api::watch` or `kube::runtime::watcher`: those hand out a
//! `futures::Stream`, and the crate has no `futures` dependency to poll one
//! with. A watch response is newline-delimited JSON `WatchEvent`s, which is
//! little to read by hand.
//!
//! Must stay cancel-safe and spawn nothing: the lifecycle races this against
//! its own timer and drops it. All state lives in the future; dropping it
//! drops the connection.

use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::{ListParams, WatchParams};
use kube::core::{Status, WatchEvent};
use kube::{Api, Client};
use tokio::time::Instant;

use super::endpoints::ServingSlices;
use super::{KubeError, PodFacts, bounded};
use crate::metrics::{KubeOp, Metrics};

/// How the wait for the endpoints ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointsReleased {
    /// No slice listed the pod when the drain listed them.
    NotListed,
    /// Slices listed the pod, and now none routes to it (possibly already at
    /// the first list: the kubelet saw readiness fail before it was read).
    Removed,
}

/// The watch's server-side `timeoutSeconds`: the API server ends each watch
/// after this, and it is resumed from the last resourceVersion seen. Short
/// enough that a connection that died silently is noticed within a drain.
const WATCH_TIMEOUT_SECS: u32 = 60;
/// Past the server-side timeout, how long to wait for the server to end
/// the watch before taking the connection for dead.
const WATCH_GRACE: Duration = Duration::from_secs(5);
/// A watch that ends sooner than this without an event is treated as a
/// failure (backoff), so a server that closes at once is not hammered.
const MIN_QUIET_WATCH: Duration = Duration::from_secs(1);
/// Retry delays after watch failures: doubled up to the cap. The cap stays
/// short because a drain window is seconds, not minutes.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);

fn watch_timeout() -> Duration {
    Duration::from_secs(u64::from(WATCH_TIMEOUT_SECS))
}

/// The watch client's read timeout: beyond the watch's own end, so that a
/// watch with no event for its whole duration is not an error.
pub(super) fn watch_read_timeout(api_timeout: Duration) -> Duration {
    watch_timeout() + api_timeout + 2 * WATCH_GRACE
}

/// See [`super::Kube::endpoints_released`].
pub(super) async fn endpoints_released(
    client: &Client,
    watch_client: &Client,
    api_timeout: Duration,
    facts: &PodFacts,
    metrics: &Metrics,
) -> Result<EndpointsReleased, KubeError> {
    let (mut state, mut version, listed) = list(client, api_timeout, facts)
        .await
        .inspect_err(|_| metrics.kubernetes_error(KubeOp::ListEndpointSlices))?;
    set_gauge(metrics, &state);
    if state.count() == 0 {
        return Ok(if listed {
            EndpointsReleased::Removed
        } else {
            EndpointsReleased::NotListed
        });
    }
    tracing::info!(
        slices = state.count(),
        "waiting for the EndpointSlices to stop routing to this pod"
    );
    let mut retry = Retry::default();
    loop {
        let started = Instant::now();
        let end = session(
            watch_client,
            api_timeout,
            facts,
            &mut state,
            &mut version,
            metrics,
        )
        .await;
        match end {
            Ok(SessionEnd::Released) => return Ok(EndpointsReleased::Removed),
            Ok(SessionEnd::Closed { progressed }) => {
                if progressed || started.elapsed() >= MIN_QUIET_WATCH {
                    retry.reset();
                } else {
                    retry.wait().await;
                }
            }
            Ok(SessionEnd::Expired) => {
                // The resourceVersion is too old to resume from: start over
                // from a fresh list, which also tells whether we are done.
                match list(client, api_timeout, facts).await {
                    Ok((fresh, fresh_version, _)) => {
                        (state, version) = (fresh, fresh_version);
                        set_gauge(metrics, &state);
                        if state.count() == 0 {
                            return Ok(EndpointsReleased::Removed);
                        }
                        retry.reset();
                    }
                    Err(error) => {
                        metrics.kubernetes_error(KubeOp::ListEndpointSlices);
                        retry.failed(&error).await;
                    }
                }
            }
            Err(error) => {
                metrics.kubernetes_error(KubeOp::WatchEndpointSlices);
                retry.failed(&error).await;
            }
        }
    }
}

fn set_gauge(metrics: &Metrics, state: &ServingSlices) {
    metrics
        .endpoints_serving
        .set(i64::try_from(state.count()).unwrap_or(i64::MAX));
}

/// Lists the namespace's slices (bounded by `api_timeout`): the serving state
/// and the resourceVersion to watch from.
async fn list(
    client: &Client,
    api_timeout: Duration,
    facts: &PodFacts,
) -> Result<(ServingSlices, String, bool), KubeError> {
    let namespace = &facts.namespace;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let list = bounded(
        || format!("list EndpointSlices in {namespace}"),
        api_timeout,
        slices.list(&ListParams::default()),
    )
    .await?;
    let state = ServingSlices::from_list(&list.items, facts);
    // Listed at all, serving or not: a pod already out of rotation has been
    // removed, not "in no Service".
    let listed = list
        .items
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .any(|endpoint| super::endpoints::is_this_pod(endpoint, facts));
    // A list always carries its resourceVersion; without one, "0" still
    // resumes correctly (the server replays the current objects as ADDED).
    let version = list
        .metadata
        .resource_version
        .unwrap_or_else(|| "0".to_owned());
    Ok((state, version, listed))
}

enum SessionEnd {
    /// No slice routes to the pod any more.
    Released,
    /// The server ended the watch (its timeout) or the connection went quiet
    /// past it; resume from `version`.
    Closed { progressed: bool },
    /// 410 Gone: `version` is too old; list again.
    Expired,
}

/// One watch request, read until it ends. Updates `state` and `version` per
/// event, and the gauge with them.
async fn session(
    client: &Client,
    api_timeout: Duration,
    facts: &PodFacts,
    state: &mut ServingSlices,
    version: &mut String,
    metrics: &Metrics,
) -> Result<SessionEnd, KubeError> {
    let namespace = &facts.namespace;
    let what = || format!("watch EndpointSlices in {namespace}");
    let api_error = |source| KubeError::Api {
        what: what(),
        source,
    };
    let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
    let mut request = kube::core::Request::new(EndpointSlice::url_path(&(), Some(namespace)))
        .watch(&params, version)
        .map_err(|e| api_error(kube::Error::BuildRequest(e)))?;
    // As kube's own watch does: no compressed watch streams (kube 5 notes
    // that gzip framing of watch streams breaks its decoder).
    request.headers_mut().insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    let response = bounded(
        what,
        api_timeout,
        client.send(request.map(kube::client::Body::from)),
    )
    .await?;
    // The server may end the watch late; past this the connection is dead.
    let deadline = Instant::now() + watch_timeout() + WATCH_GRACE;

    if !response.status().is_success() {
        let code = response.status().as_u16();
        let body = bounded(what, api_timeout, response.into_body().collect()).await?;
        let status = parse_status(&body.to_bytes(), code);
        if status.code == 410 {
            return Ok(SessionEnd::Expired);
        }
        return Err(api_error(kube::Error::Api(status.boxed())));
    }

    let mut body = response.into_body();
    let mut lines = Lines::default();
    let mut progressed = false;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) | Ok(None) => return Ok(SessionEnd::Closed { progressed }),
            Ok(Some(frame)) => frame.map_err(api_error)?,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        lines.push(&data);
        while let Some(line) = lines.next_line() {
            let event: WatchEvent<EndpointSlice> =
                serde_json::from_slice(&line).map_err(|e| api_error(kube::Error::SerdeError(e)))?;
            progressed = true;
            match apply(event, facts, state, version) {
                Applied::Changed => {
                    set_gauge(metrics, state);
                    if state.count() == 0 {
                        return Ok(SessionEnd::Released);
                    }
                }
                Applied::Unchanged => {}
                Applied::Expired => return Ok(SessionEnd::Expired),
                Applied::Failed(status) => return Err(api_error(kube::Error::Api(status))),
            }
        }
    }
}

#[derive(Debug)]
enum Applied {
    /// A slice was added, modified or deleted: the count may have changed.
    Changed,
    /// A bookmark: only the resourceVersion moved.
    Unchanged,
    /// An ERROR event with 410 Gone.
    Expired,
    Failed(Box<Status>),
}

/// Folds one watch event into the state and the resume point.
fn apply(
    event: WatchEvent<EndpointSlice>,
    facts: &PodFacts,
    state: &mut ServingSlices,
    version: &mut String,
) -> Applied {
    let mut resume_from = |slice: &EndpointSlice| {
        if let Some(rv) = &slice.metadata.resource_version {
            version.clone_from(rv);
        }
    };
    match event {
        WatchEvent::Added(slice) | WatchEvent::Modified(slice) => {
            resume_from(&slice);
            state.upsert(&slice, facts);
            Applied::Changed
        }
        WatchEvent::Deleted(slice) => {
            resume_from(&slice);
            state.delete(&slice);
            Applied::Changed
        }
        WatchEvent::Bookmark(bookmark) => {
            *version = bookmark.metadata.resource_version;
            Applied::Unchanged
        }
        WatchEvent::Error(status) if status.code == 410 => Applied::Expired,
        WatchEvent::Error(status) => Applied::Failed(status),
    }
}

/// An error response's `Status`, or one made up from its text (a proxy in
/// front of the API server may answer in plain text or HTML).
fn parse_status(body: &[u8], code: u16) -> Status {
    serde_json::from_slice::<Status>(body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(body);
        Status::failure(text.trim(), "UnparsableResponse").with_code(code)
    })
}

/// Splits the watch body into its newline-delimited events, which frames cut
/// anywhere.
#[derive(Debug, Default)]
struct Lines {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no newline, so a large event arriving
    /// in many frames is not rescanned from its start each time.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete, non-blank line, without its newline.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let newline = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
            let Some(at) = newline.map(|i| self.scanned + i) else {
                self.scanned = self.buf.len();
                return None;
            };
            let mut line: Vec<u8> = self.buf.drain(..=at).collect();
            self.scanned = 0;
            line.pop();
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Some(line);
            }
        }
    }
}

/// Backoff between watch attempts, and the one warning per wait.
#[derive(Debug)]
struct Retry {
    delay: Duration,
    warned: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            delay: FIRST_RETRY,
            warned: false,
        }
    }
}

impl Retry {
    fn reset(&mut self) {
        self.delay = FIRST_RETRY;
    }

    /// Logs the failure (a warning the first time in this wait, debug after:
    /// a down API must not flood the log at one line per retry) and waits.
    async fn failed(&mut self, error: &KubeError) {
        if self.warned {
            tracing::debug!(error = %error, retry_in = ?self.delay, "EndpointSlice watch failed again");
        } else {
            self.warned = true;
            tracing::warn!(
                error = %error,
                "EndpointSlice watch failed; retrying with backoff (further failures are logged at debug)"
            );
        }
        self.wait().await;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(jittered(self.delay)).await;
        self.delay = (self.delay * 2).min(MAX_RETRY);
    }
}

/// `delay` plus up to a quarter more. The pods of one rollout lose the API
/// together; without jitter they would retry in lock-step.
fn jittered(delay: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::Endpoint;

    fn facts() -> PodFacts {
        PodFacts {
            uid: Some("uid-1".into()),
            ..PodFacts::unknown("web-0", "shop")
        }
    }

    /// A watch event line as the API server writes it.
    fn event_line(kind: &str, slice: &str, rv: &str, with_us: bool) -> String {
        let endpoints = if with_us {
            r#"[{"addresses":["10.0.0.5"],"conditions":{"ready":true},
                 "targetRef":{"kind":"Pod","name":"web-0","namespace":"shop","uid":"uid-1"}}]"#
        } else {
            "[]"
        };
        format!(
            r#"{{"type":"{kind}","object":{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","addressType":"IPv4","metadata":{{"name":"{slice}","resourceVersion":"{rv}"}},"endpoints":{endpoints}}}}}"#
        )
        .replace('\n', "")
    }

    fn parse(line: &str) -> WatchEvent<EndpointSlice> {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn lines_survive_any_framing() {
        let text = format!(
            "{}\n\n{}\n{}",
            event_line("ADDED", "a", "1", true),
            event_line("MODIFIED", "a", "2", false),
            "{\"type\":\"BOOK"
        );
        for cut in [1, 7, 64, 500, text.len()] {
            let mut lines = Lines::default();
            let mut got = Vec::new();
            for chunk in text.as_bytes().chunks(cut) {
                lines.push(chunk);
                while let Some(line) = lines.next_line() {
                    got.push(String::from_utf8(line).unwrap());
                }
            }
            assert_eq!(got.len(), 2, "cut {cut}: {got:?}");
            assert!(got[0].contains("\"ADDED\"") && got[1].contains("\"MODIFIED\""));
            // The incomplete last line waits for its newline.
            lines.push(b"MARK\"}\n");
            assert_eq!(
                lines.next_line().as_deref(),
                Some(&b"{\"type\":\"BOOKMARK\"}"[..])
            );
        }
    }

    #[test]
    fn events_move_the_state_and_the_resume_point() {
        let facts = facts();
        let mut state = ServingSlices::default();
        let mut version = "1".to_owned();
        let added = parse(&event_line("ADDED", "web-a", "5", true));
        assert!(matches!(
            apply(added, &facts, &mut state, &mut version),
            Applied::Changed
        ));
        assert_eq!((state.count(), version.as_str()), (1, "5"));

        let other = parse(&event_line("ADDED", "admin-a", "6", true));
        apply(other, &facts, &mut state, &mut version);
        assert_eq!(state.count(), 2);

        let bookmark = parse(
            r#"{"type":"BOOKMARK","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"9"}}}"#,
        );
        assert!(matches!(
            apply(bookmark, &facts, &mut state, &mut version),
            Applied::Unchanged
        ));
        assert_eq!((state.count(), version.as_str()), (2, "9"));

        // The pod left one slice and the other slice was deleted.
        let left = parse(&event_line("MODIFIED", "web-a", "10", false));
        apply(left, &facts, &mut state, &mut version);
        assert_eq!(state.count(), 1);
        let deleted = parse(&event_line("DELETED", "admin-a", "11", true));
        apply(deleted, &facts, &mut state, &mut version);
        assert_eq!((state.count(), version.as_str()), (0, "11"));
    }

    #[test]
    fn error_events_expire_or_fail() {
        let facts = facts();
        let mut state = ServingSlices::default();
        let mut version = "1".to_owned();
        let gone = parse(
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}}"#,
        );
        assert!(matches!(
            apply(gone, &facts, &mut state, &mut version),
            Applied::Expired
        ));
        let forbidden = parse(
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nope","reason":"Forbidden","code":403}}"#,
        );
        assert!(matches!(
            apply(forbidden, &facts, &mut state, &mut version),
            Applied::Failed(status) if status.code == 403
        ));
        assert_eq!(version, "1");
    }

    #[test]
    fn error_bodies_become_statuses() {
        let json = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"gone","reason":"Expired","code":410}"#;
        assert_eq!(parse_status(json, 410).code, 410);
        let html = parse_status(b"<html>bad gateway</html>\n", 502);
        assert_eq!(html.code, 502);
        assert!(html.message.contains("bad gateway"));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert!(jittered(FIRST_RETRY) >= FIRST_RETRY);
        assert!(jittered(FIRST_RETRY) <= FIRST_RETRY + FIRST_RETRY / 4);
        let mut retry = Retry::default();
        for _ in 0..10 {
            retry.delay = (retry.delay * 2).min(MAX_RETRY);
        }
        assert_eq!(retry.delay, MAX_RETRY);
        retry.reset();
        assert_eq!(retry.delay, FIRST_RETRY);
        assert!(watch_read_timeout(Duration::from_secs(5)) > watch_timeout() + WATCH_GRACE);
    }

    #[test]
    fn an_endpoint_object_round_trips_the_api_names() {
        // targetRef and conditions are camelCase on the wire.
        let endpoint: Endpoint = serde_json::from_str(
            r#"{"addresses":["10.0.0.5"],"conditions":{"serving":false},"targetRef":{"kind":"Pod","name":"web-0"}}"#,
        )
        .unwrap();
        assert_eq!(
            endpoint.target_ref,
            Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some("web-0".into()),
                ..Default::default()
            })
        );
        assert_eq!(endpoint.conditions.and_then(|c| c.serving), Some(false));
    }
}
