//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): parsing and
//! validating `traceparent`/`tracestate`, and the context lameduck sends the
//! app, with its own span as the parent.
//!
//! Nothing here allocates: ids are fixed arrays, headers are written as fixed
//! 55-byte values, and `tracestate` is validated in place. That is what lets
//! the own HTTP/1 path carry trace context on every request (see BENCHMARKS.md).
//! Never passes on a broken header: an invalid `traceparent` starts a new
//! trace (and its `tracestate` is dropped, §4.3: "MUST NOT attempt to parse
//! tracestate" when traceparent failed); an invalid `tracestate` is dropped
//! while the valid `traceparent` is kept.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// `00-` + 32 + `-` + 16 + `-` + 2.
pub const TRACEPARENT_LEN: usize = 55;
/// §3.3.1.1: at most 32 list members.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A `traceparent` received from the client, already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// Parses one `traceparent` value (§3.2). `None` for anything the
/// specification calls invalid:
/// - version `ff`, or a version that is not two lowercase hex digits;
/// - version `00` with any length but 55, or with extra characters;
/// - a higher (future) version shorter than 55 characters, or longer with no
///   `-` after the 55th (§3.2.4: parse the known prefix, ignore the rest);
/// - ids or flags that are not lowercase hex of the exact length;
/// - an all-zero trace id or parent id.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    // Header values arrive without surrounding whitespace from a compliant
    // parser; OWS (RFC 9110 §5.5) is not part of the value either way.
    let value = value.trim_ascii();
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    if version == 0xff {
        return None;
    }
    if version == 0 && value.len() != TRACEPARENT_LEN {
        return None;
    }
    if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    hex_into(&value[3..35], &mut trace_id)?;
    let mut span_id = [0u8; 8];
    hex_into(&value[36..52], &mut span_id)?;
    let flags = hex_byte(&value[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Whether the `tracestate` header lines (combined, RFC 9110 §5.3) form a
/// valid list (§3.3.1): at most 32 members, each `key=value` with the key
/// and value grammars of the specification, no key twice. Empty members
/// (`a=1,,b=2`) are allowed (§3.3.1.1).
pub fn tracestate_is_valid<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let mut keys: [&[u8]; MAX_TRACESTATE_MEMBERS] = [&[]; MAX_TRACESTATE_MEMBERS];
    let mut count = 0;
    for line in lines {
        for member in line.split(|&b| b == b',') {
            let member = member.trim_ascii();
            if member.is_empty() {
                continue;
            }
            let Some(eq) = member.iter().position(|&b| b == b'=') else {
                return false;
            };
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            if !valid_key(key) || !valid_value(value) {
                return false;
            }
            if count == MAX_TRACESTATE_MEMBERS || keys[..count].contains(&key) {
                return false;
            }
            keys[count] = key;
            count += 1;
        }
    }
    true
}

fn key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// `simple-key = lcalpha 0*255(keychar)`, or
/// `tenant-id "@" system-id` with `tenant-id = (lcalpha / DIGIT) 0*240(keychar)`
/// and `system-id = lcalpha 0*13(keychar)`.
fn valid_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        None => {
            (1..=256).contains(&key.len())
                && key[0].is_ascii_lowercase()
                && key.iter().all(|&b| key_char(b))
        }
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            (1..=241).contains(&tenant.len())
                && (tenant[0].is_ascii_lowercase() || tenant[0].is_ascii_digit())
                && tenant.iter().all(|&b| key_char(b))
                && (1..=14).contains(&system.len())
                && system[0].is_ascii_lowercase()
                && system.iter().all(|&b| key_char(b))
        }
    }
}

/// `value = 0*255(chr) nblk-chr`: 1 to 256 printable ASCII characters other
/// than `,` and `=`, spaces allowed inside but not at the end.
fn valid_value(value: &[u8]) -> bool {
    let nblk = |b: u8| (0x21..=0x7e).contains(&b) && b != b',' && b != b'=';
    (1..=256).contains(&value.len())
        && value.last().is_some_and(|&b| nblk(b))
        && value.iter().all(|&b| b == b' ' || nblk(b))
}

/// The sampling decision for traces lameduck starts (`--trace-sample-ratio`),
/// OpenTelemetry's `TraceIdRatioBased`: the low 8 bytes of the (random) trace
/// id against a threshold, so every replica decides the same for one trace.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    threshold: u64,
    always: bool,
}

impl Sampler {
    /// `ratio` in 0..=1 (checked by the config).
    pub fn new(ratio: f64) -> Self {
        Sampler {
            threshold: (ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
            always: ratio >= 1.0,
        }
    }

    pub fn sample(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.always || u64::from_be_bytes(low) < self.threshold
    }
}

/// The trace context of one request as lameduck forwards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTrace {
    pub trace_id: [u8; 16],
    /// lameduck's span: the parent the app sees.
    pub span_id: [u8; 8],
    /// The client's span, when the request came with a valid `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl RequestTrace {
    /// Continues a valid incoming trace (keeping its sampling decision,
    /// OpenTelemetry's parent-based default) or starts a new one.
    pub fn start(incoming: Option<Parent>, sampler: &Sampler) -> Self {
        let span_id = random_span_id();
        match incoming {
            Some(parent) => RequestTrace {
                trace_id: parent.trace_id,
                span_id,
                parent_span_id: Some(parent.span_id),
                sampled: parent.sampled,
            },
            None => {
                let trace_id = random_trace_id();
                RequestTrace {
                    trace_id,
                    span_id,
                    parent_span_id: None,
                    sampled: sampler.sample(&trace_id),
                }
            }
        }
    }

    /// The `traceparent` the app gets: version 00 whatever version came in
    /// (§3.2.4), lameduck's span as the parent, only the sampled flag set
    /// (the other bits have no meaning in version 00).
    pub fn traceparent(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        hex_write(&self.trace_id, &mut out[3..35]);
        hex_write(&self.span_id, &mut out[36..52]);
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    pub fn trace_id_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_write(&self.trace_id, &mut out);
        out
    }
}

/// Formats as the trace id in hex (for logs and spans).
impl std::fmt::Display for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.trace_id_hex();
        // Hex digits only.
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn hex_write(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Lowercase only: §3.2.2 ("HEXDIGLC"), uppercase is invalid.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(nibble(two[0])? << 4 | nibble(two[1])?)
}

fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (slot, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *slot = hex_byte(pair)?;
    }
    Some(())
}

thread_local! {
    // One generator per thread: no lock and no shared cache line on the hot
    // path. Seeded from the OS's randomness (RandomState) once per thread.
    static RNG: Cell<u64> = Cell::new({
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id().into());
        hasher.finish() | 1
    });
}

/// splitmix64: fast, and every output of a 64-bit state is distinct, which
/// is what ids need (they are not secrets).
fn next_random() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = next_random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_random().to_be_bytes());
    id[8..].copy_from_slice(&random_span_id());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parse(s: &str) -> Option<Parent> {
        parse_traceparent(s.as_bytes())
    }

    #[test]
    fn the_specification_example_parses() {
        let p = parse(VALID).unwrap();
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(p.trace_id[0], 0x4b);
        assert!(p.sampled);
        assert!(
            !parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn malformed_traceparents_from_the_specification_are_invalid() {
        for bad in [
            // version ff is forbidden (§3.2.2.2)
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // all-zero trace id and parent id (§3.2.2.3, §3.2.2.4)
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // uppercase hex (HEXDIGLC)
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // not hex
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // wrong lengths
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            // version 00 with anything after the flags
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            // a future version with no '-' after the known prefix
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // empty and short
            "",
            "00",
        ] {
            assert_eq!(parse(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn future_versions_are_parsed_by_their_known_prefix() {
        let p =
            parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds")
                .unwrap();
        assert!(p.sampled);
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_some());
    }

    #[test]
    fn the_forwarded_traceparent_keeps_the_trace_and_names_lameduck_as_parent() {
        let incoming = parse(VALID).unwrap();
        let trace = RequestTrace::start(Some(incoming), &Sampler::new(0.0));
        let out = trace.traceparent();
        let out = std::str::from_utf8(&out).unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(
            out.ends_with("-01"),
            "parent's sampling decision kept: {out}"
        );
        assert_ne!(&out[36..52], "00f067aa0ba902b7");
        assert_eq!(parse(out).unwrap().span_id, trace.span_id);
        assert_eq!(trace.parent_span_id, Some(incoming.span_id));
    }

    #[test]
    fn new_traces_follow_the_ratio() {
        let never = (0..1000).filter(|_| RequestTrace::start(None, &Sampler::new(0.0)).sampled);
        assert_eq!(never.count(), 0);
        let always = (0..1000).filter(|_| RequestTrace::start(None, &Sampler::new(1.0)).sampled);
        assert_eq!(always.count(), 1000);
        let some = (0..10_000)
            .filter(|_| RequestTrace::start(None, &Sampler::new(0.1)).sampled)
            .count();
        assert!((700..1300).contains(&some), "{some} of 10000 at 10 %");
        let a = RequestTrace::start(None, &Sampler::new(0.0));
        let b = RequestTrace::start(None, &Sampler::new(0.0));
        assert_ne!(a.trace_id, b.trace_id);
        assert!(parse(std::str::from_utf8(&a.traceparent()).unwrap()).is_some());
    }

    #[test]
    fn tracestate_follows_the_list_grammar() {
        let ok = |lines: &[&str]| tracestate_is_valid(lines.iter().map(|l| l.as_bytes()));
        assert!(ok(&["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]));
        assert!(ok(&["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"]));
        assert!(ok(&["tenant1@vendor=value", "a=b ,, c=d"]));
        assert!(ok(&[""]));
        assert!(ok(&["a=with space inside"]));
        // keys: lowercase start, allowed characters, lengths
        assert!(!ok(&["Rojo=1"]));
        assert!(!ok(&["1abc=1"]));
        assert!(ok(&["1abc@sys=1"]));
        assert!(!ok(&["abc@1sys=1"]));
        assert!(!ok(&["abc@systemtoolong15=1"]));
        assert!(!ok(&[&format!("{}=1", "a".repeat(257))]));
        assert!(ok(&[&format!("{}=1", "a".repeat(256))]));
        // values: no trailing space, no ',' '=' or control characters, 1..=256
        assert!(!ok(&["a="]));
        assert!(!ok(&["a=b=c"]));
        // (a space before the next ',' is list whitespace, not the value's)
        assert!(ok(&["a=trailing ,b=1"]));
        assert!(!valid_value(b"trailing "));
        assert!(!ok(&["a=\u{7f}"]));
        assert!(!ok(&[&format!("a={}", "v".repeat(257))]));
        // members: no key twice, at most 32
        assert!(!ok(&["a=1,a=2"]));
        assert!(!ok(&["a=1", "a=2"]));
        assert!(!ok(&["novalue"]));
        let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(ok(&[&members.join(",")]));
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(!ok(&[&members.join(",")]));
    }
}
