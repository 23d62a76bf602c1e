//! The header rewriting lameduck does itself (all parsing is hyper's):
//! hop-by-hop removal (RFC 9110 §7.6.1), `x-forwarded-*`, `x-request-id`, and
//! the request-target form each upstream protocol needs.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Version};

use crate::observe::trace_context::{self, RequestTrace, Sampler};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Hop-by-hop headers removed whatever their value (`Connection` and `TE`
/// need their value read first).
static ALWAYS_HOP_BY_HOP: [HeaderName; 5] = [
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Continues the request's W3C trace context (or starts one) and leaves the
/// headers as the app should get them: one `traceparent` naming lameduck's
/// span as the parent; `tracestate` only when both headers were valid. The
/// same rules as the own HTTP/1 path (`h1::head`).
pub fn continue_trace(headers: &mut HeaderMap, sampler: &Sampler) -> RequestTrace {
    let mut parents = headers.get_all(&TRACEPARENT).iter();
    // Two `traceparent` lines are two parents: neither is trusted.
    let parent = match (parents.next(), parents.next()) {
        (Some(value), None) => trace_context::parse_traceparent(value.as_bytes()),
        _ => None,
    };
    let keep_tracestate = parent.is_some()
        && trace_context::tracestate_is_valid(
            headers
                .get_all(&TRACESTATE)
                .iter()
                .map(HeaderValue::as_bytes),
        );
    if !keep_tracestate {
        headers.remove(&TRACESTATE);
    }
    let trace = RequestTrace::start(parent, sampler);
    // Lowercase hex and '-' only: always a valid header value.
    if let Ok(value) = HeaderValue::from_bytes(&trace.traceparent()) {
        headers.insert(TRACEPARENT.clone(), value);
    }
    trace
}

/// Longest request id accepted from a client; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 200;

/// Generates request ids: a random per-process prefix and a counter, so ids are
/// unique across replicas without a random number per request.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        // RandomState is seeded from the OS's randomness once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        RequestIds {
            prefix: hasher.finish(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> HeaderValue {
        // Only hex digits and '-': always a valid header value.
        HeaderValue::from_bytes(&self.next_bytes())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// The next id as text, without allocating.
    pub fn next_bytes(&self) -> [u8; 33] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 33];
        hex16(self.prefix, &mut buf[..16]);
        buf[16] = b'-';
        hex16(n, &mut buf[17..]);
        buf
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

fn hex16(mut value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// Returns the request's id, generating one when it is absent, empty or too long.
pub fn ensure_request_id(headers: &mut HeaderMap, ids: &RequestIds) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID)
        && !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
    {
        return id.clone();
    }
    let id = ids.next();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// Whether an HTTP/1.1 request asks to switch protocols (e.g. WebSocket).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has_token(req.headers(), "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION || name == header::TE || ALWAYS_HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers: the fixed set and any named in `Connection`.
/// `keep_te_trailers` keeps `te: trailers`, which gRPC over HTTP/2 requires.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none: one pass over a few names beats hashing
    // every hop-by-hop name for a removal (hot path; see BENCHMARKS.md).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            // Never let a client strip the headers lameduck itself vouches for.
            if name != X_FORWARDED_FOR && name != X_REQUEST_ID {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    let te_trailers = keep_te_trailers
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    for name in &ALWAYS_HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The peer address as a header value; made once per connection.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    // An IP address's text form is always a valid header value.
    HeaderValue::from_str(&peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends the peer to `x-forwarded-for`; sets `x-forwarded-proto` unless an
/// earlier proxy (e.g. a TLS-terminating ingress) already did.
pub fn add_forwarded(headers: &mut HeaderMap, peer: &HeaderValue) {
    // A list that is not plain text is not a list of addresses: replace it.
    let appended = match headers.get(&X_FORWARDED_FOR).filter(|v| v.to_str().is_ok()) {
        Some(existing) if !existing.as_bytes().trim_ascii().is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + peer.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => Some(peer.clone()),
    };
    if let Some(value) = appended {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
}

static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// On a connection lameduck terminated TLS for: the client's own
/// `x-forwarded-client-cert` is removed (only lameduck vouches for a
/// certificate), the verified one added, and `x-forwarded-proto` is `https`
/// unless an earlier proxy said otherwise. Call before [`add_forwarded`].
pub fn add_tls_facts(headers: &mut HeaderMap, client_cert: Option<&HeaderValue>) {
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(value) = client_cert {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), value.clone());
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    }
}

/// Rewrites the request for the upstream protocol. HTTP/1 upstreams get an
/// origin-form target and a `Host`; HTTP/2 upstreams an absolute URI (it
/// becomes `:scheme` and `:authority`). `fallback_authority` is used when the
/// client sent neither (HTTP/1.0).
pub fn set_upstream_target<B>(
    req: &mut Request<B>,
    upstream_h2: bool,
    fallback_authority: &Authority,
) -> Result<(), http::Error> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| fallback_authority.clone()),
    };
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if upstream_h2 {
        *req.uri_mut() = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(path)
            .build()?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        *req.uri_mut() = Uri::from(path);
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, x-request-id"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("proxy-connection"));
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-request-id").unwrap(), "abc");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(&mut h, &peer_value("127.0.0.1".parse().unwrap()));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn tls_facts_replace_a_client_supplied_certificate_header() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("Subject=\"CN=admin\""),
        );
        h.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("forged"),
        );
        add_tls_facts(&mut h, None);
        assert!(h.get("x-forwarded-client-cert").is_none());
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        let verified = HeaderValue::from_static("Hash=ab;Subject=\"CN=client\"");
        h.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("forged"),
        );
        add_tls_facts(&mut h, Some(&verified));
        let all: Vec<_> = h.get_all("x-forwarded-client-cert").iter().collect();
        assert_eq!(all, [&verified]);
    }

    #[test]
    fn request_ids_are_generated_unique_and_kept() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        let a = ensure_request_id(&mut h, &ids);
        assert_eq!(a.len(), 33);
        let mut h2 = HeaderMap::new();
        assert_ne!(a, ensure_request_id(&mut h2, &ids));
        let mut given = HeaderMap::new();
        given.insert("x-request-id", HeaderValue::from_static("mine"));
        assert_eq!(ensure_request_id(&mut given, &ids), "mine");
    }

    #[test]
    fn targets_follow_the_upstream_protocol() {
        let fallback = Authority::from_static("127.0.0.1:8080");
        let mut req = Request::builder()
            .uri("http://example.com/a?b=1")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        set_upstream_target(&mut req, false, &fallback).unwrap();
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()[header::HOST], "example.com");
        let mut req = Request::builder()
            .uri("/x")
            .header("host", "app")
            .body(())
            .unwrap();
        set_upstream_target(&mut req, true, &fallback).unwrap();
        assert_eq!(req.uri(), "http://app/x");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn header_map(pairs: Vec<(String, Vec<u8>)>) -> HeaderMap {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    map.append(name, value);
                }
            }
            map
        }

        fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
            let name = prop_oneof![
                Just("connection".to_owned()),
                Just("keep-alive".to_owned()),
                Just("te".to_owned()),
                Just("upgrade".to_owned()),
                Just("x-forwarded-for".to_owned()),
                Just("x-request-id".to_owned()),
                "[a-z-]{1,12}",
            ];
            let value = prop_oneof![
                "[ -~]{0,40}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..40),
            ];
            proptest::collection::vec((name, value), 0..12)
        }

        proptest! {
            #[test]
            fn hop_by_hop_headers_never_survive(pairs in headers(), keep_te in any::<bool>()) {
                let mut map = header_map(pairs);
                strip_hop_by_hop(&mut map, keep_te);
                for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer", "upgrade"] {
                    prop_assert!(!map.contains_key(name), "{name} survived");
                }
                if let Some(te) = map.get(header::TE) {
                    prop_assert!(keep_te && te == "trailers");
                }
            }

            #[test]
            fn forwarded_for_always_ends_with_the_peer(pairs in headers(), peer in any::<IpAddr>()) {
                let mut map = header_map(pairs);
                add_forwarded(&mut map, &peer_value(peer));
                let xff = map.get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or_default();
                prop_assert!(xff.ends_with(&peer.to_string()), "{xff}");
                prop_assert!(map.contains_key("x-forwarded-proto"));
            }

            #[test]
            fn every_request_gets_a_bounded_id(pairs in headers()) {
                let ids = RequestIds::new();
                let mut map = header_map(pairs);
                let id = ensure_request_id(&mut map, &ids);
                prop_assert!(!id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN);
                prop_assert_eq!(map.get(&X_REQUEST_ID), Some(&id));
            }

            #[test]
            fn upstream_targets_are_well_formed(path in "/[!-~]{0,40}", host in proptest::option::of("[ -~]{0,30}"), h2 in any::<bool>()) {
                let fallback = Authority::from_static("127.0.0.1:8080");
                let Ok(mut req) = Request::builder().uri(path.as_str()).body(()) else { return Ok(()) };
                if let Some(host) = host.and_then(|h| HeaderValue::from_str(&h).ok()) {
                    req.headers_mut().insert(header::HOST, host);
                }
                if set_upstream_target(&mut req, h2, &fallback).is_ok() {
                    prop_assert_eq!(req.uri().authority().is_some(), h2);
                }
            }
        }
    }
}
