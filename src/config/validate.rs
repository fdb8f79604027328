//! File structs → validated [`Config`]: every error collected, each with its location.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::{Location, Spanned};

use super::file::*;
use super::*;
use crate::route::Template;

/// Collects errors while walking the file.
struct Ctx {
    file: String,
    errors: Vec<ConfigError>,
}

impl Ctx {
    fn at(&mut self, loc: &Location, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: loc.line(),
            column: loc.column(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn err<T>(&mut self, s: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) {
        self.at(&s.referenced, field, message);
    }

    fn duration(
        &mut self,
        value: &Option<S<String>>,
        field: impl Into<String>,
        default: Duration,
    ) -> Duration {
        match value {
            None => default,
            Some(s) => match parse_duration(&s.value) {
                Ok(d) => d,
                Err(e) => {
                    self.err(s, field, e);
                    default
                }
            },
        }
    }
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let file_name = path.display().to_string();
    let options = serde_saphyr::options! { with_snippet: false };
    // serde_path_to_error names the field; the closure hands its path out through `field`
    // and returns the error itself, so that the parser stops at the first structural error.
    let mut field = String::new();
    let parsed: Result<FileConfig, serde_saphyr::Error> =
        serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = e.path().to_string();
                e.into_inner()
            })
        });
    let file = match parsed {
        Ok(f) => f,
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // `Spanned` fields show up as `.value` in the path: users never wrote those.
            let field = field.replace(".value", "");
            let field = if field.is_empty() || field == "." {
                "(document)".to_owned()
            } else {
                field
            };
            return Err(ConfigErrors(vec![ConfigError {
                file: file_name,
                line,
                column,
                field,
                message: clean_serde_message(&e.to_string()),
            }]));
        }
    };
    let mut ctx = Ctx {
        file: file_name,
        errors: Vec::new(),
    };
    let config = build(&mut ctx, file, path);
    if ctx.errors.is_empty() {
        Ok(config)
    } else {
        ctx.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(ctx.errors))
    }
}

/// serde-saphyr appends the position to its messages; ours carry it in front already.
fn clean_serde_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    let trimmed = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    trimmed.trim().to_owned()
}

fn build(ctx: &mut Ctx, file: FileConfig, path: &Path) -> Config {
    // Clusters first: routes refer to them by name.
    let cluster_names: Vec<String> = file.clusters.keys().cloned().collect();
    let clusters: Vec<Cluster> = file
        .clusters
        .iter()
        .map(|(name, c)| cluster(ctx, name, c))
        .collect();

    let dir_names: Vec<String> = file.directories.keys().cloned().collect();
    let base = path.parent().unwrap_or(Path::new("."));
    let directories: Vec<Directory> = file
        .directories
        .iter()
        .map(|(name, d)| directory(ctx, name, d, &cluster_names, base))
        .collect();
    let set_names: Vec<String> = file.shard_sets.keys().cloned().collect();
    let shard_sets: Vec<Option<ShardSet>> = file
        .shard_sets
        .iter()
        .map(|(name, s)| shard_set(ctx, name, s, &cluster_names, &dir_names))
        .collect();
    let split_names: Vec<String> = file.splits.keys().cloned().collect();
    let splits: Vec<Option<Split>> = file
        .splits
        .iter()
        .map(|(name, s)| split(ctx, name, s, &cluster_names))
        .collect();
    let refs = Refs {
        clusters: &cluster_names,
        cluster_defs: &clusters,
        shard_sets: &set_names,
        shard_set_defs: &shard_sets,
        splits: &split_names,
        split_defs: &splits,
    };

    let admin_address = match file.admin.as_ref().and_then(|a| a.address.as_ref()) {
        None => DEFAULT_ADMIN_ADDRESS.parse().ok(),
        Some(s) => socket_addr(ctx, s, "admin.address"),
    };
    let admin_address = admin_address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901)));

    let access_log = file
        .access_log
        .as_ref()
        .map(|s| AccessLog::parse(&s.value))
        .unwrap_or(AccessLog::Stdout);

    let workers = match &file.workers {
        None => None,
        Some(w) if w.value == 0 || w.value > 256 => {
            ctx.err(
                w,
                "workers",
                "must be between 1 and 256 (or left out: one per CPU)",
            );
            None
        }
        Some(w) => Some(w.value as usize),
    };
    let shutdown_grace = ctx.duration(
        &file.shutdown_grace,
        "shutdown_grace",
        DEFAULT_SHUTDOWN_GRACE,
    );

    let mut listeners = Vec::new();
    let mut seen_names: HashMap<String, usize> = HashMap::new();
    let mut seen_addrs: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, l) in file.listeners.iter().enumerate() {
        let field = format!("listeners[{i}]");
        let name = l
            .name
            .as_ref()
            .map(|n| n.value.clone())
            .unwrap_or_else(|| format!("listener-{i}"));
        if let (Some(n), Some(prev)) = (&l.name, seen_names.get(&name)) {
            ctx.err(
                n,
                format!("{field}.name"),
                format!("duplicate listener name `{name}` (also listeners[{prev}])"),
            );
        }
        seen_names.insert(name.clone(), i);
        let address = socket_addr(ctx, &l.address, &format!("{field}.address"));
        // Port 0 ("any free port", used by tests and the demo) never collides.
        if let Some(a) = address.filter(|a| a.port() != 0) {
            if let Some(prev) = seen_addrs.get(&a) {
                ctx.err(
                    &l.address,
                    format!("{field}.address"),
                    format!("address {a} is already used by listeners[{prev}]"),
                );
            } else if a == admin_address {
                ctx.err(
                    &l.address,
                    format!("{field}.address"),
                    format!("address {a} is the admin listener's"),
                );
            }
            seen_addrs.insert(a, i);
        }
        let protocol = l
            .protocol
            .as_ref()
            .map(|p| p.value.as_str())
            .unwrap_or("http");
        let kind = match protocol {
            "tcp" => {
                if let Some(r) = &l.routes {
                    ctx.err(
                        r,
                        format!("{field}.routes"),
                        "a tcp listener has no routes: name its `cluster` instead",
                    );
                }
                match &l.cluster {
                    None => {
                        ctx.err(
                            &l.address,
                            format!("{field}.cluster"),
                            "a tcp listener needs `cluster`",
                        );
                        None
                    }
                    Some(c) => cluster_ref(ctx, c, &format!("{field}.cluster"), &cluster_names)
                        .map(|cluster| ListenerKind::Tcp { cluster }),
                }
            }
            "http" => {
                if let Some(c) = &l.cluster {
                    ctx.err(
                        c,
                        format!("{field}.cluster"),
                        "an http listener sends requests through `routes`; put `cluster` on a route",
                    );
                }
                let routes = match &l.routes {
                    None => {
                        ctx.err(
                            &l.address,
                            format!("{field}.routes"),
                            "an http listener needs at least one route",
                        );
                        Vec::new()
                    }
                    Some(r) if r.value.is_empty() => {
                        ctx.err(
                            r,
                            format!("{field}.routes"),
                            "an http listener needs at least one route",
                        );
                        Vec::new()
                    }
                    Some(r) => {
                        let mut names: HashMap<String, usize> = HashMap::new();
                        let mut out = Vec::new();
                        for (j, fr) in r.value.iter().enumerate() {
                            let rfield = format!("{field}.routes[{j}]");
                            if let Some(route) = route(ctx, fr, j, &rfield, &refs) {
                                if let Some(prev) = names.get(&route.name) {
                                    if let Some(n) = &fr.value.name {
                                        ctx.err(
                                            n,
                                            format!("{rfield}.name"),
                                            format!(
                                                "duplicate route name `{}` (also routes[{prev}])",
                                                route.name
                                            ),
                                        );
                                    }
                                }
                                names.insert(route.name.clone(), j);
                                out.push(route);
                            }
                        }
                        out
                    }
                };
                let fwd = l.forwarded.as_ref();
                Some(ListenerKind::Http {
                    routes,
                    forwarded: Forwarded {
                        x_forwarded_for: fwd.and_then(|f| f.x_forwarded_for).unwrap_or(true),
                        x_forwarded_proto: fwd.and_then(|f| f.x_forwarded_proto).unwrap_or(true),
                        via: fwd.and_then(|f| f.via).unwrap_or(false),
                    },
                })
            }
            other => {
                if let Some(p) = &l.protocol {
                    ctx.err(
                        p,
                        format!("{field}.protocol"),
                        format!(
                            "unknown protocol `{other}`: use `http` (HTTP/1.1 and h2c) or `tcp`"
                        ),
                    );
                }
                None
            }
        };
        let max_connections = match &l.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(m) if m.value == 0 => {
                ctx.err(m, format!("{field}.max_connections"), "must be at least 1");
                DEFAULT_MAX_CONNECTIONS
            }
            Some(m) => m.value as usize,
        };
        let park_idle_above = l
            .park_idle_above
            .as_ref()
            .map_or(DEFAULT_PARK_IDLE_ABOVE, |p| p.value as usize);
        let max_header_bytes = match &l.max_header_bytes {
            None => DEFAULT_MAX_HEADER_BYTES,
            Some(m) if m.value < 8192 || m.value > 1 << 20 => {
                ctx.err(
                    m,
                    format!("{field}.max_header_bytes"),
                    "must be between 8192 and 1048576",
                );
                DEFAULT_MAX_HEADER_BYTES
            }
            Some(m) => m.value as usize,
        };
        let header_read_timeout = ctx.duration(
            &l.header_read_timeout,
            format!("{field}.header_read_timeout"),
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        if let (Some(address), Some(kind)) = (address, kind) {
            listeners.push(Listener {
                name,
                address,
                kind,
                max_connections,
                park_idle_above,
                header_read_timeout,
                max_header_bytes,
            });
        }
    }

    Config {
        source: path.to_path_buf(),
        admin: Admin {
            address: admin_address,
        },
        access_log,
        workers,
        shutdown_grace,
        listeners,
        clusters,
        directories,
        shard_sets: shard_sets.into_iter().flatten().collect(),
        splits: splits.into_iter().flatten().collect(),
    }
}

/// What routes may refer to.
struct Refs<'a> {
    clusters: &'a [String],
    cluster_defs: &'a [Cluster],
    shard_sets: &'a [String],
    shard_set_defs: &'a [Option<ShardSet>],
    splits: &'a [String],
    split_defs: &'a [Option<Split>],
}

fn socket_addr(ctx: &mut Ctx, s: &S<String>, field: &str) -> Option<SocketAddr> {
    match s.value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            ctx.err(
                s,
                field,
                format!(
                    "`{}` is not an address: write IP:PORT, e.g. 127.0.0.1:10000",
                    s.value
                ),
            );
            None
        }
    }
}

fn cluster_ref(ctx: &mut Ctx, s: &S<String>, field: &str, names: &[String]) -> Option<ClusterId> {
    match names.iter().position(|n| *n == s.value) {
        Some(id) => Some(id),
        None => {
            let known = if names.is_empty() {
                "no clusters are defined".to_owned()
            } else {
                format!("known: {}", names.join(", "))
            };
            ctx.err(s, field, format!("unknown cluster `{}` ({known})", s.value));
            None
        }
    }
}

/// A route's destination: exactly one of `cluster`, `shard_set`, `split`.
fn destination(
    ctx: &mut Ctx,
    spanned: &S<FileRoute>,
    field: &str,
    refs: &Refs<'_>,
    matcher: &RouteMatch,
) -> Option<Destination> {
    let r = &spanned.value;
    let given: Vec<(&S<String>, &str)> = [
        (r.cluster.as_ref(), "cluster"),
        (r.shard_set.as_ref(), "shard_set"),
        (r.split.as_ref(), "split"),
    ]
    .into_iter()
    .filter_map(|(v, n)| v.map(|v| (v, n)))
    .collect();
    let (s, kind) = match given.as_slice() {
        [one] => *one,
        [] => {
            ctx.err(
                spanned,
                format!("{field}.cluster"),
                "a route needs a destination: `cluster`, `shard_set` or `split`",
            );
            return None;
        }
        [_, (second, name), ..] => {
            ctx.err(
                *second,
                format!("{field}.{name}"),
                "give one destination: `cluster`, `shard_set` or `split`, not several",
            );
            return None;
        }
    };
    // A key read from a path capture needs that capture in this route's template.
    let check_capture = |ctx: &mut Ctx, key: Option<&KeySource>, what: &str| {
        if let Some(KeySource::Capture(name)) = key {
            let has = matches!(&matcher.path, Some(PathMatch::Template(t)) if t.name_index(name).is_some());
            if !has && r.batch.is_none() {
                ctx.err(s, format!("{field}.{kind}"), format!(
                    "{what} `{}` reads its key from path capture `{name}`, which this route's path template does not have",
                    s.value
                ));
            }
        }
    };
    let lookup = |ctx: &mut Ctx, names: &[String], what: &str| {
        let found = names.iter().position(|n| *n == s.value);
        if found.is_none() {
            let known = if names.is_empty() {
                format!("no {what}s are defined")
            } else {
                format!("known: {}", names.join(", "))
            };
            ctx.err(
                s,
                format!("{field}.{kind}"),
                format!("unknown {what} `{}` ({known})", s.value),
            );
        }
        found
    };
    match kind {
        "cluster" => cluster_ref(ctx, s, &format!("{field}.cluster"), refs.clusters)
            .map(Destination::Cluster),
        "shard_set" => {
            let id = lookup(ctx, refs.shard_sets, "shard set")?;
            if let Some(Some(set)) = refs.shard_set_defs.get(id) {
                check_capture(ctx, Some(&set.key), "shard set");
            }
            Some(Destination::Shards(id))
        }
        _ => {
            let id = lookup(ctx, refs.splits, "split")?;
            if let Some(Some(split)) = refs.split_defs.get(id) {
                check_capture(ctx, split.key.as_ref(), "split");
            }
            Some(Destination::Split(id))
        }
    }
}

fn route(
    ctx: &mut Ctx,
    spanned: &S<FileRoute>,
    index: usize,
    field: &str,
    refs: &Refs<'_>,
) -> Option<Route> {
    let r = &spanned.value;
    let name = r
        .name
        .as_ref()
        .map(|n| n.value.clone())
        .unwrap_or_else(|| format!("route-{index}"));
    let matcher = r
        .matcher
        .as_ref()
        .map(|m| route_match(ctx, m, &format!("{field}.match")))
        .unwrap_or_default();
    let destination = destination(ctx, spanned, field, refs, &matcher);
    let batch = r.batch.as_ref().and_then(|b| {
        if !matches!(destination, Some(Destination::Shards(_))) {
            ctx.err(
                b,
                format!("{field}.batch"),
                "a batch form needs `shard_set` (keys are split by shard)",
            );
        }
        batch(ctx, b, &format!("{field}.batch"))
    });
    let rewrite_prefix = match r.rewrite.as_ref().and_then(|rw| rw.prefix.as_ref()) {
        None => None,
        Some(p) => {
            if !matches!(matcher.path, Some(PathMatch::Prefix(_))) {
                ctx.err(
                    p,
                    format!("{field}.rewrite.prefix"),
                    "a prefix rewrite needs `match.path.prefix` (the part it replaces)",
                );
            }
            if !p.value.starts_with('/') {
                ctx.err(p, format!("{field}.rewrite.prefix"), "must start with `/`");
            }
            Some(p.value.clone())
        }
    };
    let request_headers = header_ops(ctx, &r.request_headers, &format!("{field}.request_headers"));
    let response_headers = header_ops(
        ctx,
        &r.response_headers,
        &format!("{field}.response_headers"),
    );
    let default_timeout = match destination {
        Some(Destination::Cluster(c)) => refs.cluster_defs.get(c).map(|c| c.timeout),
        Some(Destination::Shards(s)) => refs
            .shard_set_defs
            .get(s)
            .and_then(|s| s.as_ref())
            .and_then(|s| s.shards.first())
            .and_then(|sh| refs.cluster_defs.get(sh.cluster))
            .map(|c| c.timeout),
        // The longest of the variants' timeouts: no variant is cut shorter than its cluster.
        Some(Destination::Split(s)) => {
            refs.split_defs
                .get(s)
                .and_then(|s| s.as_ref())
                .and_then(|s| {
                    s.variants
                        .iter()
                        .filter_map(|v| refs.cluster_defs.get(v.cluster))
                        .map(|c| c.timeout)
                        .max()
                })
        }
        None => None,
    }
    .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let timeout = ctx.duration(&r.timeout, format!("{field}.timeout"), default_timeout);
    Some(Route {
        name,
        matcher,
        rewrite_prefix,
        request_headers,
        response_headers,
        timeout,
        destination: destination?,
        batch,
        retry: r
            .retry
            .as_ref()
            .map(|p| retry_policy(ctx, p, &format!("{field}.retry"), &RetryPolicy::default())),
        per_try_timeout: r.per_try_timeout.as_ref().map(|_| {
            ctx.duration(
                &r.per_try_timeout,
                format!("{field}.per_try_timeout"),
                timeout,
            )
        }),
        hedge: r.hedge.as_ref().map(|h| {
            ctx.duration(
                &Some(h.value.delay.clone()),
                format!("{field}.hedge.delay"),
                timeout,
            )
        }),
        rate_limit: r
            .rate_limit
            .as_ref()
            .and_then(|l| rate_limit(ctx, l, &format!("{field}.rate_limit"))),
        fallback: r
            .fallback
            .as_ref()
            .and_then(|f| fallback(ctx, f, &format!("{field}.fallback"))),
    })
}

fn route_match(ctx: &mut Ctx, m: &FileMatch, field: &str) -> RouteMatch {
    let host = m.host.as_ref().and_then(|h| {
        let v = h.value.to_ascii_lowercase();
        if v.contains(':') || v.contains('/') || v.is_empty() {
            ctx.err(
                h,
                format!("{field}.host"),
                "a host name without port or path, e.g. `images.local` or `*.example.com`",
            );
            None
        } else if let Some(suffix) = v.strip_prefix('*') {
            Some(HostMatch::Suffix(suffix.to_owned()))
        } else {
            Some(HostMatch::Exact(v))
        }
    });
    let path = m
        .path
        .as_ref()
        .and_then(|p| path_match(ctx, p, &format!("{field}.path")));
    let methods = m
        .methods
        .iter()
        .flatten()
        .enumerate()
        .filter_map(
            |(i, s)| match Method::from_bytes(s.value.to_ascii_uppercase().as_bytes()) {
                Ok(mth) => Some(mth),
                Err(_) => {
                    ctx.err(
                        s,
                        format!("{field}.methods[{i}]"),
                        format!("`{}` is not an HTTP method", s.value),
                    );
                    None
                }
            },
        )
        .collect();
    let headers = m
        .headers
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, v)| value_match(ctx, v, &format!("{field}.headers[{i}]"), true))
        .collect();
    let query = m
        .query
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, v)| value_match(ctx, v, &format!("{field}.query[{i}]"), false))
        .collect();
    RouteMatch {
        host,
        path,
        methods,
        headers,
        query,
    }
}

fn path_match(ctx: &mut Ctx, p: &S<FilePathMatch>, field: &str) -> Option<PathMatch> {
    let v = &p.value;
    let set: Vec<(&str, &S<String>)> = [
        ("exact", &v.exact),
        ("prefix", &v.prefix),
        ("regex", &v.regex),
        ("template", &v.template),
    ]
    .into_iter()
    .filter_map(|(k, s)| s.as_ref().map(|s| (k, s)))
    .collect();
    if set.len() != 1 {
        ctx.err(
            p,
            field,
            "give exactly one of `exact`, `prefix`, `regex`, `template`",
        );
        return None;
    }
    let (kind, s) = set[0];
    let field = format!("{field}.{kind}");
    if kind != "regex" && !s.value.starts_with('/') {
        ctx.err(s, &field, "a path must start with `/`");
        return None;
    }
    match kind {
        "exact" => Some(PathMatch::Exact(s.value.clone())),
        "prefix" => Some(PathMatch::Prefix(s.value.clone())),
        "regex" => match anchored_regex(&s.value) {
            Ok(r) => Some(PathMatch::Regex(r)),
            Err(e) => {
                ctx.err(s, &field, e);
                None
            }
        },
        _ => match Template::parse(&s.value) {
            Ok(t) => Some(PathMatch::Template(t)),
            Err(e) => {
                ctx.err(s, &field, e);
                None
            }
        },
    }
}

/// Regexes match the whole value (as Envoy's `safe_regex` does), never a substring by accident.
fn anchored_regex(source: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{source})$")).map_err(|e| {
        let text = e.to_string();
        format!(
            "invalid regex: {}",
            text.lines().last().unwrap_or(&text).trim()
        )
    })
}

fn value_match(
    ctx: &mut Ctx,
    v: &FileValueMatch,
    field: &str,
    is_header: bool,
) -> Option<ValueMatch> {
    let header = if is_header {
        match HeaderName::from_bytes(v.name.value.to_ascii_lowercase().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                ctx.err(
                    &v.name,
                    format!("{field}.name"),
                    format!("`{}` is not a header name", v.name.value),
                );
                return None;
            }
        }
    } else {
        None
    };
    let rule = match (&v.exact, &v.regex, &v.present) {
        (Some(e), None, None) => ValueRule::Exact(e.value.clone()),
        (None, Some(r), None) => match anchored_regex(&r.value) {
            Ok(re) => ValueRule::Regex(re),
            Err(e) => {
                ctx.err(r, format!("{field}.regex"), e);
                return None;
            }
        },
        (None, None, Some(p)) => ValueRule::Present(p.value),
        _ => {
            ctx.err(
                &v.name,
                field,
                "give exactly one of `exact`, `regex`, `present`",
            );
            return None;
        }
    };
    Some(ValueMatch {
        name: v.name.value.clone(),
        header,
        rule,
    })
}

fn header_ops(ctx: &mut Ctx, ops: &Option<FileHeaderOps>, field: &str) -> HeaderOps {
    let Some(ops) = ops else {
        return HeaderOps::default();
    };
    let mut out = HeaderOps::default();
    for (name, value) in &ops.add {
        let Ok(n) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
            ctx.err(
                value,
                format!("{field}.add.{name}"),
                format!("`{name}` is not a header name"),
            );
            continue;
        };
        match HeaderValue::from_str(&value.value) {
            Ok(v) => out.add.push((n, v)),
            Err(_) => ctx.err(
                value,
                format!("{field}.add.{name}"),
                "not a valid header value",
            ),
        }
    }
    for (i, name) in ops.remove.iter().enumerate() {
        match HeaderName::from_bytes(name.value.to_ascii_lowercase().as_bytes()) {
            Ok(n) => out.remove.push(n),
            Err(_) => ctx.err(
                name,
                format!("{field}.remove[{i}]"),
                format!("`{}` is not a header name", name.value),
            ),
        }
    }
    out
}

fn cluster(ctx: &mut Ctx, name: &str, c: &FileCluster) -> Cluster {
    let field = format!("clusters.{name}");
    let mut endpoints = Vec::new();
    if c.endpoints.value.is_empty() {
        ctx.err(
            &c.endpoints,
            format!("{field}.endpoints"),
            "a cluster needs at least one endpoint",
        );
    }
    for (i, e) in c.endpoints.value.iter().enumerate() {
        if let Some(spec) = endpoint(ctx, e, &format!("{field}.endpoints[{i}]")) {
            if endpoints.contains(&spec) {
                ctx.err(
                    e,
                    format!("{field}.endpoints[{i}]"),
                    format!("endpoint {spec} is listed twice"),
                );
            } else {
                endpoints.push(spec);
            }
        }
    }
    let protocol = match c.protocol.as_ref().map(|p| p.value.as_str()) {
        None | Some("http1") => UpstreamProtocol::Http1,
        Some("http2") => UpstreamProtocol::Http2,
        Some(other) => {
            if let Some(p) = &c.protocol {
                ctx.err(
                    p,
                    format!("{field}.protocol"),
                    format!("unknown protocol `{other}`: use `http1` or `http2`"),
                );
            }
            UpstreamProtocol::Http1
        }
    };
    let hash_on = c
        .hash_on
        .as_ref()
        .and_then(|h| hash_on(ctx, h, &format!("{field}.hash_on")));
    let balance = match c.balance.as_ref().map(|b| b.value.as_str()) {
        None | Some("least_request") => Balance::LeastRequest,
        Some("round_robin") => Balance::RoundRobin,
        Some("consistent_hash") => match hash_on.clone() {
            Some(h) => Balance::ConsistentHash(h),
            None => {
                if let (Some(b), None) = (&c.balance, &c.hash_on) {
                    ctx.err(
                        b,
                        format!("{field}.balance"),
                        "consistent_hash needs `hash_on` (header, query, cookie or capture)",
                    );
                }
                Balance::LeastRequest
            }
        },
        Some(other) => {
            if let Some(b) = &c.balance {
                ctx.err(b, format!("{field}.balance"), format!("unknown balance `{other}`: use least_request, round_robin or consistent_hash"));
            }
            Balance::LeastRequest
        }
    };
    if let Some(h) = &c.hash_on {
        if !matches!(balance, Balance::ConsistentHash(_)) {
            ctx.err(
                h,
                format!("{field}.hash_on"),
                "hash_on is used only with `balance: consistent_hash`",
            );
        }
    }
    let connect_timeout = ctx.duration(
        &c.connect_timeout,
        format!("{field}.connect_timeout"),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let timeout = ctx.duration(
        &c.timeout,
        format!("{field}.timeout"),
        DEFAULT_REQUEST_TIMEOUT,
    );
    let idle_timeout = ctx.duration(
        &c.idle_timeout,
        format!("{field}.idle_timeout"),
        DEFAULT_POOL_IDLE_TIMEOUT,
    );
    let dns_refresh = ctx.duration(
        &c.dns_refresh,
        format!("{field}.dns_refresh"),
        DEFAULT_DNS_REFRESH,
    );
    let max_idle_per_endpoint = c
        .max_idle_per_endpoint
        .as_ref()
        .map(|m| m.value as usize)
        .unwrap_or(256);
    let health_check = c.health_check.as_ref().map(|h| {
        let hfield = format!("{field}.health_check");
        if !h.path.value.starts_with('/') {
            ctx.err(&h.path, format!("{hfield}.path"), "must start with `/`");
        }
        let mut threshold = |v: &Option<S<u32>>, key: &str, default: u32| match v {
            Some(t) if t.value == 0 => {
                ctx.err(t, format!("{hfield}.{key}"), "must be at least 1");
                default
            }
            Some(t) => t.value,
            None => default,
        };
        let healthy_threshold = threshold(&h.healthy_threshold, "healthy_threshold", 2);
        let unhealthy_threshold = threshold(&h.unhealthy_threshold, "unhealthy_threshold", 3);
        HealthCheck {
            path: h.path.value.clone(),
            interval: ctx.duration(
                &h.interval,
                format!("{hfield}.interval"),
                Duration::from_secs(5),
            ),
            timeout: ctx.duration(
                &h.timeout,
                format!("{hfield}.timeout"),
                Duration::from_secs(1),
            ),
            healthy_threshold,
            unhealthy_threshold,
        }
    });
    let retry = c
        .retry
        .as_ref()
        .map(|r| retry_policy(ctx, r, &format!("{field}.retry"), &RetryPolicy::default()))
        .unwrap_or_default();
    let breaker = c
        .breaker
        .as_ref()
        .map(|b| breaker_policy(ctx, b, &format!("{field}.breaker")));
    let outlier = match &c.outlier_detection {
        Some(o) => Some(outlier(ctx, o, &format!("{field}.outlier_detection"))),
        None => Some(Outlier::default()),
    };
    let max_requests = match &c.max_requests {
        Some(m) if m.value == 0 => {
            ctx.err(m, format!("{field}.max_requests"), "at least 1");
            None
        }
        Some(m) => Some(m.value as usize),
        None => None,
    };
    let max_pending = c
        .max_pending
        .as_ref()
        .map(|m| m.value as usize)
        .unwrap_or(1024);
    let per_try_timeout = c.per_try_timeout.as_ref().map(|_| {
        ctx.duration(
            &c.per_try_timeout,
            format!("{field}.per_try_timeout"),
            timeout,
        )
    });
    Cluster {
        name: name.to_owned(),
        endpoints,
        protocol,
        balance,
        connect_timeout,
        timeout,
        idle_timeout,
        max_idle_per_endpoint,
        dns_refresh,
        health_check,
        retry,
        breaker,
        outlier,
        max_requests,
        max_pending,
        per_try_timeout,
    }
}

fn endpoint(ctx: &mut Ctx, e: &S<String>, field: &str) -> Option<EndpointSpec> {
    if let Ok(addr) = e.value.parse::<SocketAddr>() {
        return Some(EndpointSpec::Addr(addr));
    }
    let bad = |ctx: &mut Ctx| {
        ctx.err(
            e,
            field,
            format!("`{}` is not HOST:PORT or IP:PORT", e.value),
        );
        None
    };
    let Some((host, port)) = e.value.rsplit_once(':') else {
        return bad(ctx);
    };
    let Ok(port) = port.parse::<u16>() else {
        return bad(ctx);
    };
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid_host || port == 0 {
        return bad(ctx);
    }
    Some(EndpointSpec::Dns {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn hash_on(ctx: &mut Ctx, h: &S<FileHashOn>, field: &str) -> Option<HashOn> {
    let v = &h.value;
    match (&v.header, &v.query, &v.cookie, &v.capture) {
        (Some(n), None, None, None) => {
            match HeaderName::from_bytes(n.value.to_ascii_lowercase().as_bytes()) {
                Ok(name) => Some(HashOn::Header(name)),
                Err(_) => {
                    ctx.err(
                        n,
                        format!("{field}.header"),
                        format!("`{}` is not a header name", n.value),
                    );
                    None
                }
            }
        }
        (None, Some(q), None, None) => Some(HashOn::Query(q.value.clone())),
        (None, None, Some(c), None) => Some(HashOn::Cookie(c.value.clone())),
        (None, None, None, Some(c)) => Some(HashOn::Capture(c.value.clone())),
        _ => {
            ctx.err(
                h,
                field,
                "give exactly one of `header`, `query`, `cookie`, `capture`",
            );
            None
        }
    }
}

fn directory(
    ctx: &mut Ctx,
    name: &str,
    d: &FileDirectory,
    clusters: &[String],
    base: &Path,
) -> Directory {
    let field = format!("directories.{name}");
    let cache = d.cache.as_ref().map(|c| {
        let cf = format!("{field}.cache");
        let defaults = CachePolicy::default();
        CachePolicy {
            ttl: ctx.duration(&c.ttl, format!("{cf}.ttl"), defaults.ttl),
            negative_ttl: ctx.duration(
                &c.negative_ttl,
                format!("{cf}.negative_ttl"),
                defaults.negative_ttl,
            ),
            max_entries: match &c.max_entries {
                Some(m) if m.value == 0 => {
                    ctx.err(m, format!("{cf}.max_entries"), "must be at least 1");
                    defaults.max_entries
                }
                Some(m) => m.value as usize,
                None => defaults.max_entries,
            },
            stale_for: ctx.duration(&c.stale_for, format!("{cf}.stale_for"), defaults.stale_for),
        }
    });
    let source = match (&d.table, &d.file, &d.http) {
        (Some(t), None, None) => DirectorySource::Table(t.value.clone()),
        (None, Some(f), None) => {
            let path = base.join(&f.value);
            if let Err(e) = crate::shard::directory::read_table_file(&path) {
                ctx.err(f, format!("{field}.file"), e);
            }
            DirectorySource::File(path)
        }
        (None, None, Some(h)) => {
            let hf = format!("{field}.http");
            let cluster =
                cluster_ref(ctx, &h.value.cluster, &format!("{hf}.cluster"), clusters).unwrap_or(0);
            if !h.value.path.value.starts_with('/') || !h.value.path.value.contains("{key}") {
                ctx.err(
                    &h.value.path,
                    format!("{hf}.path"),
                    "a path starting with `/` that contains `{key}`, e.g. `/users/{key}`",
                );
            }
            if !(h.value.pointer.value.is_empty() || h.value.pointer.value.starts_with('/')) {
                ctx.err(
                    &h.value.pointer,
                    format!("{hf}.pointer"),
                    "a JSON pointer, e.g. `/country`",
                );
            }
            DirectorySource::Http {
                cluster,
                path: h.value.path.value.clone(),
                pointer: h.value.pointer.value.clone(),
                timeout: ctx.duration(
                    &h.value.timeout,
                    format!("{hf}.timeout"),
                    Duration::from_millis(500),
                ),
            }
        }
        _ => {
            let loc = d
                .table
                .as_ref()
                .map(|t| t.referenced)
                .or(d.file.as_ref().map(|f| f.referenced))
                .or(d.http.as_ref().map(|h| h.referenced))
                .unwrap_or(Location::UNKNOWN);
            ctx.at(
                &loc,
                field.clone(),
                "give exactly one source: `table`, `file` or `http`",
            );
            DirectorySource::Table(Default::default())
        }
    };
    Directory {
        name: name.to_owned(),
        source,
        cache: cache.unwrap_or_default(),
    }
}

fn shard_set(
    ctx: &mut Ctx,
    name: &str,
    s: &FileShardSet,
    clusters: &[String],
    directories: &[String],
) -> Option<ShardSet> {
    let field = format!("shard_sets.{name}");
    let key = shard_key(ctx, &s.key, &format!("{field}.key"));
    let shard_names: Vec<String> = s.shards.value.keys().cloned().collect();
    if shard_names.is_empty() {
        ctx.err(
            &s.shards,
            format!("{field}.shards"),
            "a shard set needs at least one shard",
        );
    }
    let shards: Vec<Shard> = s
        .shards
        .value
        .iter()
        .map(|(n, sh)| Shard {
            name: n.clone(),
            cluster: cluster_ref(
                ctx,
                &sh.cluster,
                &format!("{field}.shards.{n}.cluster"),
                clusters,
            )
            .unwrap_or(0),
            region: sh.region.as_ref().map(|r| r.value.clone()),
        })
        .collect();
    let shard_ref = |ctx: &mut Ctx, v: &S<String>, f: String| -> Option<ShardId> {
        let found = shard_names.iter().position(|n| *n == v.value);
        if found.is_none() {
            ctx.err(
                v,
                f,
                format!(
                    "unknown shard `{}` (shards: {})",
                    v.value,
                    shard_names.join(", ")
                ),
            );
        }
        found
    };
    let values = s
        .directory_values
        .as_ref()
        .map(|v| v.value.as_str())
        .unwrap_or("region");
    let hash = s.hash.as_ref().is_some_and(|h| h.value);
    let locate = match (&s.directory, hash) {
        (Some(d), false) => {
            let id = match directories.iter().position(|n| *n == d.value) {
                Some(id) => id,
                None => {
                    let known = if directories.is_empty() {
                        "no directories are defined".to_owned()
                    } else {
                        format!("known: {}", directories.join(", "))
                    };
                    ctx.err(
                        d,
                        format!("{field}.directory"),
                        format!("unknown directory `{}` ({known})", d.value),
                    );
                    0
                }
            };
            match values {
                "region" => Locate::Region(id),
                "shard" => Locate::Shard(id),
                other => {
                    if let Some(v) = &s.directory_values {
                        ctx.err(
                            v,
                            format!("{field}.directory_values"),
                            format!("`{other}`: use `region` or `shard`"),
                        );
                    }
                    Locate::Region(id)
                }
            }
        }
        (None, true) => Locate::Hash,
        (Some(d), true) => {
            ctx.err(
                d,
                format!("{field}.directory"),
                "give `directory` or `hash: true`, not both",
            );
            Locate::Hash
        }
        (None, false) => {
            ctx.err(
                &s.key,
                format!("{field}.directory"),
                "a shard set needs `directory` (key → region or shard) or `hash: true`",
            );
            Locate::Hash
        }
    };
    let mut residency = Residency::default();
    match (&s.residency, locate) {
        (Some(r), Locate::Region(_)) => {
            for (region, list) in &r.value {
                let ids: Vec<ShardId> = list
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| {
                        shard_ref(ctx, v, format!("{field}.residency.{region}[{i}]"))
                    })
                    .collect();
                if list.is_empty() {
                    ctx.err(
                        r,
                        format!("{field}.residency.{region}"),
                        "name at least one shard (to refuse a region, leave it out)",
                    );
                }
                if region == "*" {
                    residency.default = Some(ids);
                } else {
                    residency.rules.push((region.clone(), ids));
                }
            }
        }
        (None, Locate::Region(_)) => {
            ctx.err(
                &s.shards,
                format!("{field}.residency"),
                "a directory of regions needs `residency`: region → allowed shards (\"*\" for the rest)",
            );
        }
        (Some(r), _) => {
            ctx.err(
                r,
                format!("{field}.residency"),
                "residency applies when the directory gives regions (`directory_values: region`)",
            );
        }
        (None, _) => {}
    }
    let default_shard = s
        .default_shard
        .as_ref()
        .and_then(|d| shard_ref(ctx, d, format!("{field}.default_shard")));
    Some(ShardSet {
        name: name.to_owned(),
        key: key?,
        locate,
        default_shard,
        unknown_key_region: s.unknown_key_region.as_ref().map(|r| r.value.clone()),
        shards,
        residency,
    })
}

fn split(ctx: &mut Ctx, name: &str, s: &FileSplit, clusters: &[String]) -> Option<Split> {
    let field = format!("splits.{name}");
    let key = s
        .key
        .as_ref()
        .and_then(|k| shard_key(ctx, k, &format!("{field}.key")));
    if s.variants.value.is_empty() {
        ctx.err(
            &s.variants,
            format!("{field}.variants"),
            "a split needs at least one variant",
        );
        return None;
    }
    let mut variants = Vec::with_capacity(s.variants.value.len());
    let mut listed: Vec<(&S<String>, usize)> = Vec::new();
    for (i, (vname, v)) in s.variants.value.iter().enumerate() {
        let vf = format!("{field}.variants.{vname}");
        let cluster = cluster_ref(ctx, &v.value.cluster, &format!("{vf}.cluster"), clusters);
        let weight = v.value.weight.as_ref().map_or(0, |w| w.value);
        for k in v.value.keys.iter().flatten() {
            if s.key.is_none() {
                ctx.err(
                    k,
                    format!("{vf}.keys"),
                    "an allow list needs the split's `key` (whose request it is)",
                );
                break;
            }
            if let Err(e) = crate::shard::key::check(std::borrow::Cow::Borrowed(&k.value)) {
                let why = match e {
                    crate::shard::key::KeyError::Missing => "an empty key".to_owned(),
                    crate::shard::key::KeyError::Invalid(m)
                    | crate::shard::key::KeyError::Unauthorized(m) => m,
                };
                ctx.err(k, format!("{vf}.keys"), format!("`{}`: {why}", k.value));
            }
            listed.push((k, i));
        }
        variants.push(Variant {
            name: vname.clone(),
            cluster: cluster.unwrap_or(0),
            weight,
        });
    }
    listed.sort_by(|a, b| a.0.value.cmp(&b.0.value));
    for pair in listed.windows(2) {
        if pair[0].0.value == pair[1].0.value && pair[0].1 != pair[1].1 {
            let (a, b) = (&variants[pair[0].1].name, &variants[pair[1].1].name);
            ctx.err(
                pair[1].0,
                format!("splits.{name}.variants.{b}.keys"),
                format!(
                    "`{}` is also on the allow list of `{a}`: give a key one variant",
                    pair[1].0.value
                ),
            );
        }
    }
    let mut allow: Vec<(Box<str>, usize)> = listed
        .iter()
        .map(|(k, i)| (k.value.as_str().into(), *i))
        .collect();
    allow.dedup_by(|a, b| a.0 == b.0);
    let total_weight: u64 = variants.iter().map(|v| u64::from(v.weight)).sum();
    if total_weight == 0 {
        ctx.err(
            &s.variants,
            format!("{field}.variants"),
            "every weight is 0 (or missing): give at least one variant a weight above 0",
        );
    }
    let variant_ref = |ctx: &mut Ctx, v: &S<String>, f: String| {
        let found = variants.iter().position(|x| x.name == v.value);
        if found.is_none() {
            let names: Vec<&str> = variants.iter().map(|x| x.name.as_str()).collect();
            ctx.err(
                v,
                f,
                format!(
                    "unknown variant `{}` (variants: {})",
                    v.value,
                    names.join(", ")
                ),
            );
        }
        found
    };
    let unkeyed = s
        .unkeyed
        .as_ref()
        .and_then(|u| variant_ref(ctx, u, format!("{field}.unkeyed")));
    let override_ = s.override_.as_ref().and_then(|o| {
        let of = format!("{field}.override");
        match (&o.value.header, &o.value.cookie) {
            (Some(h), None) => {
                match HeaderName::from_bytes(h.value.to_ascii_lowercase().as_bytes()) {
                    Ok(n) => Some(VariantOverride::Header(n)),
                    Err(_) => {
                        ctx.err(
                            h,
                            format!("{of}.header"),
                            format!("`{}` is not a header name", h.value),
                        );
                        None
                    }
                }
            }
            (None, Some(c)) => Some(VariantOverride::Cookie(c.value.clone())),
            _ => {
                ctx.err(o, of, "give exactly one of `header`, `cookie`");
                None
            }
        }
    });
    Some(Split {
        name: name.to_owned(),
        key,
        variants,
        total_weight: total_weight.max(1),
        override_,
        unkeyed,
        allow,
        salt: crate::balance::stable_hash(name.as_bytes()),
    })
}

fn shard_key(ctx: &mut Ctx, k: &S<FileKey>, field: &str) -> Option<KeySource> {
    let v = &k.value;
    let count = [
        v.header.is_some(),
        v.query.is_some(),
        v.cookie.is_some(),
        v.capture.is_some(),
        v.jwt.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if count != 1 {
        ctx.err(
            k,
            field,
            "give exactly one of `header`, `query`, `cookie`, `capture`, `jwt`",
        );
        return None;
    }
    if let Some(h) = &v.header {
        return match HeaderName::from_bytes(h.value.to_ascii_lowercase().as_bytes()) {
            Ok(n) => Some(KeySource::Header(n)),
            Err(_) => {
                ctx.err(
                    h,
                    format!("{field}.header"),
                    format!("`{}` is not a header name", h.value),
                );
                None
            }
        };
    }
    if let Some(q) = &v.query {
        return Some(KeySource::Query(q.value.clone()));
    }
    if let Some(c) = &v.cookie {
        return Some(KeySource::Cookie(c.value.clone()));
    }
    if let Some(c) = &v.capture {
        return Some(KeySource::Capture(c.value.clone()));
    }
    let j = v.jwt.as_ref()?;
    let jf = format!("{field}.jwt");
    let jv = &j.value;
    let header = match &jv.header {
        None => http::header::AUTHORIZATION,
        Some(h) => match HeaderName::from_bytes(h.value.to_ascii_lowercase().as_bytes()) {
            Ok(n) => n,
            Err(_) => {
                ctx.err(h, format!("{jf}.header"), "not a header name");
                return None;
            }
        },
    };
    let choices = [
        jv.hs256_secret_env.is_some(),
        jv.hs256_secret_file.is_some(),
        jv.rs256_public_key_file.is_some(),
        jv.es256_public_key_file.is_some(),
        jv.unverified_claims_behind_trusted_gateway
            .as_ref()
            .is_some_and(|u| u.value),
    ];
    if choices.iter().filter(|c| **c).count() != 1 {
        ctx.err(
            j,
            &jf,
            "give exactly one key: `hs256_secret_env`, `hs256_secret_file`, `rs256_public_key_file`, \
             `es256_public_key_file`, or `unverified_claims_behind_trusted_gateway: true`",
        );
        return None;
    }
    let read = |ctx: &mut Ctx, f: &S<String>, name: &str| -> Option<Vec<u8>> {
        match std::fs::read(&f.value) {
            Ok(b) => Some(b),
            Err(e) => {
                ctx.err(
                    f,
                    format!("{jf}.{name}"),
                    format!("cannot read `{}`: {e}", f.value),
                );
                None
            }
        }
    };
    let verify = if let Some(env) = &jv.hs256_secret_env {
        match std::env::var(&env.value) {
            Ok(s) if !s.is_empty() => JwtVerify::Hs256(s.into_bytes()),
            _ => {
                ctx.err(
                    env,
                    format!("{jf}.hs256_secret_env"),
                    format!("environment variable `{}` is not set", env.value),
                );
                return None;
            }
        }
    } else if let Some(f) = &jv.hs256_secret_file {
        JwtVerify::Hs256(read(ctx, f, "hs256_secret_file")?.trim_ascii().to_vec())
    } else if let Some(f) = &jv.rs256_public_key_file {
        let pem = read(ctx, f, "rs256_public_key_file")?;
        if jsonwebtoken::DecodingKey::from_rsa_pem(&pem).is_err() {
            ctx.err(
                f,
                format!("{jf}.rs256_public_key_file"),
                "not an RSA public key in PEM",
            );
            return None;
        }
        JwtVerify::Rs256(pem)
    } else if let Some(f) = &jv.es256_public_key_file {
        let pem = read(ctx, f, "es256_public_key_file")?;
        if jsonwebtoken::DecodingKey::from_ec_pem(&pem).is_err() {
            ctx.err(
                f,
                format!("{jf}.es256_public_key_file"),
                "not an EC public key in PEM",
            );
            return None;
        }
        JwtVerify::Es256(pem)
    } else {
        JwtVerify::UnverifiedBehindTrustedGateway
    };
    Some(KeySource::Jwt(JwtKey {
        header,
        claim: jv.claim.value.clone(),
        verify,
    }))
}

fn batch(ctx: &mut Ctx, b: &S<FileBatch>, field: &str) -> Option<Batch> {
    let v = &b.value;
    let keys = match (&v.query, &v.json_body) {
        (Some(q), None) => BatchKeys::Query {
            name: q.value.clone(),
            separator: v
                .separator
                .as_ref()
                .map(|s| s.value.clone())
                .unwrap_or_else(|| ",".into()),
        },
        (None, Some(p)) => {
            if !p.value.starts_with('/') {
                ctx.err(
                    p,
                    format!("{field}.json_body"),
                    "a JSON pointer, e.g. `/users`",
                );
            }
            BatchKeys::JsonBody {
                pointer: p.value.clone(),
            }
        }
        _ => {
            ctx.err(
                b,
                field,
                "give exactly one of `query` or `json_body` (where the keys are)",
            );
            return None;
        }
    };
    if let Some(s) = &v.separator {
        if s.value.is_empty() {
            ctx.err(s, format!("{field}.separator"), "must not be empty");
        }
    }
    let merge = match v.merge.as_ref().map(|m| m.value.as_str()) {
        None | Some("concat") => Merge::Concat {
            items: v.items.as_ref().map(|i| i.value.clone()),
        },
        Some("object") => {
            if let Some(i) = &v.items {
                ctx.err(
                    i,
                    format!("{field}.items"),
                    "`items` goes with `merge: concat`",
                );
            }
            Merge::Object
        }
        Some(other) => {
            if let Some(m) = &v.merge {
                ctx.err(
                    m,
                    format!("{field}.merge"),
                    format!("`{other}`: use `concat` or `object`"),
                );
            }
            return None;
        }
    };
    Some(Batch {
        keys,
        merge,
        partial_field: v
            .partial_field
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_else(|| "_partial".into()),
        timeout: ctx.duration(
            &v.timeout,
            format!("{field}.timeout"),
            Duration::from_secs(2),
        ),
        max_keys: v.max_keys.as_ref().map(|m| m.value as usize).unwrap_or(100),
        max_bytes: v
            .max_bytes
            .as_ref()
            .map(|m| m.value as usize)
            .unwrap_or(4 << 20),
    })
}

fn retry_policy(ctx: &mut Ctx, r: &S<FileRetry>, field: &str, base: &RetryPolicy) -> RetryPolicy {
    let v = &r.value;
    let mut p = base.clone();
    if let Some(a) = &v.attempts {
        if a.value == 0 || a.value > 10 {
            ctx.err(
                a,
                format!("{field}.attempts"),
                "between 1 (no retries) and 10 tries",
            );
        } else {
            p.attempts = a.value;
        }
    }
    if let Some(on) = &v.on {
        p.on_connect_failure = false;
        p.on_reset = false;
        p.on_timeout = false;
        p.statuses.clear();
        for (i, o) in on.iter().enumerate() {
            match o.value.as_str() {
                "connect-failure" => p.on_connect_failure = true,
                "reset" => p.on_reset = true,
                "timeout" => p.on_timeout = true,
                "5xx" => p.statuses.extend(500..600),
                s => match s.parse::<u16>() {
                    Ok(code) if (100..600).contains(&code) => p.statuses.push(code),
                    _ => ctx.err(
                        o,
                        format!("{field}.on[{i}]"),
                        format!("`{s}`: use connect-failure, reset, timeout, 5xx or a status code"),
                    ),
                },
            }
        }
    }
    if let Some(codes) = &v.grpc {
        p.grpc.clear();
        for (i, g) in codes.iter().enumerate() {
            match grpc_code(&g.value) {
                Some(c) => p.grpc.push(c),
                None => ctx.err(
                    g,
                    format!("{field}.grpc[{i}]"),
                    format!("`{}` is not a gRPC status", g.value),
                ),
            }
        }
    }
    p.backoff_base = ctx.duration(
        &v.backoff_base,
        format!("{field}.backoff_base"),
        p.backoff_base,
    );
    p.backoff_max = ctx.duration(
        &v.backoff_max,
        format!("{field}.backoff_max"),
        p.backoff_max,
    );
    if let Some(b) = &v.budget_ratio {
        if !(0.0..=1.0).contains(&b.value) {
            ctx.err(
                b,
                format!("{field}.budget_ratio"),
                "a ratio between 0 and 1, e.g. 0.2",
            );
        } else {
            p.budget_permille = (b.value * 1000.0).round() as u32;
        }
    }
    if let Some(m) = &v.budget_min_per_second {
        p.budget_min_per_second = m.value;
    }
    if let Some(h) = &v.idempotency_header {
        match HeaderName::from_bytes(h.value.to_ascii_lowercase().as_bytes()) {
            Ok(n) => p.idempotency_header = n,
            Err(_) => ctx.err(
                h,
                format!("{field}.idempotency_header"),
                "not a header name",
            ),
        }
    }
    if let Some(m) = &v.max_body {
        p.max_body = m.value as usize;
    }
    p
}

fn grpc_code(s: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid-argument",
        "deadline-exceeded",
        "not-found",
        "already-exists",
        "permission-denied",
        "resource-exhausted",
        "failed-precondition",
        "aborted",
        "out-of-range",
        "unimplemented",
        "internal",
        "unavailable",
        "data-loss",
        "unauthenticated",
    ];
    s.parse::<u32>().ok().filter(|c| *c < 17).or_else(|| {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(&s.replace('_', "-")))
            .map(|i| i as u32)
    })
}

fn breaker_policy(ctx: &mut Ctx, b: &S<FileBreaker>, field: &str) -> BreakerPolicy {
    let v = &b.value;
    let d = BreakerPolicy::default();
    let rate = match &v.failure_rate {
        Some(r) if !(0.0..=1.0).contains(&r.value) => {
            ctx.err(
                r,
                format!("{field}.failure_rate"),
                "a ratio between 0 and 1 (0: off)",
            );
            d.failure_rate_permille
        }
        Some(r) => (r.value * 1000.0).round() as u32,
        None => d.failure_rate_permille,
    };
    let probes = match &v.half_open_probes {
        Some(p) if p.value == 0 => {
            ctx.err(p, format!("{field}.half_open_probes"), "at least 1");
            1
        }
        Some(p) => p.value,
        None => d.half_open_probes,
    };
    let p = BreakerPolicy {
        consecutive_failures: v
            .consecutive_failures
            .as_ref()
            .map(|c| c.value)
            .unwrap_or(d.consecutive_failures),
        failure_rate_permille: rate,
        window: ctx.duration(&v.window, format!("{field}.window"), d.window),
        min_requests: v
            .min_requests
            .as_ref()
            .map(|m| m.value)
            .unwrap_or(d.min_requests),
        open_for: ctx.duration(&v.open_for, format!("{field}.open_for"), d.open_for),
        max_open_for: ctx.duration(
            &v.max_open_for,
            format!("{field}.max_open_for"),
            d.max_open_for,
        ),
        half_open_probes: probes,
    };
    if p.consecutive_failures == 0 && p.failure_rate_permille == 0 {
        ctx.err(
            b,
            field,
            "the breaker can never trip: set consecutive_failures or failure_rate",
        );
    }
    p
}

fn outlier(ctx: &mut Ctx, o: &S<FileOutlier>, field: &str) -> Outlier {
    let v = &o.value;
    let d = Outlier::default();
    let pct = match &v.max_ejected_percent {
        Some(p) if p.value > 100 => {
            ctx.err(
                p,
                format!("{field}.max_ejected_percent"),
                "a percentage, 0 to 100",
            );
            d.max_ejected_percent
        }
        Some(p) => p.value,
        None => d.max_ejected_percent,
    };
    Outlier {
        breaker: BreakerPolicy {
            consecutive_failures: v
                .consecutive_errors
                .as_ref()
                .map(|c| c.value.max(1))
                .unwrap_or(d.breaker.consecutive_failures),
            open_for: ctx.duration(
                &v.base_ejection,
                format!("{field}.base_ejection"),
                d.breaker.open_for,
            ),
            max_open_for: ctx.duration(
                &v.max_ejection,
                format!("{field}.max_ejection"),
                d.breaker.max_open_for,
            ),
            ..d.breaker
        },
        max_ejected_percent: pct,
    }
}

fn rate_limit(ctx: &mut Ctx, r: &S<FileRateLimit>, field: &str) -> Option<RateLimit> {
    let v = &r.value;
    let rps = v.requests_per_second.value;
    if rps.is_nan() || rps <= 0.0 {
        ctx.err(
            &v.requests_per_second,
            format!("{field}.requests_per_second"),
            "must be more than 0",
        );
        return None;
    }
    let per = v
        .per
        .as_ref()
        .and_then(|p| hash_on(ctx, p, &format!("{field}.per")));
    Some(RateLimit {
        per_second: v.requests_per_second.value,
        burst: v
            .burst
            .as_ref()
            .map(|b| b.value.max(1))
            .unwrap_or_else(|| v.requests_per_second.value.ceil() as u32),
        per,
        max_keys: v
            .max_keys
            .as_ref()
            .map(|m| m.value as usize)
            .unwrap_or(10_000),
    })
}

fn fallback(ctx: &mut Ctx, f: &S<FileFallback>, field: &str) -> Option<Fallback> {
    let v = &f.value;
    let status = match &v.status {
        None => http::StatusCode::OK,
        Some(s) => match http::StatusCode::from_u16(s.value) {
            Ok(st) => st,
            Err(_) => {
                ctx.err(s, format!("{field}.status"), "not an HTTP status");
                return None;
            }
        },
    };
    let content_type = v
        .content_type
        .as_ref()
        .map(|c| c.value.as_str())
        .unwrap_or("application/json");
    let Ok(content_type) = HeaderValue::from_str(content_type) else {
        if let Some(c) = &v.content_type {
            ctx.err(c, format!("{field}.content_type"), "not a header value");
        }
        return None;
    };
    Some(Fallback {
        status,
        body: bytes::Bytes::from(v.body.as_ref().map(|b| b.value.clone()).unwrap_or_default()),
        content_type,
    })
}
