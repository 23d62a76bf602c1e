//! The request rules every path enforces before anything is forwarded: the
//! ones that decide where a message ends (framing) and which host it is for
//! (routing). lameduck changes heads on the way through (hop-by-hop removal,
//! `Host`, `x-forwarded-*`), and anything it changes there must not change
//! how the app frames or routes the message: a request where that could
//! happen is answered 400 by lameduck itself and never reaches the app.
//!
//! One function serves the own HTTP/1 path (over `httparse`'s header list),
//! hyper's HTTP/1 path and HTTP/2 requests (over a `HeaderMap`), so the three
//! cannot drift apart. `docs/http1.md` has the table of every case.

/// Why a request is refused with 400 (the text goes into the debug log).
pub type Refusal = &'static str;

/// What the caller knows about the request besides its header lines.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// HTTP/1.1 (`Host` is then required, RFC 9112 §3.2).
    pub http11: bool,
    /// The authority of an absolute-form target, or HTTP/2's `:authority`.
    pub authority: Option<&'a [u8]>,
}

/// Checks the framing- and routing-relevant header lines of a request.
///
/// - `Host`: exactly one on HTTP/1.1, at most one otherwise, with a valid
///   value, equal to the target's authority when there is one (RFC 9112 §3.2,
///   §3.2.2; RFC 9113 §8.3.1).
/// - `Connection` must not name `Content-Length`, `Transfer-Encoding` or
///   `Host`: removing them as hop-by-hop (RFC 9110 §7.6.1) would change the
///   framing or the target the app sees, the smuggling vector this closes.
/// - `Transfer-Encoding`, if present, is one line that says `chunked` and
///   nothing else: any other coding is one lameduck cannot pass on intact
///   (RFC 9112 §6.1 lets a server refuse codings it does not understand).
pub fn check_request<'h>(
    target: Target<'_>,
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
) -> Result<(), Refusal> {
    let mut host: Option<&[u8]> = None;
    let mut transfer_encodings = 0;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err("repeated Host");
            }
            if !is_valid_host(value) {
                return Err("invalid Host");
            }
            host = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            if value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .any(names_framing_header)
            {
                return Err("Connection names a framing or routing header");
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encodings += 1;
            if transfer_encodings > 1 || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err("Transfer-Encoding other than a single chunked");
            }
        }
    }
    match (host, target.authority) {
        (None, _) if target.http11 => Err("missing Host"),
        (Some(host), Some(authority)) if !host.trim_ascii().eq_ignore_ascii_case(authority) => {
            Err("Host differs from the target's authority")
        }
        _ => Ok(()),
    }
}

/// The fields that decide where a message ends and which host it is for:
/// never removed because `Connection` names them, never taken as trailers.
pub const FRAMING_AND_ROUTING_FIELDS: [&[u8]; 3] =
    [b"content-length", b"transfer-encoding", b"host"];

fn names_framing_header(token: &[u8]) -> bool {
    FRAMING_AND_ROUTING_FIELDS
        .iter()
        .any(|name| token.eq_ignore_ascii_case(name))
}

/// `Host = uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a
/// reg-name, an IPv4 address or a bracketed IP literal, then an optional
/// port. Userinfo (`@`), paths and anything that needs quoting are refused;
/// an empty value too (every `http` URI has a non-empty authority).
fn is_valid_host(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    let (host, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        (&b"ip-literal"[..], &rest[end + 1..])
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        }
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    port_ok
        && !host.is_empty()
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(http11: bool, authority: Option<&str>, lines: &[(&str, &str)]) -> Result<(), Refusal> {
        let target = Target {
            http11,
            authority: authority.map(str::as_bytes),
        };
        check_request(
            target,
            lines.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn host_rules_follow_rfc_9112_section_3_2() {
        assert_eq!(check(true, None, &[("Host", "app:8080")]), Ok(()));
        assert_eq!(check(true, None, &[("host", "[::1]:80")]), Ok(()));
        assert_eq!(check(true, None, &[]), Err("missing Host"));
        assert_eq!(check(false, None, &[]), Ok(()));
        assert_eq!(
            check(true, None, &[("Host", "a"), ("host", "a")]),
            Err("repeated Host")
        );
        for bad in [
            "", " ", "a b", "a/b", "user@a", "a:80:81", "a:x", "[::1", "[]", "a:123456", "\"a\"",
        ] {
            assert_eq!(
                check(true, None, &[("Host", bad)]),
                Err("invalid Host"),
                "{bad:?}"
            );
        }
        assert_eq!(check(true, Some("a:1"), &[("Host", "A:1")]), Ok(()));
        assert_eq!(
            check(true, Some("a"), &[("Host", "b")]),
            Err("Host differs from the target's authority")
        );
        // HTTP/2 without `host`: `:authority` is the target.
        assert_eq!(check(false, Some("a"), &[]), Ok(()));
    }

    #[test]
    fn connection_may_not_name_framing_or_routing_headers() {
        for value in [
            "content-length",
            "close, Content-Length",
            "keep-alive,transfer-encoding",
            " HOST ",
        ] {
            assert_eq!(
                check(true, None, &[("Host", "a"), ("Connection", value)]),
                Err("Connection names a framing or routing header"),
                "{value}"
            );
        }
        for value in [
            "close",
            "te",
            "upgrade",
            "x-forwarded-for",
            "content-lengthx",
        ] {
            assert_eq!(
                check(true, None, &[("Host", "a"), ("Connection", value)]),
                Ok(()),
                "{value}"
            );
        }
    }

    #[test]
    fn transfer_encoding_is_one_plain_chunked() {
        assert_eq!(
            check(
                true,
                None,
                &[("Host", "a"), ("Transfer-Encoding", " Chunked ")]
            ),
            Ok(())
        );
        for value in [
            "gzip, chunked",
            "chunked, chunked",
            "identity",
            "\"chunked\"",
            "chunked;q=1",
        ] {
            assert!(
                check(true, None, &[("Host", "a"), ("Transfer-Encoding", value)]).is_err(),
                "{value}"
            );
        }
        assert!(
            check(
                true,
                None,
                &[
                    ("Host", "a"),
                    ("Transfer-Encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]
            )
            .is_err()
        );
    }
}
