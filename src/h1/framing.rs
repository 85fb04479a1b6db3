//! Response framing on the fast path: the upstream's response head (`httparse`), how its body
//! ends (RFC 9112 §6.3), and a strict incremental chunked decoder whose output is re-encoded for
//! the client. Bodies are never buffered whole: the decoder works on whatever bytes have arrived.
//!
//! Pure: no I/O; imports nothing of the crate.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Header fields an upstream response may carry (hyper's client default).
const MAX_HEADERS: usize = 100;
/// Largest chunk-size line (with extensions) or trailer section accepted from an upstream.
const MAX_LINE: usize = 16 * 1024;

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed upstream response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head.
    pub len: usize,
    /// Status.
    pub status: StatusCode,
    /// Header fields.
    pub headers: HeaderMap,
    /// How the body ends.
    pub framing: BodyFraming,
    /// The connection may carry another exchange once this body is read (HTTP/1.1, no
    /// `Connection: close`, framed body).
    pub reusable: bool,
}

/// Why an upstream response could not be used.
#[derive(Debug, PartialEq, Eq)]
pub struct BadResponse(pub &'static str);

/// Parses the response head at the start of `buf`; `Ok(None)`: incomplete.
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, BadResponse> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse("unparsable response head")),
    };
    let code = resp.code.ok_or(BadResponse("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| BadResponse("status"))?;
    let http11 = resp.version == Some(1);
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None;
    let mut close = !http11;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| BadResponse("name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| BadResponse("value"))?;
        match name.as_str() {
            "content-length" => {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(BadResponse("Content-Length"))?;
                if length.is_some_and(|m| m != n) {
                    return Err(BadResponse("several Content-Length"));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                // The last coding decides; later lines append to the list.
                let last = h
                    .value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .rfind(|c| !c.is_empty());
                te = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
            }
            "connection" => {
                for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        // An HTTP/1.0 keep-alive is not trusted: closed after the body.
                    }
                }
            }
            _ => {}
        }
        headers.append(name, value);
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        BodyFraming::Empty
    } else if let Some(chunked) = te {
        if chunked {
            BodyFraming::Chunked
        } else {
            BodyFraming::Close
        }
    } else if let Some(n) = length {
        BodyFraming::Length(n)
    } else {
        BodyFraming::Close
    };
    if te.is_some() && length.is_some() {
        // Both: Transfer-Encoding wins, and the connection is not reused.
        close = true;
        headers.remove(http::header::CONTENT_LENGTH);
    }
    Ok(Some(ResponseHead {
        len,
        status,
        headers,
        framing,
        reusable: !close && framing != BodyFraming::Close,
    }))
}

/// A strict incremental chunked decoder: chunk-size lines of hex digits (optionally followed by
/// whitespace and `;` extensions, which are dropped), CRLF everywhere, trailers read and dropped.
#[derive(Debug, Default)]
pub struct Chunked {
    state: State,
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size (`size` so far, digits seen).
    #[default]
    SizeStart,
    Size(u64),
    /// After the size: whitespace, or an extension up to CR.
    SizeRest(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line.
    TrailerLineStart,
    /// Inside a trailer line.
    TrailerLine,
    TrailerLf,
    /// The final CRLF's LF.
    EndLf,
    Done,
}

/// What [`Chunked::decode`] found in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// `n` input bytes are chunk data (starting at the input's beginning): pass them on.
    Data(usize),
    /// `n` input bytes were framing, consumed.
    Framing(usize),
    /// The body ended after `n` more input bytes (the last chunk and trailers consumed).
    End(usize),
}

impl Chunked {
    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes a prefix of `input`. Call again with the rest; an empty input needs more bytes.
    pub fn decode(&mut self, input: &[u8]) -> Result<Piece, BadResponse> {
        if let State::Data(left) = self.state {
            let n = (left.min(input.len() as u64)) as usize;
            self.state = if left == n as u64 {
                State::DataCr
            } else {
                State::Data(left - n as u64)
            };
            return Ok(Piece::Data(n));
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(BadResponse("chunk line too long"));
            }
            self.state = match (self.state, b) {
                (State::SizeStart, _) => match hex(b) {
                    Some(d) => State::Size(d),
                    None => return Err(BadResponse("chunk size")),
                },
                (State::Size(n), _) if hex(b).is_some() => {
                    let d = hex(b).unwrap_or(0);
                    State::Size(
                        n.checked_mul(16)
                            .and_then(|v| v.checked_add(d))
                            .filter(|v| *v < u64::MAX / 2)
                            .ok_or(BadResponse("chunk size overflow"))?,
                    )
                }
                (State::Size(n) | State::SizeRest(n), b'\r') => State::SizeLf(n),
                (State::Size(n), b' ' | b'\t' | b';') => State::SizeRest(n),
                (State::Size(_), _) => return Err(BadResponse("chunk size")),
                (State::SizeRest(_), b'\n') => return Err(BadResponse("bare LF in chunk line")),
                (State::SizeRest(n), _) => State::SizeRest(n),
                (State::SizeLf(n), b'\n') => {
                    self.line = 0;
                    if n == 0 {
                        State::TrailerLineStart
                    } else {
                        self.state = State::Data(n);
                        return Ok(Piece::Framing(i));
                    }
                }
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => {
                    self.line = 0;
                    State::SizeStart
                }
                (State::TrailerLineStart, b'\r') => State::EndLf,
                (State::TrailerLineStart | State::TrailerLine, b'\n') => {
                    return Err(BadResponse("bare LF in trailer"));
                }
                (State::TrailerLine, b'\r') => State::TrailerLf,
                (State::TrailerLineStart | State::TrailerLine, _) => State::TrailerLine,
                (State::TrailerLf, b'\n') => State::TrailerLineStart,
                (State::EndLf, b'\n') => {
                    self.state = State::Done;
                    return Ok(Piece::End(i));
                }
                _ => return Err(BadResponse("chunk framing")),
            };
        }
        Ok(Piece::Framing(i))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(mut input: &[u8], step: usize) -> Result<(Vec<u8>, usize), BadResponse> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let total = input.len();
        while !c.done() {
            if input.is_empty() {
                return Err(BadResponse("eof"));
            }
            let window = &input[..step.min(input.len())];
            match c.decode(window)? {
                Piece::Data(n) => {
                    out.extend_from_slice(&window[..n]);
                    input = &input[n..];
                }
                Piece::Framing(n) | Piece::End(n) => input = &input[n..],
            }
        }
        Ok((out, total - input.len()))
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (out, used) = decode_all(body, step).unwrap();
            assert_eq!(out, b"hello world");
            assert_eq!(&body[used..], b"NEXT", "step {step}");
        }
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b"5;a\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffffff\r\n",
            b"0\r\nx\n\r\n",
        ] {
            assert!(
                decode_all(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let p = |s: &str, head: bool| parse_response(s.as_bytes(), head).unwrap().unwrap();
        let r = p("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert_eq!(r.framing, BodyFraming::Length(5));
        assert!(r.reusable);
        let r = p(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, BodyFraming::Chunked);
        let r = p("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(r.framing, BodyFraming::Close);
        assert!(!r.reusable);
        let r = p("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(r.framing, BodyFraming::Empty);
        let r = p("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.framing, BodyFraming::Empty);
        let r = p(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!r.reusable);
        let r = p("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!r.reusable);
        let r = p(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, BodyFraming::Chunked);
        assert!(!r.reusable && !r.headers.contains_key("content-length"));
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1", false)
                .unwrap()
                .is_none()
        );
    }
}
