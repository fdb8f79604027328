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
    request_line(buf, method, path_and_query);
    for (name, value) in headers {
        field_line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    end_request_head(
        buf,
        method,
        headers.contains_key(header::CONTENT_LENGTH),
        body_len,
    );
}

/// `METHOD PATH HTTP/1.1` and its CRLF.
pub fn request_line(buf: &mut Vec<u8>, method: &Method, path_and_query: &str) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path_and_query.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
}

/// `name: value` and its CRLF.
pub fn field_line(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// The `content-length` a request head needs (see [`encode_request`]) and the blank line.
pub fn end_request_head(buf: &mut Vec<u8>, method: &Method, has_length: bool, body_len: usize) {
    let wants_length = body_len > 0
        || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        || method.as_str() == "QUERY";
    if wants_length && !has_length {
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
    /// Empty when the head was kept as [`RawFields`] instead.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection can carry another request after this response.
    pub keep_alive: bool,
    /// The header lines to write through unchanged, when they were asked for and the
    /// response allows it.
    pub raw: Option<RawFields>,
}

/// A response's header lines as the upstream wrote them (each checked by the parser, each
/// ending in CRLF), without the hop-by-hop and framing headers: what attache's HTTP/1.1
/// server writes to the client as they are, instead of building a header map from them
/// and encoding it again. Usually one slice of the received head, copied only when a
/// removed header sat between kept ones.
#[derive(Debug, Clone)]
pub struct RawFields {
    pub lines: Bytes,
    /// A `date` line is among them.
    pub has_date: bool,
    /// A `content-length` line is among them (kept only on responses without a body).
    pub has_length: bool,
}

/// Where one header's name and value lie within a response head.
pub type Span = (usize, usize, usize, usize);

/// What a response header means to the codec.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop, never forwarded: `keep-alive`, `proxy-connection`, `te`, `upgrade`.
    HopByHop,
    Date,
    Other,
}

fn field(name: &[u8]) -> Field {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        14 if is(b"content-length") => Field::ContentLength,
        17 if is(b"transfer-encoding") => Field::TransferEncoding,
        10 if is(b"connection") => Field::Connection,
        10 if is(b"keep-alive") => Field::HopByHop,
        16 if is(b"proxy-connection") => Field::HopByHop,
        2 if is(b"te") => Field::HopByHop,
        7 if is(b"upgrade") => Field::HopByHop,
        4 if is(b"date") => Field::Date,
        _ => Field::Other,
    }
}

/// Parses a response head from the front of `buf` and removes it from `buf`; `Ok(None)`
/// while the head is incomplete. Header values share the head's memory (no copies).
/// `spans` is scratch space, kept by the connection so that parsing allocates nothing and
/// initialises no fixed-size array (the parser's header slots are left uninitialised too).
/// With `want_raw`, a response below 400 whose `connection` header names no other header
/// keeps its header lines as [`RawFields`] and gets an empty header map; error responses
/// always get the map (retries read `retry-after`).
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Vec<Span>,
    want_raw: bool,
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
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut keep_alive = version == Version::HTTP_11;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    // Raw lines: kept while `connection` names nothing else and the status allows it.
    let mut lines = (want_raw && code < 400).then(Lines::default);
    let mut has_date = false;
    for &(ns, ne, vs, ve) in spans.iter() {
        let value = &head[vs..ve];
        let kind = field(&head[ns..ne]);
        match kind {
            Field::ContentLength => {
                let n = parse_content_length(value)?;
                if length.is_some_and(|l| l != n) {
                    return err("conflicting content-length headers");
                }
                length = Some(n);
            }
            Field::TransferEncoding => {
                // Only the last coding decides; anything but chunked last reads until close.
                let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            Field::Connection => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive |= version == Version::HTTP_10;
                    } else if !token.is_empty() {
                        // It names a header to remove: the header map's path does that.
                        lines = None;
                    }
                }
            }
            Field::Date => has_date = true,
            Field::HopByHop | Field::Other => {}
        }
        if let Some(l) = lines.as_mut() {
            let keep = match kind {
                Field::Other | Field::Date => true,
                Field::ContentLength => bodiless,
                _ => false,
            };
            if keep {
                l.keep(&head, ns, ve);
            }
        }
    }
    let framing = if bodiless {
        Framing::Empty
    } else if let Some(chunked) = chunked {
        // RFC 9112 §6.3: transfer-encoding overrides content-length, and such a message
        // may be an attempt at request smuggling: never reuse its connection.
        if length.is_some() {
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
    let (headers, raw) = match lines {
        // A bodiless answer with both transfer-encoding and content-length keeps neither.
        Some(l) if !(bodiless && chunked.is_some() && length.is_some()) => (
            HeaderMap::new(),
            Some(RawFields {
                lines: l.finish(&head),
                has_date,
                has_length: bodiless && length.is_some(),
            }),
        ),
        _ => {
            let mut headers = HeaderMap::with_capacity(spans.len());
            for &(ns, ne, vs, ve) in spans.iter() {
                let name = HeaderName::from_bytes(&head[ns..ne])
                    .map_err(|_| WireError("invalid response header name".into()))?;
                let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                    .map_err(|_| WireError(format!("invalid value of response header {name}")))?;
                headers.append(name, value);
            }
            if chunked.is_some() && length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
            }
            (headers, None)
        }
    };
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
        raw,
    }))
}

/// Header lines kept for [`RawFields`]: one range of the head while they are contiguous,
/// a copy once a removed line broke the run.
#[derive(Default)]
struct Lines {
    /// The contiguous run so far: `start..end` of the head (end after the CRLF).
    run: Option<(usize, usize)>,
    copy: Option<Vec<u8>>,
}

impl Lines {
    /// Keeps the line whose name starts at `ns` and whose value ends at `ve`.
    fn keep(&mut self, head: &Bytes, ns: usize, ve: usize) {
        // The parser trims a value's trailing whitespace: the line ends at the next CRLF.
        let eol = head[ve..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |i| ve + i + 1);
        // A line that ends in a bare LF (the parser accepts it) is written with CRLF.
        let crlf = head[..eol].ends_with(b"\r\n");
        if self.copy.is_none() {
            match self.run {
                None if crlf => return self.run = Some((ns, eol)),
                Some((start, end)) if crlf && end == ns => return self.run = Some((start, eol)),
                _ => {
                    let mut copy = Vec::with_capacity(head.len());
                    if let Some((start, end)) = self.run {
                        copy.extend_from_slice(&head[start..end]);
                    }
                    self.copy = Some(copy);
                }
            }
        }
        if let Some(copy) = self.copy.as_mut() {
            copy.extend_from_slice(&head[ns..ve]);
            copy.extend_from_slice(b"\r\n");
        }
    }

    fn finish(self, head: &Bytes) -> Bytes {
        match (self.copy, self.run) {
            (Some(copy), _) => Bytes::from(copy),
            (None, Some((start, end))) => head.slice(start..end),
            (None, None) => Bytes::new(),
        }
    }
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
        parse_response(&mut buf, &method, &mut Vec::new(), false)
    }

    fn parse_raw(text: &str, method: Method) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response(&mut buf, &method, &mut Vec::new(), true)
            .unwrap()
            .unwrap()
    }

    fn lines(h: &Head) -> &[u8] {
        &h.raw.as_ref().expect("raw lines").lines
    }

    #[test]
    fn raw_lines_are_the_upstreams_minus_framing_and_hop_by_hop() {
        // nginx's head: the kept lines are one slice of it.
        let h = parse_raw(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 16:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            Method::GET,
        );
        assert_eq!(
            lines(&h),
            b"Server: nginx\r\nDate: Fri, 27 Nov 2026 16:00:00 GMT\r\nContent-Type: text/plain\r\n"
        );
        let raw = h.raw.as_ref().unwrap();
        assert!(raw.has_date && !raw.has_length);
        assert!(h.headers.is_empty());
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));

        // A removed line between kept ones, a bare LF, trailing blanks and every hop-by-hop
        // header: the kept lines are copied, each ending in CRLF.
        let h = parse_raw(
            "HTTP/1.1 200 OK\r\nA: 1\r\nTransfer-Encoding: chunked\r\nB: 2  \nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nC: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(lines(&h), b"A: 1\r\nB: 2\r\nC: 3\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.raw.as_ref().unwrap().has_date);

        // No header at all.
        let h = parse_raw("HTTP/1.1 204 No Content\r\n\r\n", Method::GET);
        assert_eq!(lines(&h), b"");
    }

    #[test]
    fn a_bodiless_raw_answer_keeps_its_content_length() {
        let h = parse_raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 42\r\nETag: x\r\n\r\n",
            Method::HEAD,
        );
        assert_eq!(lines(&h), b"Content-Length: 42\r\nETag: x\r\n");
        assert!(h.raw.as_ref().unwrap().has_length);
        assert_eq!(h.framing, Framing::Empty);
    }

    #[test]
    fn errors_and_connection_lists_get_a_header_map() {
        for (text, why) in [
            (
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
                "a retry may read retry-after",
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nContent-Length: 0\r\n\r\n",
                "connection names a header to remove",
            ),
        ] {
            let h = parse_raw(text, Method::GET);
            assert!(h.raw.is_none(), "{why}");
            assert!(!h.headers.is_empty(), "{why}");
        }
    }

    #[test]
    fn raw_and_header_map_parses_frame_alike() {
        let heads = [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
        ];
        for text in heads {
            for method in [Method::GET, Method::HEAD] {
                let a = parse(text, method.clone()).unwrap().unwrap();
                let b = parse_raw(text, method.clone());
                assert_eq!(
                    (a.status, a.version, a.framing, a.keep_alive),
                    (b.status, b.version, b.framing, b.keep_alive),
                    "{text:?} {method}"
                );
                assert!(a.raw.is_none(), "{text:?}");
                // A bodiless answer with both framings is the one that keeps a header map.
                let both = text.contains("chunked\r\nContent-Length");
                assert_eq!(
                    b.raw.is_some(),
                    !(both && method == Method::HEAD),
                    "{text:?}"
                );
            }
        }
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
                let _ = parse_response(&mut buf, &Method::GET, &mut Vec::new(), true);
                let _ = decode_all(&data, 13);
            }
        }
    }
}
