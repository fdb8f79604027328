//! Route selection: a pure function of the request head and the listener's routes.
//!
//! The proxy calls [`select`] once per request; `attache explain` calls [`check`] on every
//! route to say why each earlier one did not match. Neither allocates on the common path.

pub(crate) mod fields;
mod template;

use std::borrow::Cow;

use http::Method;

use crate::config::{HashOn, HostMatch, PathMatch, Route, RouteMatch, ValueMatch, ValueRule};
pub use fields::{as_text, eq_name, Fields, HeadLines, Span};
pub use template::{Captures, Template, MAX_CAPTURES};

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The request's authority, if its target had one (h2 `:authority`, absolute form).
    pub authority: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: Fields<'a>,
}

impl<'a> RequestHead<'a> {
    /// Views a request's head.
    pub fn new(method: &'a Method, uri: &'a http::Uri, headers: impl Into<Fields<'a>>) -> Self {
        RequestHead {
            method,
            authority: uri.host(),
            path: uri.path(),
            query: uri.query(),
            headers: headers.into(),
        }
    }

    /// Host without port, as sent (the URI's, else the `Host` header). Looked up only by a
    /// route that matches on it.
    pub fn host(&self) -> Option<&'a str> {
        self.authority
            .or_else(|| self.headers.text(&http::header::HOST))
            .map(strip_port)
    }

    /// A query parameter's first value, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<Cow<'a, str>> {
        query_param(self.query?, name)
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        cookie(self.headers, name)
    }

    /// A header's value, if it is text.
    pub fn header(&self, name: &http::HeaderName) -> Option<&'a str> {
        self.headers.text(name)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: `[::1]:80`.
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return Some(decode_component(v));
        }
    }
    None
}

/// Percent-decodes a query value without allocating when there is nothing to decode.
pub fn decode_component(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let plus = v.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// A cookie's value from the `Cookie` headers.
pub fn cookie<'a>(headers: Fields<'a>, name: &str) -> Option<&'a str> {
    headers
        .get_all(&http::header::COOKIE)
        .filter_map(as_text)
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// The value a request carries for a key source: a header, a query parameter, a cookie, or a
/// capture of the route's path template. Shared by consistent hashing, keyed rate limits and
/// `attache explain`.
pub fn key_value<'a>(
    on: &HashOn,
    head: &RequestHead<'a>,
    captures: &Captures,
    route: &Route,
) -> Option<Cow<'a, str>> {
    match on {
        HashOn::Header(h) => head.header(h).map(Cow::Borrowed),
        HashOn::Query(q) => head.query_param(q),
        HashOn::Cookie(c) => head.cookie(c).map(Cow::Borrowed),
        HashOn::Capture(name) => match &route.matcher.path {
            Some(PathMatch::Template(t)) => t
                .name_index(name)
                .and_then(|i| captures.get(i, head.path))
                .map(Cow::Borrowed),
            _ => None,
        },
    }
}

/// Which route a request takes, and what its path template captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteDecision {
    pub route: usize,
    pub captures: Captures,
}

/// Why a route did not match: the first condition that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Host,
    Path,
    Method,
    /// The index of the header condition that failed.
    Header(usize),
    /// The index of the query condition that failed.
    Query(usize),
}

impl Mismatch {
    /// Says what did not match, in words, for `attache explain`.
    pub fn describe(&self, m: &RouteMatch) -> String {
        match self {
            Mismatch::Host => match &m.host {
                Some(HostMatch::Exact(h)) => format!("host is not {h}"),
                Some(HostMatch::Suffix(s)) => format!("host is not *{s}"),
                None => "host".into(),
            },
            Mismatch::Path => format!(
                "path does not match {}",
                m.path.as_ref().map(path_text).unwrap_or_default()
            ),
            Mismatch::Method => format!(
                "method is not one of {}",
                m.methods
                    .iter()
                    .map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Mismatch::Header(i) => format!("header condition on `{}` fails", m.headers[*i].name),
            Mismatch::Query(i) => format!("query condition on `{}` fails", m.query[*i].name),
        }
    }
}

fn path_text(p: &PathMatch) -> String {
    match p {
        PathMatch::Exact(e) => format!("exact {e}"),
        PathMatch::Prefix(e) => format!("prefix {e}"),
        PathMatch::Regex(r) => format!("regex {}", r.as_str()),
        PathMatch::Template(t) => format!("template {}", t.source()),
    }
}

/// The first route whose conditions all hold.
pub fn select(routes: &[Route], head: &RequestHead<'_>) -> Option<RouteDecision> {
    routes.iter().enumerate().find_map(|(i, r)| {
        check(&r.matcher, head)
            .ok()
            .map(|captures| RouteDecision { route: i, captures })
    })
}

/// Checks one route's conditions, cheapest first.
pub fn check(m: &RouteMatch, head: &RequestHead<'_>) -> Result<Captures, Mismatch> {
    if let Some(h) = &m.host {
        let host = head.host().unwrap_or("");
        let ok = match h {
            HostMatch::Exact(e) => host.eq_ignore_ascii_case(e),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        };
        if !ok {
            return Err(Mismatch::Host);
        }
    }
    if !m.methods.is_empty() && !m.methods.contains(head.method) {
        return Err(Mismatch::Method);
    }
    let mut captures = Captures::default();
    if let Some(p) = &m.path {
        let ok = match p {
            PathMatch::Exact(e) => head.path == e,
            PathMatch::Prefix(e) => prefix_matches(head.path, e),
            PathMatch::Regex(r) => r.is_match(head.path),
            PathMatch::Template(t) => t.matches(head.path, &mut captures),
        };
        if !ok {
            return Err(Mismatch::Path);
        }
    }
    for (i, v) in m.headers.iter().enumerate() {
        let value = v.header.as_ref().and_then(|h| head.header(h));
        if !value_ok(v, value) {
            return Err(Mismatch::Header(i));
        }
    }
    for (i, v) in m.query.iter().enumerate() {
        let value = head.query_param(&v.name);
        if !value_ok(v, value.as_deref()) {
            return Err(Mismatch::Query(i));
        }
    }
    Ok(captures)
}

/// A prefix matches at a segment boundary when it ends without `/`: `/api` matches `/api` and
/// `/api/x`, never `/apix` (the surprise Envoy users trip over).
fn prefix_matches(path: &str, prefix: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

fn value_ok(v: &ValueMatch, value: Option<&str>) -> bool {
    match (&v.rule, value) {
        (ValueRule::Present(want), value) => value.is_some() == *want,
        (ValueRule::Exact(e), Some(value)) => value == e,
        (ValueRule::Regex(r), Some(value)) => r.is_match(value),
        (_, None) => false,
    }
}

/// The upstream path after a prefix rewrite: the matched prefix replaced by `to`.
pub fn rewrite_prefix<'a>(path: &'a str, from: &str, to: &str) -> Cow<'a, str> {
    match path.strip_prefix(from) {
        Some(rest) => {
            let mut out = String::with_capacity(to.len() + rest.len() + 1);
            out.push_str(to);
            if !rest.is_empty() && !rest.starts_with('/') && !to.ends_with('/') {
                out.push('/');
            }
            if to.ends_with('/') {
                out.push_str(rest.trim_start_matches('/'));
            } else {
                out.push_str(rest);
            }
            Cow::Owned(out)
        }
        None => Cow::Borrowed(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn routes(yaml_routes: &str) -> Vec<Route> {
        let text = format!(
            "listeners:\n  - address: 127.0.0.1:1\n    routes:\n{yaml_routes}\nclusters:\n  c:\n    endpoints: [127.0.0.1:2]\n"
        );
        let config = Config::parse(&text, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
        match &config.listeners[0].kind {
            crate::config::ListenerKind::Http { routes, .. } => routes.clone(),
            _ => unreachable!(),
        }
    }

    fn pick(routes: &[Route], method: &str, url: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).unwrap();
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        select(routes, &head).map(|d| routes[d.route].name.clone())
    }

    #[test]
    fn route_matching_table() {
        let rs = routes(
            r#"      - name: exact
        match: { path: { exact: /healthz } }
        cluster: c
      - name: host
        match: { host: "*.beta.local", path: { prefix: /images } }
        cluster: c
      - name: template
        match: { path: { template: "/images/{user}/{rest*}" }, methods: [GET] }
        cluster: c
      - name: header
        match: { path: { prefix: /api }, headers: [{ name: x-version, exact: "2" }] }
        cluster: c
      - name: header-regex
        match: { path: { prefix: /api }, headers: [{ name: x-version, regex: "3|4" }] }
        cluster: c
      - name: query
        match: { path: { prefix: /api }, query: [{ name: debug, exact: "on" }] }
        cluster: c
      - name: absent
        match: { path: { prefix: /api }, headers: [{ name: x-canary, present: false }] }
        cluster: c
      - name: regex
        match: { path: { regex: "/v[0-9]+/.*" } }
        cluster: c"#,
        );
        let cases: &[(&str, &str, &[(&str, &str)], Option<&str>)] = &[
            ("GET", "http://a/healthz", &[], Some("exact")),
            ("GET", "http://a/healthz/x", &[], None),
            ("GET", "http://x.beta.local/images/p", &[], Some("host")),
            (
                "GET",
                "http://X.BETA.local:8080/images/p",
                &[],
                Some("host"),
            ),
            ("GET", "http://beta.local/images/p/q", &[], Some("template")),
            ("POST", "http://a/images/p/q", &[], None),
            (
                "GET",
                "http://a/api/x",
                &[("x-version", "2")],
                Some("header"),
            ),
            (
                "GET",
                "http://a/api/x",
                &[("x-version", "4")],
                Some("header-regex"),
            ),
            (
                "GET",
                "http://a/api/x",
                &[("x-version", "44")],
                Some("absent"),
            ),
            ("GET", "http://a/api/x?debug=on", &[], Some("query")),
            ("GET", "http://a/api/x?a=1&debug=%6Fn", &[], Some("query")),
            ("GET", "http://a/api/x", &[("x-canary", "1")], None),
            ("GET", "http://a/apix", &[], None),
            ("GET", "http://a/v2/thing", &[], Some("regex")),
            ("GET", "http://a/xv2/thing", &[], None),
        ];
        for (method, url, headers, want) in cases {
            assert_eq!(
                pick(&rs, method, url, headers).as_deref(),
                *want,
                "{method} {url} {headers:?}"
            );
        }
    }

    #[test]
    fn host_header_is_used_without_authority() {
        let rs = routes("      - match: { host: images.local }\n        cluster: c");
        assert_eq!(
            pick(&rs, "GET", "/x", &[("host", "images.local:10000")]).as_deref(),
            Some("route-0")
        );
        assert_eq!(pick(&rs, "GET", "/x", &[("host", "other")]), None);
    }

    #[test]
    fn prefix_rewrite() {
        assert_eq!(rewrite_prefix("/api/users", "/api", "/v1"), "/v1/users");
        assert_eq!(rewrite_prefix("/api", "/api", "/"), "/");
        assert_eq!(rewrite_prefix("/api/", "/api/", "/v1/"), "/v1/");
        assert_eq!(rewrite_prefix("/api/x", "/api/", "/"), "/x");
        assert_eq!(rewrite_prefix("/other", "/api", "/v1"), "/other");
    }

    #[test]
    fn query_and_cookie_helpers() {
        assert_eq!(query_param("a=1&b=x+y%21", "b").as_deref(), Some("x y!"));
        assert_eq!(query_param("a", "a").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "b"), None);
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; user=priya".parse().unwrap());
        assert_eq!(cookie(Fields::Map(&h), "user"), Some("priya"));
        assert_eq!(cookie(Fields::Map(&h), "nope"), None);
    }
}
