//! The fast path's request-head parser: `httparse` (the parser hyper uses) plus the rules that
//! make the fast path *decline* rather than judge. It never refuses a request itself: any head it
//! does not take exactly as hyper would (framing it does not cover, a limit reached, anything
//! ambiguous) is [`Parsed::Decline`]d, and hyper reads the same bytes and answers as it always
//! did. What it takes, hyper takes too, with the same head length and the same body length;
//! `fuzz/fuzz_targets/h1_framing.rs` and this module's tests check that agreement.
//!
//! Pure: no I/O, no state; imports nothing of the crate (the judgement stays in `hygiene` and
//! the pipeline, which see the head this builds).

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

/// Header fields per request; hyper's default (`h1_max_headers`), above which it answers 431.
pub const MAX_HEADERS: usize = 100;

/// The limits hyper's HTTP/1 server is built with (`server.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// hyper's `max_buf_size`: a head still incomplete at this many bytes is refused (431).
    pub max_buf: usize,
    /// `server.max_uri_bytes`: a longer target is declined (the pipeline or hyper answer 414).
    pub max_uri: usize,
}

/// What the parser made of the bytes at the start of the buffer.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per request, on the stack, never stored
pub enum Parsed {
    /// Not a whole head yet, and still under the limits: read more.
    Partial,
    /// Not for the fast path: hand the bytes to hyper. The reason is for logs and tests.
    Decline(&'static str),
    /// A head the fast path takes.
    Head(Head),
}

/// A request head the fast path takes.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head, its final CRLF CRLF included.
    pub len: usize,
    /// Method.
    pub method: Method,
    /// Origin-form target.
    pub uri: Uri,
    /// Header fields, in order (repeated names kept).
    pub headers: HeaderMap,
    /// Body bytes after the head (`Content-Length`, 0 without one).
    pub body_len: u64,
    /// Whether the request carried a `Content-Length` (forwarded as such, even when 0).
    pub has_content_length: bool,
    /// The client did not ask to close the connection after this exchange.
    pub keep_alive: bool,
}

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8], limits: Limits) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    // hyper skips empty lines before a request line; the fast path leaves that to it.
    if buf[0] == b'\r' || buf[0] == b'\n' {
        return Parsed::Decline("leading empty line");
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // hyper refuses (431) once its buffer holds this much without a whole head.
            return if buf.len() >= limits.max_buf {
                Parsed::Decline("head over the buffer limit")
            } else {
                Parsed::Partial
            };
        }
        Err(_) => return Parsed::Decline("httparse refused the head"),
    };
    // hyper reads up to `max_buf` bytes before it parses: a head that ends beyond it may be
    // refused there, depending on how the bytes arrived. Leave such heads to it.
    if len >= limits.max_buf {
        return Parsed::Decline("head over the buffer limit");
    }
    // Every line ends in CRLF: httparse (and so hyper) also takes a bare LF.
    let head = &buf[..len];
    if head
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
    {
        return Parsed::Decline("bare LF");
    }
    if req.version != Some(1) {
        return Parsed::Decline("not HTTP/1.1");
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Decline("incomplete request line");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Decline("method");
    };
    if method == Method::CONNECT {
        return Parsed::Decline("CONNECT");
    }
    if !target.starts_with('/') {
        return Parsed::Decline("not origin-form");
    }
    if target.len() > limits.max_uri {
        return Parsed::Decline("target over max_uri_bytes");
    }
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Decline("target");
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Decline("header name");
        };
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Parsed::Decline("header value");
        };
        match name.as_str() {
            "transfer-encoding" => return Parsed::Decline("Transfer-Encoding"),
            "upgrade" | "http2-settings" => return Parsed::Decline("upgrade"),
            "expect" => return Parsed::Decline("Expect"),
            "content-length" => {
                if content_length.is_some() {
                    return Parsed::Decline("several Content-Length");
                }
                match digits(h.value) {
                    Some(n) => content_length = Some(n),
                    None => return Parsed::Decline("Content-Length value"),
                }
            }
            "connection"
                if h.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")) =>
            {
                keep_alive = false;
            }
            _ => {}
        }
        headers.append(name, value);
    }
    Parsed::Head(Head {
        len,
        method,
        uri,
        headers,
        body_len: content_length.unwrap_or(0),
        has_content_length: content_length.is_some(),
        keep_alive,
    })
}

/// `1*DIGIT` as a u64 (no sign, no space, no list), well under hyper's largest length.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
