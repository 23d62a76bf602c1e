//! Finds where an HTTP/1.1 chunked message body ends (RFC 9112 §7.1) without
//! decoding it, so the proxy can forward the body bytes verbatim and still know
//! when the message is complete and where the next one begins.
//!
//! Line endings must be exactly CRLF. A bare LF, or a CR followed by anything
//! but LF, is an error rather than being tolerated: if lameduck accepted a line
//! ending that the upstream reads differently, the two would disagree about
//! where the body ends, and the bytes in between could be smuggled through as
//! a separate request.
//!
//! Chunk extensions must follow the grammar of RFC 9112 §7.1.1 and trailer
//! field lines that of §5 (no obs-fold, no whitespace before the colon), and a
//! trailer may not be `Content-Length`, `Transfer-Encoding` or `Host` (§7.1.2:
//! a recipient must not let a trailer change framing or routing, and some
//! apps merge trailers into the header section): what is forwarded verbatim
//! must read the same to every strict parser after lameduck.
//!
//! Only the framing (size lines, the CRLF after each chunk's data, trailers) is
//! examined byte by byte; chunk data is skipped in bulk. The scanner keeps a few
//! words of state and never allocates, so input may be split anywhere.

/// Longest chunk-size line accepted, counting the size digits and extensions
/// but not the CRLF. Bounds the work an endless extension can cause.
const MAX_SIZE_LINE_LEN: u32 = 4096;

/// Largest trailer section accepted, counting every field line with its CRLF
/// but not the empty line that ends the section.
const MAX_TRAILER_SECTION_LEN: u32 = 64 * 1024;

/// Why a chunked body was rejected. Each one leaves the end of the body
/// unknown, so the connection it arrived on cannot carry another message.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    #[error("chunk-size line does not start with a hex digit (found byte {byte:#04x})")]
    MissingChunkSize { byte: u8 },
    #[error("invalid byte {byte:#04x} in chunk size")]
    InvalidChunkSize { byte: u8 },
    #[error("chunk size does not fit in 64 bits")]
    ChunkSizeOverflow,
    #[error("chunk-size line longer than {max} bytes", max = MAX_SIZE_LINE_LEN)]
    SizeLineTooLong,
    #[error("invalid byte {byte:#04x} in chunk extension")]
    InvalidExtensionByte { byte: u8 },
    #[error("chunk data not followed by CRLF")]
    MissingCrlfAfterData,
    #[error("bare LF where CRLF is required")]
    BareLf,
    #[error("CR not followed by LF")]
    CrWithoutLf,
    #[error("trailer section larger than {max} bytes", max = MAX_TRAILER_SECTION_LEN)]
    TrailerTooLarge,
    #[error("invalid byte {byte:#04x} in trailer section")]
    InvalidTrailerByte { byte: u8 },
    #[error("trailer field that may only be a header (Content-Length, Transfer-Encoding, Host)")]
    ForbiddenTrailer,
}

/// Where the scanner is in the chunked grammar; each state names what the
/// next byte is expected to be.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first hex digit of a chunk size.
    #[default]
    SizeStart,
    /// More hex digits, whitespace, `;` or the CR ending the size line.
    Size,
    /// Whitespace after the size: more of it, `;` or CR.
    SizeWhitespace,
    /// After `;`: whitespace, then an extension name.
    ExtNameStart,
    /// More of an extension name.
    ExtName,
    /// Whitespace after a name or value: `=` (after a name), `;` or CR.
    ExtAfter { value_allowed: bool },
    /// After `=`: whitespace, then a token or a quoted string.
    ExtValueStart,
    /// More of a token value.
    ExtToken,
    /// Inside a quoted-string value.
    ExtQuoted,
    /// The byte after a backslash in a quoted string.
    ExtQuotedPair,
    /// The LF ending the size line.
    SizeLf,
    /// Chunk data; `chunk_remaining` bytes of it are left.
    Data,
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// A trailer field line, or the CR of the empty line ending the body.
    TrailerLineStart,
    /// More of a trailer field name, up to its colon.
    TrailerName,
    /// A trailer field value, up to its CR.
    TrailerValue,
    /// The LF ending a trailer field line.
    TrailerLf,
    /// The LF of the empty line ending the body.
    FinalLf,
    /// The body has ended.
    Done,
    /// The body is malformed; where it ends cannot be known.
    Failed(ChunkedError),
}

/// Tracks a chunked body across reads and reports where it ends.
#[derive(Debug, Default)]
pub struct ChunkedScanner {
    state: State,
    /// The chunk size while its line is parsed, then the data bytes left.
    chunk_remaining: u64,
    /// Bytes of the current chunk-size line so far, excluding CRLF.
    size_line_len: u32,
    /// Bytes of the trailer section so far.
    trailer_len: u32,
    /// Which forbidden trailer names the current field name can still be
    /// (a bit each in [`FORBIDDEN_TRAILERS`] order), and its length so far.
    trailer_candidates: u8,
    trailer_name_len: u8,
}

/// Fields that RFC 9112 §7.1.2 keeps out of trailers for lameduck's purposes:
/// the same ones `Connection` may not name (`crate::proxy::rules`).
const FORBIDDEN_TRAILERS: [&[u8]; 3] = crate::proxy::rules::FRAMING_AND_ROUTING_FIELDS;

impl ChunkedScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans the next bytes of the body. Returns how many bytes of `input` belong to the body:
    /// `input.len()` if the body has not ended yet, or the index just past the final CRLF
    /// (after the trailer section) once it ends; from then on `is_done()` is true.
    /// Bytes after that index belong to the next message and must not be consumed.
    /// Calling scan after done returns Ok(0).
    ///
    /// After an error every call returns the same error: the end of a malformed
    /// body is unknowable, so the connection cannot be reused.
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, ChunkedError> {
        if let State::Failed(error) = self.state {
            return Err(error);
        }
        // Each `decode` consumes at least one byte until the body is done,
        // skipping a whole run of chunk data at a time.
        let mut pos = 0;
        while pos < input.len() && !self.is_done() {
            pos += self.decode(&input[pos..])?.0;
        }
        Ok(pos)
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Like [`scan`](Self::scan), but stops at chunk data, for a receiver
    /// that needs the body decoded (an HTTP/2 client). Returns how many bytes
    /// of `input` were consumed and the chunk data among them (always at the
    /// end of the consumed part). Empty data with everything consumed: more
    /// input is needed, or the body is done. Trailers are consumed, not returned.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(usize, &'a [u8]), ChunkedError> {
        match self.state {
            State::Done => return Ok((0, &[])),
            State::Failed(error) => return Err(error),
            _ => {}
        }
        let mut pos = 0;
        while pos < input.len() {
            if self.state == State::Data {
                let available = (input.len() - pos) as u64;
                // At most `available`, which came from a usize.
                let data = self.chunk_remaining.min(available) as usize;
                self.chunk_remaining -= data as u64;
                if self.chunk_remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok((pos + data, &input[pos..pos + data]));
            }
            let byte = input[pos];
            pos += 1;
            match self.next_state(byte) {
                Ok(next) => self.state = next,
                Err(error) => {
                    self.state = State::Failed(error);
                    return Err(error);
                }
            }
            if self.state == State::Done {
                break;
            }
        }
        Ok((pos, &[]))
    }

    /// The state after one framing byte.
    fn next_state(&mut self, byte: u8) -> Result<State, ChunkedError> {
        use ChunkedError::*;
        let next = match self.state {
            State::SizeStart => {
                let digit = hex_value(byte).ok_or(MissingChunkSize { byte })?;
                self.chunk_remaining = u64::from(digit);
                self.size_line_len = 1;
                State::Size
            }
            State::Size => match byte {
                b'\r' => State::SizeLf,
                b'\n' => return Err(BareLf),
                b' ' | b'\t' => {
                    self.extend_size_line()?;
                    State::SizeWhitespace
                }
                b';' => {
                    self.extend_size_line()?;
                    State::ExtNameStart
                }
                _ => {
                    let digit = hex_value(byte).ok_or(InvalidChunkSize { byte })?;
                    // Leading zeros are bounded only by the line length; the
                    // overflow check caps significant digits at 16.
                    self.extend_size_line()?;
                    if self.chunk_remaining > u64::MAX >> 4 {
                        return Err(ChunkSizeOverflow);
                    }
                    self.chunk_remaining = self.chunk_remaining << 4 | u64::from(digit);
                    State::Size
                }
            },
            // Whitespace without a following `;` is outside the grammar, but
            // senders pad sizes with it and the CR still ends the line
            // unambiguously.
            State::SizeWhitespace => match byte {
                b'\r' => State::SizeLf,
                b'\n' => return Err(BareLf),
                b' ' | b'\t' => {
                    self.extend_size_line()?;
                    State::SizeWhitespace
                }
                b';' => {
                    self.extend_size_line()?;
                    State::ExtNameStart
                }
                _ => return Err(InvalidChunkSize { byte }),
            },
            // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ),
            // ext-val = token / quoted-string (RFC 9112 §7.1.1). Forwarded, not
            // interpreted, but only in the form every strict parser reads alike.
            State::ExtNameStart
            | State::ExtName
            | State::ExtAfter { .. }
            | State::ExtValueStart
            | State::ExtToken
            | State::ExtQuoted
            | State::ExtQuotedPair => {
                if byte == b'\n' {
                    return Err(BareLf);
                }
                let next = self
                    .extension_state(byte)
                    .ok_or(InvalidExtensionByte { byte })?;
                if next != State::SizeLf {
                    self.extend_size_line()?;
                }
                next
            }
            State::SizeLf => match byte {
                b'\n' if self.chunk_remaining == 0 => {
                    self.trailer_len = 0;
                    State::TrailerLineStart
                }
                b'\n' => State::Data,
                _ => return Err(CrWithoutLf),
            },
            // `scan_unfinished` skips data in bulk and never gets here; stepping
            // through it one byte at a time would still be correct.
            State::Data => {
                self.chunk_remaining -= 1;
                if self.chunk_remaining == 0 {
                    State::DataCr
                } else {
                    State::Data
                }
            }
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(MissingCrlfAfterData),
            },
            State::DataLf => match byte {
                b'\n' => State::SizeStart,
                _ => return Err(MissingCrlfAfterData),
            },
            State::TrailerLineStart => match byte {
                b'\r' => State::FinalLf,
                _ => {
                    // A field name starts; whitespace here would be obs-fold.
                    self.trailer_candidates = (1 << FORBIDDEN_TRAILERS.len()) - 1;
                    self.trailer_name_len = 0;
                    self.extend_trailer_name(byte)?;
                    State::TrailerName
                }
            },
            State::TrailerName => match byte {
                b':' => {
                    self.count_trailer_byte()?;
                    if self.names_forbidden_trailer() {
                        return Err(ForbiddenTrailer);
                    }
                    State::TrailerValue
                }
                _ => {
                    self.extend_trailer_name(byte)?;
                    State::TrailerName
                }
            },
            State::TrailerValue => match byte {
                b'\r' => {
                    self.count_trailer_byte()?;
                    State::TrailerLf
                }
                b'\n' => return Err(BareLf),
                b'\t' | b' '..=b'~' | 0x80..=0xff => {
                    self.count_trailer_byte()?;
                    State::TrailerValue
                }
                _ => return Err(InvalidTrailerByte { byte }),
            },
            State::TrailerLf => match byte {
                b'\n' => {
                    self.count_trailer_byte()?;
                    State::TrailerLineStart
                }
                _ => return Err(CrWithoutLf),
            },
            State::FinalLf => match byte {
                b'\n' => State::Done,
                _ => return Err(CrWithoutLf),
            },
            // `scan` returns before stepping in these states.
            State::Done | State::Failed(_) => self.state,
        };
        Ok(next)
    }

    fn extend_size_line(&mut self) -> Result<(), ChunkedError> {
        self.size_line_len += 1;
        if self.size_line_len > MAX_SIZE_LINE_LEN {
            return Err(ChunkedError::SizeLineTooLong);
        }
        Ok(())
    }

    /// The state after one byte of a chunk extension; `None`: not allowed there.
    fn extension_state(&self, byte: u8) -> Option<State> {
        let whitespace = matches!(byte, b' ' | b'\t');
        Some(match self.state {
            State::ExtNameStart if whitespace => State::ExtNameStart,
            State::ExtNameStart | State::ExtName if is_tchar(byte) => State::ExtName,
            State::ExtName if whitespace => State::ExtAfter {
                value_allowed: true,
            },
            State::ExtAfter { value_allowed } if whitespace => State::ExtAfter { value_allowed },
            State::ExtName
            | State::ExtAfter {
                value_allowed: true,
            } if byte == b'=' => State::ExtValueStart,
            State::ExtName | State::ExtAfter { .. } | State::ExtToken if byte == b';' => {
                State::ExtNameStart
            }
            State::ExtName | State::ExtAfter { .. } | State::ExtToken if byte == b'\r' => {
                State::SizeLf
            }
            State::ExtValueStart if whitespace => State::ExtValueStart,
            State::ExtValueStart if byte == b'"' => State::ExtQuoted,
            State::ExtValueStart | State::ExtToken if is_tchar(byte) => State::ExtToken,
            State::ExtToken if whitespace => State::ExtAfter {
                value_allowed: false,
            },
            State::ExtQuoted => match byte {
                b'"' => State::ExtAfter {
                    value_allowed: false,
                },
                b'\\' => State::ExtQuotedPair,
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => State::ExtQuoted,
                _ => return None,
            },
            State::ExtQuotedPair => match byte {
                b'\t' | b' '..=b'~' | 0x80..=0xff => State::ExtQuoted,
                _ => return None,
            },
            _ => return None,
        })
    }

    /// Accepts one byte of a trailer field name (a token, RFC 9110 §5.6.2)
    /// and narrows which forbidden names it can still be.
    fn extend_trailer_name(&mut self, byte: u8) -> Result<(), ChunkedError> {
        match byte {
            b'\n' => return Err(ChunkedError::BareLf),
            _ if !is_tchar(byte) => return Err(ChunkedError::InvalidTrailerByte { byte }),
            _ => {}
        }
        let at = usize::from(self.trailer_name_len);
        for (i, name) in FORBIDDEN_TRAILERS.iter().enumerate() {
            if name.get(at) != Some(&byte.to_ascii_lowercase()) {
                self.trailer_candidates &= !(1 << i);
            }
        }
        self.trailer_name_len = self.trailer_name_len.saturating_add(1);
        self.count_trailer_byte()
    }

    fn names_forbidden_trailer(&self) -> bool {
        FORBIDDEN_TRAILERS.iter().enumerate().any(|(i, name)| {
            self.trailer_candidates & (1 << i) != 0
                && name.len() == usize::from(self.trailer_name_len)
        })
    }

    fn count_trailer_byte(&mut self) -> Result<(), ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILER_SECTION_LEN {
            return Err(ChunkedError::TrailerTooLarge);
        }
        Ok(())
    }
}

/// `tchar` of RFC 9110 §5.6.2: the bytes of a token.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Scans `input` in one call with a fresh scanner.
    fn scan_whole(input: &[u8]) -> (Result<usize, ChunkedError>, bool) {
        let mut scanner = ChunkedScanner::new();
        let outcome = scanner.scan(input);
        (outcome, scanner.is_done())
    }

    /// Scans `input` in pieces cut at `cuts` (any order, duplicates allowed),
    /// checking the per-call contract. Returns the total consumed or the first
    /// error, and whether the scanner ended done.
    /// `input` split at the given cut points (in any order, repeats allowed).
    fn pieces<'a>(input: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
        bounds.push(0);
        bounds.push(input.len());
        bounds.sort_unstable();
        bounds.windows(2).map(|w| &input[w[0]..w[1]]).collect()
    }

    fn scan_in_pieces(input: &[u8], cuts: &[Index]) -> (Result<usize, ChunkedError>, bool) {
        let mut scanner = ChunkedScanner::new();
        let mut consumed = 0;
        for piece in pieces(input, cuts) {
            let was_done = scanner.is_done();
            match scanner.scan(piece) {
                Ok(n) => {
                    if was_done {
                        assert_eq!(n, 0, "consumed bytes after the end");
                    }
                    assert!(n == piece.len() || scanner.is_done(), "stopped early");
                    consumed += n;
                }
                Err(error) => {
                    assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(error), "error not sticky");
                    return (Err(error), false);
                }
            }
        }
        (Ok(consumed), scanner.is_done())
    }

    fn scan_err(input: &[u8]) -> ChunkedError {
        scan_whole(input).0.expect_err("body should be rejected")
    }

    #[test]
    fn simple_body() {
        assert_eq!(scan_whole(b"5\r\nhello\r\n0\r\n\r\n"), (Ok(15), true));
    }

    #[test]
    fn empty_body() {
        assert_eq!(scan_whole(b"0\r\n\r\n"), (Ok(5), true));
        assert_eq!(scan_whole(b"000\r\n\r\n"), (Ok(7), true));
    }

    #[test]
    fn extensions() {
        let body = b"5;name=value\r\nhello\r\n3 ; a = \"q;\\\"x\" ;b\t\r\nabc\r\n0;last\r\n\r\n";
        assert_eq!(scan_whole(body), (Ok(body.len()), true));
        // Padding after the size without an extension.
        let body = b"5  \r\nhello\r\n0\t\r\n\r\n";
        assert_eq!(scan_whole(body), (Ok(body.len()), true));
    }

    #[test]
    fn trailers() {
        let body = b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum: \xff\t1\r\n\r\n";
        assert_eq!(scan_whole(body), (Ok(body.len()), true));
    }

    #[test]
    fn framing_bytes_inside_data_are_data() {
        let body = b"a\r\n0\r\n\r\n\n\r\rxy\r\n0\r\n\r\n";
        assert_eq!(scan_whole(body), (Ok(body.len()), true));
    }

    #[test]
    fn next_message_is_not_consumed() {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(scan_whole(&input), (Ok(body.len()), true));
    }

    #[test]
    fn hex_digits_in_either_case() {
        let data = [b'x'; 0xab];
        for size in ["ab", "AB", "aB", "00Ab"] {
            let mut body = format!("{size}\r\n").into_bytes();
            body.extend_from_slice(&data);
            body.extend_from_slice(b"\r\n0\r\n\r\n");
            assert_eq!(scan_whole(&body), (Ok(body.len()), true), "size {size}");
        }
    }

    #[test]
    fn largest_chunk_size_is_accepted() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"0000ffffffffffffffff\r\n"), Ok(22));
        assert_eq!(scanner.scan(&[0; 1000]), Ok(1000));
        assert!(!scanner.is_done());
    }

    #[test]
    fn missing_digits_and_bad_hex() {
        use ChunkedError::{InvalidChunkSize, MissingChunkSize};
        let cases: [(&[u8], ChunkedError); 8] = [
            (b"\r\n", MissingChunkSize { byte: b'\r' }),
            (b";ext\r\n", MissingChunkSize { byte: b';' }),
            (b" 5\r\n", MissingChunkSize { byte: b' ' }),
            (b"g\r\n", MissingChunkSize { byte: b'g' }),
            (b"-5\r\n", MissingChunkSize { byte: b'-' }),
            (b"5g\r\n", InvalidChunkSize { byte: b'g' }),
            (b"0x5\r\n", InvalidChunkSize { byte: b'x' }),
            (b"5 5\r\n", InvalidChunkSize { byte: b'5' }),
        ];
        for (input, expected) in cases {
            assert_eq!(
                scan_err(input),
                expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn bare_lf() {
        assert_eq!(scan_err(b"5\nhello\r\n"), ChunkedError::BareLf);
        assert_eq!(scan_err(b"5;a\nhello\r\n"), ChunkedError::BareLf);
        assert_eq!(scan_err(b"0\r\nX: y\n\r\n"), ChunkedError::BareLf);
        assert_eq!(scan_err(b"0\r\n\n"), ChunkedError::BareLf);
    }

    #[test]
    fn cr_without_lf() {
        assert_eq!(scan_err(b"5\rhello"), ChunkedError::CrWithoutLf);
        assert_eq!(scan_err(b"0\r\nX: y\rZ"), ChunkedError::CrWithoutLf);
        assert_eq!(scan_err(b"0\r\n\r\r\n"), ChunkedError::CrWithoutLf);
    }

    #[test]
    fn missing_crlf_after_data() {
        let error = ChunkedError::MissingCrlfAfterData;
        assert_eq!(scan_err(b"5\r\nhello0\r\n\r\n"), error);
        assert_eq!(scan_err(b"5\r\nhello\n0\r\n\r\n"), error);
        assert_eq!(scan_err(b"5\r\nhello\r0\r\n\r\n"), error);
        assert_eq!(scan_err(b"3\r\nhello\r\n0\r\n\r\n"), error);
    }

    #[test]
    fn overflow() {
        assert_eq!(
            scan_err(b"10000000000000000\r\n"),
            ChunkedError::ChunkSizeOverflow
        );
        assert_eq!(
            scan_err(b"fffffffffffffffff\r\n"),
            ChunkedError::ChunkSizeOverflow
        );
    }

    #[test]
    fn size_line_too_long() {
        let limit = MAX_SIZE_LINE_LEN as usize;
        let mut line = b"1;".to_vec();
        line.resize(limit, b'a');
        line.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(scan_whole(&line), (Ok(line.len()), true));

        let mut line = b"1;".to_vec();
        line.resize(limit + 1, b'a');
        assert_eq!(scan_err(&line), ChunkedError::SizeLineTooLong);

        let zeros = vec![b'0'; limit + 1];
        assert_eq!(scan_err(&zeros), ChunkedError::SizeLineTooLong);
    }

    #[test]
    fn invalid_extension_byte() {
        assert_eq!(
            scan_err(b"5;a\0\r\n"),
            ChunkedError::InvalidExtensionByte { byte: 0 }
        );
        assert_eq!(
            scan_err(b"5;a\x7f\r\n"),
            ChunkedError::InvalidExtensionByte { byte: 0x7f }
        );
    }

    #[test]
    fn trailers_too_large() {
        let limit = MAX_TRAILER_SECTION_LEN as usize;
        // One field line of exactly the limit, CRLF included, is accepted.
        let mut body = b"0\r\nX: ".to_vec();
        body.resize(3 + limit - 2, b'v');
        body.extend_from_slice(b"\r\n\r\n");
        assert_eq!(scan_whole(&body), (Ok(body.len()), true));

        let mut body = b"0\r\nX: ".to_vec();
        body.resize(3 + limit - 1, b'v');
        body.extend_from_slice(b"\r\n\r\n");
        assert_eq!(scan_err(&body), ChunkedError::TrailerTooLarge);

        // The limit is on the whole section, not each line.
        let mut body = b"0\r\n".to_vec();
        while body.len() <= limit + 3 {
            body.extend_from_slice(b"X-Field: value\r\n");
        }
        body.extend_from_slice(b"\r\n");
        assert_eq!(scan_err(&body), ChunkedError::TrailerTooLarge);
    }

    #[test]
    fn extensions_outside_the_grammar_are_refused() {
        for body in [
            &b"5;\r\n"[..],
            b"5;=v\r\n",
            b"5;a=\r\n",
            b"5;a==b\r\n",
            b"5;a=b c\r\n",
            b"5;a=\"unterminated\r\n",
            b"5;a=\"q\"x\r\n",
            b"5;a b\r\n",
            b"5;a@b\r\n",
            b"5;a=\"\x01\"\r\n",
        ] {
            assert!(
                matches!(scan_err(body), ChunkedError::InvalidExtensionByte { .. }),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn framing_and_routing_fields_are_refused_as_trailers() {
        for name in ["Content-Length", "transfer-encoding", "HOST"] {
            let body = format!("0\r\n{name}: 5\r\n\r\n");
            assert_eq!(
                scan_err(body.as_bytes()),
                ChunkedError::ForbiddenTrailer,
                "{name}"
            );
        }
        // Names that only start like one are ordinary fields.
        for name in ["Hostname", "Content-Lengths", "Hos", "X-Host"] {
            let body = format!("0\r\n{name}: 5\r\n\r\n");
            assert_eq!(
                scan_whole(body.as_bytes()),
                (Ok(body.len()), true),
                "{name}"
            );
        }
    }

    #[test]
    fn trailer_lines_outside_the_field_grammar_are_refused() {
        for body in [
            &b"0\r\nX : 1\r\n\r\n"[..],
            b"0\r\n X: 1\r\n\r\n",
            b"0\r\nX: 1\r\n\tfolded\r\n\r\n",
            b"0\r\nNo-Colon\r\n\r\n",
            b"0\r\nX: a\x7fb\r\n\r\n",
        ] {
            assert!(
                matches!(scan_err(body), ChunkedError::InvalidTrailerByte { .. }),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn invalid_trailer_byte() {
        assert_eq!(
            scan_err(b"0\r\nX: a\0b\r\n\r\n"),
            ChunkedError::InvalidTrailerByte { byte: 0 }
        );
    }

    #[test]
    fn scan_after_done_returns_zero() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"0\r\n\r\n"), Ok(5));
        assert!(scanner.is_done());
        assert_eq!(scanner.scan(b"5\r\nhello\r\n"), Ok(0));
        assert_eq!(scanner.scan(b""), Ok(0));
        assert!(scanner.is_done());
    }

    #[test]
    fn errors_are_sticky() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"5\nx"), Err(ChunkedError::BareLf));
        assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(ChunkedError::BareLf));
        assert!(!scanner.is_done());
    }

    #[test]
    fn byte_at_a_time() {
        let body = b"5;e=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nT: v\r\n\r\nnext";
        let body_len = body.len() - b"next".len();
        let mut scanner = ChunkedScanner::new();
        let mut consumed = 0;
        for byte in body {
            consumed += scanner.scan(std::slice::from_ref(byte)).unwrap();
            assert_eq!(scanner.is_done(), consumed == body_len);
        }
        assert_eq!(consumed, body_len);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ChunkedError::InvalidChunkSize { byte: b'g' }.to_string(),
            "invalid byte 0x67 in chunk size"
        );
        assert_eq!(
            ChunkedError::SizeLineTooLong.to_string(),
            "chunk-size line longer than 4096 bytes"
        );
    }

    /// One data chunk as a sender might frame it.
    #[derive(Debug, Clone)]
    struct Chunk {
        data: Vec<u8>,
        uppercase: bool,
        leading_zeros: usize,
        extension: Option<String>,
    }

    #[derive(Debug, Clone)]
    struct Body {
        chunks: Vec<Chunk>,
        last_chunk_zeros: usize,
        last_extension: Option<String>,
        trailers: Vec<String>,
    }

    impl Body {
        fn encode(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for chunk in &self.chunks {
                let zeros = "0".repeat(chunk.leading_zeros);
                let size = if chunk.uppercase {
                    format!("{zeros}{:X}", chunk.data.len())
                } else {
                    format!("{zeros}{:x}", chunk.data.len())
                };
                out.extend_from_slice(size.as_bytes());
                out.extend_from_slice(chunk.extension.as_deref().unwrap_or("").as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&chunk.data);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice("0".repeat(self.last_chunk_zeros).as_bytes());
            out.extend_from_slice(self.last_extension.as_deref().unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            for trailer in &self.trailers {
                out.extend_from_slice(trailer.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out
        }
    }

    fn extension() -> impl Strategy<Value = String> {
        let token = "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,8}";
        let value = format!("({token}|\"([ !#-\\[\\]-~\t]|\\\\[ -~])*\")");
        let one = format!("[ \t]{{0,2}};[ \t]{{0,2}}{token}([ \t]{{0,2}}=[ \t]{{0,2}}{value})?");
        proptest::string::string_regex(&format!("({one}){{1,3}}")).unwrap()
    }

    fn chunk() -> impl Strategy<Value = Chunk> {
        (
            prop::collection::vec(any::<u8>(), 1..300),
            any::<bool>(),
            0..3usize,
            prop::option::of(extension()),
        )
            .prop_map(|(data, uppercase, leading_zeros, extension)| Chunk {
                data,
                uppercase,
                leading_zeros,
                extension,
            })
    }

    fn body() -> impl Strategy<Value = Body> {
        (
            prop::collection::vec(chunk(), 0..6),
            1..4usize,
            prop::option::of(extension()),
            prop::collection::vec(
                "[A-Za-z0-9-]{1,12}:[ \t]?[ -~\t\u{80}-\u{ff}]{0,40}"
                    .prop_filter("a field allowed in trailers", |t| {
                        !t.to_ascii_lowercase().starts_with("host:")
                    }),
                0..4,
            ),
        )
            .prop_map(
                |(chunks, last_chunk_zeros, last_extension, trailers)| Body {
                    chunks,
                    last_chunk_zeros,
                    last_extension,
                    trailers,
                },
            )
    }

    fn cuts() -> impl Strategy<Value = Vec<Index>> {
        prop::collection::vec(any::<Index>(), 0..8)
    }

    /// Inputs likely to reach deep into the state machine before failing.
    fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
        let framing_bytes: Vec<u8> = b"0123456789abcdefABCDEFgx\r\n\r\n; \t=\"\0\x7f:\xff".to_vec();
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            prop::collection::vec(prop::sample::select(framing_bytes), 0..200),
            (
                body(),
                prop::collection::vec((any::<Index>(), any::<u8>()), 1..4)
            )
                .prop_map(|(body, edits)| {
                    let mut bytes = body.encode();
                    for (at, byte) in edits {
                        let at = at.index(bytes.len());
                        bytes[at] = byte;
                    }
                    bytes
                }),
        ]
    }

    proptest! {
        #[test]
        fn valid_body_ends_exactly(
            body in body(),
            next_message in prop::collection::vec(any::<u8>(), 0..64),
            cuts in cuts(),
        ) {
            let encoded = body.encode();
            let input = [&encoded[..], &next_message].concat();
            let mut scanner = ChunkedScanner::new();
            let mut consumed = 0;
            for piece in pieces(&input, &cuts) {
                let n = scanner.scan(piece).unwrap();
                consumed += n;
                prop_assert_eq!(scanner.is_done(), consumed == encoded.len());
                prop_assert!(n == piece.len() || scanner.is_done());
            }
            prop_assert_eq!(consumed, encoded.len());
            prop_assert!(scanner.is_done());
        }

        #[test]
        fn decoding_yields_the_data_and_ends_where_scanning_does(
            body in body(),
            next_message in prop::collection::vec(any::<u8>(), 0..64),
            cuts in cuts(),
        ) {
            let encoded = body.encode();
            let input = [&encoded[..], &next_message].concat();
            let mut decoder = ChunkedScanner::new();
            let (mut consumed, mut data) = (0, Vec::new());
            for piece in pieces(&input, &cuts) {
                let mut rest = piece;
                while !rest.is_empty() && !decoder.is_done() {
                    let (n, chunk) = decoder.decode(rest).unwrap();
                    prop_assert!(n > 0);
                    prop_assert!(rest[..n].ends_with(chunk));
                    data.extend_from_slice(chunk);
                    consumed += n;
                    rest = &rest[n..];
                }
            }
            prop_assert!(decoder.is_done());
            prop_assert_eq!(consumed, encoded.len());
            let expected: Vec<u8> = body.chunks.iter().flat_map(|c| c.data.clone()).collect();
            prop_assert_eq!(data, expected);
        }

        #[test]
        fn split_input_scans_like_whole(input in hostile_input(), cuts in cuts()) {
            prop_assert_eq!(scan_in_pieces(&input, &cuts), scan_whole(&input));
        }

        #[test]
        fn truncated_body_is_incomplete(body in body(), end in any::<Index>(), cuts in cuts()) {
            let encoded = body.encode();
            let truncated = &encoded[..end.index(encoded.len())];
            prop_assert_eq!(scan_in_pieces(truncated, &cuts), (Ok(truncated.len()), false));
        }
    }
}
