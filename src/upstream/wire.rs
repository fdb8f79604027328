//! The HTTP/1.1 wire format of upstream requests attache sends itself: request heads out,
//! response heads and body framing (content-length, chunked, until close) in.
//!
//! Written here rather than taken from hyper because hyper's client codec only runs behind
//! its dispatcher and channels (about a third of attache's instructions per request), and
//! no other maintained crate encodes and frames HTTP/1.1 messages without owning the
//! connection. `httparse` (hyper's own parser) does the head parsing; this module adds what
//! RFC 9112 asks of a client around it: framing, keep-alive, and the limits.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Headers in one response head (hyper's default limit too).
pub const MAX_HEADERS: usize = 100;
/// Bytes in one response head or trailer block (hyper's default read buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Bytes in one chunk-size line (with extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// What went wrong on the wire.
#[derive(Debug)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn err<T>(what: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(what.into()))
}

/// Appends a request head to `buf`. `body_len` is the length of the body that follows in
/// full; a `content-length` is added when the headers carry none and the method is one
/// that has a body (an upstream may answer 411 to a POST without one).
pub fn encode_request(
    buf: &mut Vec<u8>,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body_len: usize,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path_and_query.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    let wants_length = body_len > 0
        || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        || method.as_str() == "QUERY";
    if wants_length && !headers.contains_key(header::CONTENT_LENGTH) {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(buf, "content-length: {body_len}\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection can carry another request after this response.
    pub keep_alive: bool,
}

/// Where one header's name and value lie within a response head.
pub type Span = (usize, usize, usize, usize);

/// Parses a response head from the front of `buf` and removes it from `buf`; `Ok(None)`
/// while the head is incomplete. Header values share the head's memory (no copies).
/// `spans` is scratch space, kept by the connection so that parsing allocates nothing and
/// initialises no fixed-size array (the parser's header slots are left uninitialised too).
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, WireError> {
    // Offsets of each header's name and value within the head, so that values can be
    // sliced out of the frozen head once the parser's borrow of `buf` has ended.
    spans.clear();
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let base = buf.as_ptr() as usize;
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut raw);
    let (len, code, minor) = match parsed {
        Ok(httparse::Status::Complete(len)) => {
            for h in res.headers.iter() {
                let name = h.name.as_ptr() as usize - base;
                let value = h.value.as_ptr() as usize - base;
                spans.push((name, name + h.name.len(), value, value + h.value.len()));
            }
            (len, res.code.unwrap_or(0), res.version.unwrap_or(1))
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return err(format!("response head larger than {MAX_HEAD_BYTES} bytes"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return err(format!("more than {MAX_HEADERS} response headers"))
        }
        Err(e) => return err(format!("invalid response head: {e}")),
    };
    let head = buf.split_to(len).freeze();
    let status =
        StatusCode::from_u16(code).map_err(|_| WireError(format!("invalid status code {code}")))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for &(ns, ne, vs, ve) in spans.iter() {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| WireError("invalid response header name".into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| WireError(format!("invalid value of response header {name}")))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_content_length(value.as_bytes())?;
            if length.is_some_and(|l| l != n) {
                return err("conflicting content-length headers");
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Only the last coding decides; anything but chunked last reads until close.
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if let Some(chunked) = chunked {
        // RFC 9112 §6.3: transfer-encoding overrides content-length, and such a message
        // may be an attempt at request smuggling: never reuse its connection.
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked && version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

fn parse_content_length(v: &[u8]) -> Result<u64, WireError> {
    // A list of equal values ("42, 42") is allowed (RFC 9110 §8.6).
    let mut value = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return err("invalid content-length");
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if value.is_some_and(|v| v != n) {
            return err("conflicting content-length values");
        }
        value = Some(n);
    }
    value.ok_or_else(|| WireError("invalid content-length".into()))
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailers or the final CRLF.
    Trailers,
    /// The body has ended.
    Done,
}

/// What the chunked decoder made of the buffered bytes.
#[derive(Debug)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended, without trailers.
    End,
    /// More bytes are needed.
    NeedMore,
}

impl Chunked {
    /// Decodes from the front of `buf`, consuming what it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return err("chunk-size line too long");
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let line = &buf[..eol];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let digits = line
                        .iter()
                        .position(|&b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    let rest = line[digits..].trim_ascii();
                    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
                        return err("invalid chunk size");
                    }
                    let size = line[..digits].iter().fold(0u64, |n, &d| {
                        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
                    });
                    let _ = buf.split_to(eol + 1);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    *self = if left == n as u64 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n as u64)
                    };
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return err("missing CRLF after chunk data");
                    }
                    let _ = buf.split_to(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        let _ = buf.split_to(2);
                        *self = Chunked::Done;
                        return Ok(Decoded::End);
                    }
                    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut raw) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) else {
                                    return err("invalid trailer field");
                                };
                                trailers.append(name, value);
                            }
                            let _ = buf.split_to(len);
                            *self = Chunked::Done;
                            return Ok(Decoded::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_HEAD_BYTES {
                                return err("trailers too large");
                            }
                            return Ok(Decoded::NeedMore);
                        }
                        Err(e) => return err(format!("invalid trailers: {e}")),
                    }
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, method: Method) -> Result<Option<Head>, WireError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response(&mut buf, &method, &mut Vec::new())
    }

    #[test]
    fn request_heads_carry_headers_and_a_length_where_needed() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        let mut buf = Vec::new();
        encode_request(&mut buf, &Method::GET, "/x?y=1", &h, 0);
        assert_eq!(buf, b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\n\r\n");
        buf.clear();
        encode_request(&mut buf, &Method::POST, "/", &h, 0);
        assert_eq!(
            buf,
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n"
        );
        buf.clear();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        encode_request(&mut buf, &Method::PUT, "/", &h, 5);
        assert_eq!(
            buf,
            b"PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn response_heads_frame_their_bodies() {
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx: y\r\n\r\nbody",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (StatusCode::OK, Framing::Length(12), true)
        );
        assert_eq!(h.headers["x"], "y");
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.headers.contains_key("content-length"));
        let h = parse("HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let h = parse(
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let h = parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse(
            "HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        let h = parse(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_response_heads_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
        ] {
            assert!(parse(bad, Method::GET).is_err(), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), Method::GET).is_err());
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Length(4));
    }

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, Option<HeaderMap>), WireError> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match state.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Trailers(t) => return Ok((out, Some(t))),
                Decoded::End => return Ok((out, None)),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return err("eof");
                    }
                    let n = split.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let input = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        for split in 1..input.len() {
            let (body, trailers) = decode_all(input, split).unwrap();
            assert_eq!(body, b"hello world");
            assert!(trailers.is_none());
        }
        let input = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        for split in 1..input.len() {
            let (body, trailers) = decode_all(input, split).unwrap();
            assert_eq!(body, b"abc");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(decode_all(bad, 64).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn chunked(chunks: &[Vec<u8>], ext: bool) -> Vec<u8> {
            let mut out = Vec::new();
            for c in chunks {
                out.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                if ext {
                    out.extend_from_slice(b";name=value");
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }

        proptest! {
            #[test]
            fn chunked_bodies_round_trip_whatever_the_chunks_and_reads(
                chunks in proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 1..300), 0..8),
                ext in any::<bool>(),
                split in 1usize..97,
            ) {
                let input = chunked(&chunks, ext);
                let (body, trailers) = decode_all(&input, split).unwrap();
                prop_assert_eq!(body, chunks.concat());
                prop_assert!(trailers.is_none());
            }

            #[test]
            fn arbitrary_bytes_are_refused_or_parsed_never_a_panic(
                data in proptest::collection::vec(any::<u8>(), 0..600),
                prefix in any::<bool>(),
            ) {
                let mut text = if prefix { b"HTTP/1.1 200 OK\r\n".to_vec() } else { Vec::new() };
                text.extend_from_slice(&data);
                let mut buf = BytesMut::from(&text[..]);
                let _ = parse_response(&mut buf, &Method::GET, &mut Vec::new());
                let _ = decode_all(&data, 13);
            }
        }
    }
}
