//! The little HTTP every demo service shares: the handler type a [`Switch`](super::faults::Switch)
//! serves, response builders, and a client with a deadline (the feed's calls to attache and the
//! demo's readiness probes).

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A demo service: a request with its body read whole in, a response out.
pub type Handler = std::sync::Arc<
    dyn Fn(Request<Bytes>) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync,
>;

/// The largest answer a [`Client`] reads.
const MAX_ANSWER: usize = 8 << 20;

/// A response with a status, a content type and a body; never cached (the demo's state changes
/// under the viewer's eyes).
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// An error in the house shape: `{"error": code, "detail": ...}`.
pub fn error(
    status: StatusCode,
    code: &str,
    detail: impl std::fmt::Display,
) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": code, "detail": detail.to_string() }),
    )
}

/// An HTML page.
pub fn html(status: StatusCode, page: String) -> Response<Full<Bytes>> {
    respond(status, "text/html; charset=utf-8", page)
}

/// Escapes text for HTML and XML (element content and quoted attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment, percent-encoded so that it stays one segment.
pub fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A path segment as received, percent-decoded.
pub fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// Whether a name is a plausible user name: 1 to 64 ASCII letters, digits, `_` or `-`.
pub fn is_name(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An answer read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The whole body (at most 8 MiB).
    pub body: Bytes,
}

impl Reply {
    /// attache's `x-attache-reason`, when attache answered instead of the service.
    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get(crate::error::REASON_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    /// The body as JSON, or `Null`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Why a [`Client`] call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer could not be read: {0}")]
    Body(String),
}

/// A pooled HTTP/1.1 client whose every call ends within `timeout`.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Client {
    /// A client whose calls give up after `timeout` (connect, answer and body together).
    pub fn new(timeout: Duration) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            // Below attache's idle keep-alive limit, so that a pooled connection is not reused
            // just as attache closes it.
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Client { http, timeout }
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Reply, ClientError> {
        self.send(Method::GET, url, None).await
    }

    /// Sends a request with an optional `(content type, body)`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Reply, ClientError> {
        let mut req = Request::builder().method(method).uri(url);
        let body = match body {
            Some((content_type, bytes)) => {
                req = req.header(http::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body))?;
        let call = async {
            let resp = self.http.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Body(e.to_string()))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_checks_names() {
        assert_eq!(
            escape(r#"<b a="1">Tom & 'Jerry'</b>"#),
            "&lt;b a=&quot;1&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
        assert!(is_name("priya"));
        assert!(is_name("a_b-1"));
        assert!(!is_name(""));
        assert!(!is_name("../x"));
        assert!(!is_name(&"x".repeat(65)));
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(decode("a%2Fb"), "a/b");
    }
}
