//! Errors that attache answers itself, and the one place they become HTTP responses.
//!
//! Every error knows its *side* (who is at fault: the client, the upstream, or attache) and
//! whether a retry may help; [`ProxyError::response`] maps it to a status, the
//! `x-attache-reason` header and a small JSON body `{"error": reason, "detail": ...}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The header that names why attache answered instead of the upstream.
pub const REASON_HEADER: &str = "x-attache-reason";

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request itself is wrong (4xx).
    Downstream,
    /// The upstream failed or could not be reached (5xx).
    Upstream,
    /// attache chose to refuse (limits, open breakers, residency).
    Internal,
}

/// An error attache answers itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("cluster `{cluster}` has no healthy endpoint")]
    NoHealthyEndpoint { cluster: String },
    #[error("cannot connect to {endpoint}: {detail}")]
    ConnectFailed { endpoint: String, detail: String },
    #[error("upstream {endpoint} closed the connection before answering: {detail}")]
    UpstreamReset { endpoint: String, detail: String },
    #[error("upstream {endpoint} did not answer within {timeout_ms} ms")]
    Timeout { endpoint: String, timeout_ms: u64 },
    #[error("upstream {endpoint} sent an invalid response: {detail}")]
    UpstreamProtocol { endpoint: String, detail: String },
    #[error("cluster `{cluster}` is at its concurrency limit")]
    Overloaded { cluster: String },
    #[error("the circuit breaker of cluster `{cluster}` is open")]
    CircuitOpen { cluster: String },
    #[error("rate limited: retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("the request has no shard key ({from})")]
    ShardKeyMissing { from: String },
    #[error("the shard key is unusable: {0}")]
    ShardKeyInvalid(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("the directory does not know this key")]
    ShardKeyUnknown,
    #[error("the directory is unavailable: {0}")]
    DirectoryUnavailable(String),
    #[error("no shard may hold data of region {region}")]
    ResidencyDenied { region: String },
    #[error("no shard allowed for this key can serve it (allowed: {allowed}): {detail}")]
    ResidencyUnavailable { allowed: String, detail: String },
    #[error("shard {shard} cannot serve: {detail}")]
    ShardUnavailable { shard: String, detail: String },
    #[error("the directory named shard `{0}`, which this shard set does not have")]
    DirectoryBadShard(String),
    #[error("{count} keys in one batch; at most {max}")]
    TooManyKeys { count: usize, max: usize },
    #[error("{what} is larger than {max} bytes")]
    TooLarge { what: &'static str, max: usize },
    #[error("every shard of the batch failed: {0}")]
    AllShardsFailed(String),
}

impl ProxyError {
    /// The short kebab-case reason carried by `x-attache-reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no-route",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::NoHealthyEndpoint { .. } => "no-healthy-endpoint",
            ProxyError::ConnectFailed { .. } => "upstream-connect-failed",
            ProxyError::UpstreamReset { .. } => "upstream-reset",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::UpstreamProtocol { .. } => "upstream-protocol-error",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::ShardKeyMissing { .. } => "shard-key-missing",
            ProxyError::ShardKeyInvalid(_) => "shard-key-invalid",
            ProxyError::Unauthorized(_) => "jwt-invalid",
            ProxyError::ShardKeyUnknown => "shard-key-unknown",
            ProxyError::DirectoryUnavailable(_) => "directory-unavailable",
            ProxyError::ResidencyDenied { .. } => "residency-denied",
            ProxyError::ResidencyUnavailable { .. } => "residency-unavailable",
            ProxyError::ShardUnavailable { .. } => "shard-unavailable",
            ProxyError::DirectoryBadShard(_) => "directory-bad-shard",
            ProxyError::TooManyKeys { .. } => "too-many-keys",
            ProxyError::TooLarge { .. } => "too-large",
            ProxyError::AllShardsFailed(_) => "all-shards-unavailable",
        }
    }

    /// The HTTP status for the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } | ProxyError::ShardKeyUnknown => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_)
            | ProxyError::ShardKeyMissing { .. }
            | ProxyError::ShardKeyInvalid(_)
            | ProxyError::TooManyKeys { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::ResidencyDenied { .. } => StatusCode::FORBIDDEN,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoHealthyEndpoint { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::DirectoryUnavailable(_)
            | ProxyError::ResidencyUnavailable { .. }
            | ProxyError::ShardUnavailable { .. }
            | ProxyError::AllShardsFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::DirectoryBadShard(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectFailed { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Who is at fault.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::ShardKeyMissing { .. }
            | ProxyError::ShardKeyInvalid(_)
            | ProxyError::Unauthorized(_)
            | ProxyError::ShardKeyUnknown
            | ProxyError::TooManyKeys { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::TooLarge { .. } => Side::Downstream,
            ProxyError::NoHealthyEndpoint { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::ResidencyDenied { .. }
            | ProxyError::ResidencyUnavailable { .. }
            | ProxyError::ShardUnavailable { .. }
            | ProxyError::AllShardsFailed(_) => Side::Internal,
            _ => Side::Upstream,
        }
    }

    /// Whether another attempt (on another endpoint) may succeed. A timeout may have reached
    /// the upstream, so it is retryable only for idempotent requests (the retry policy decides).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::ConnectFailed { .. }
                | ProxyError::UpstreamReset { .. }
                | ProxyError::Timeout { .. }
        )
    }

    /// The response attache sends for this error.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut resp = error_response(self.status(), self.reason(), &self.to_string());
        if let ProxyError::RateLimited { retry_after_ms } = self {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }

    /// Whether the destination could not serve (what a route's fallback answers for).
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            ProxyError::NoHealthyEndpoint { .. }
                | ProxyError::ConnectFailed { .. }
                | ProxyError::CircuitOpen { .. }
                | ProxyError::Overloaded { .. }
                | ProxyError::Timeout { .. }
                | ProxyError::UpstreamReset { .. }
                | ProxyError::ResidencyUnavailable { .. }
                | ProxyError::ShardUnavailable { .. }
        )
    }
}

/// Builds an attache-answered error response: status, reason header and JSON body.
pub fn error_response(
    status: StatusCode,
    reason: &'static str,
    detail: &str,
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": reason, "detail": detail }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl ProxyError {
    /// The error for a request that could not be given a shard.
    pub fn from_refusal(r: crate::shard::Refusal, key_source: &str) -> ProxyError {
        use crate::shard::{KeyError, Refusal};
        match r {
            Refusal::Key(KeyError::Missing) => ProxyError::ShardKeyMissing {
                from: key_source.to_owned(),
            },
            Refusal::Key(KeyError::Invalid(e)) => ProxyError::ShardKeyInvalid(e),
            Refusal::Key(KeyError::Unauthorized(e)) => ProxyError::Unauthorized(e),
            Refusal::UnknownKey => ProxyError::ShardKeyUnknown,
            Refusal::DirectoryUnavailable(e) => ProxyError::DirectoryUnavailable(e),
            Refusal::NoRule { region } => ProxyError::ResidencyDenied { region },
            Refusal::BadShard { name } => ProxyError::DirectoryBadShard(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_errors_to_status_and_reason() {
        let cases = [
            (
                ProxyError::NoRoute {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                404,
                "no-route",
            ),
            (
                ProxyError::ConnectFailed {
                    endpoint: "e".into(),
                    detail: "refused".into(),
                },
                502,
                "upstream-connect-failed",
            ),
            (
                ProxyError::Timeout {
                    endpoint: "e".into(),
                    timeout_ms: 5,
                },
                504,
                "timeout",
            ),
            (
                ProxyError::NoHealthyEndpoint {
                    cluster: "c".into(),
                },
                503,
                "no-healthy-endpoint",
            ),
        ];
        for (err, status, reason) in cases {
            let resp = err.response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[REASON_HEADER], reason);
        }
    }
}
