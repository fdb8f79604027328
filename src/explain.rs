//! `attache explain`: what a request would get, computed by the same decision code the proxy
//! runs ([`route::select`], [`balance::pick`]), without sending anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicUsize;

use serde::Serialize;

use crate::balance::{self, stable_hash, Candidate};
use crate::config::{format_duration, Balance, Config, Destination, ListenerKind, PathMatch};
use crate::route::{self, RequestHead};

/// The decision for one request, for people (`Display`) and machines (`Serialize`).
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub request: String,
    pub listener: Option<String>,
    pub listener_address: Option<String>,
    pub routes: Vec<RouteCheck>,
    pub route: Option<String>,
    pub captures: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitChoice>,
    pub cluster: Option<ClusterChoice>,
    pub upstream_path: Option<String>,
    pub timeout: Option<String>,
    /// What happens: `forward`, or the status and reason attache would answer with.
    pub outcome: String,
}

/// One route tried, in order.
#[derive(Debug, Serialize)]
pub struct RouteCheck {
    pub name: String,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ClusterChoice {
    pub name: String,
    pub protocol: String,
    pub balance: String,
    pub endpoints: Vec<String>,
    /// The endpoint the balance would pick when it is deterministic (consistent hash).
    pub endpoint: Option<String>,
    pub hash_key: Option<String>,
    pub connect_timeout: String,
    /// The retry, breaker, ejection and limit policies that apply, in words.
    pub policies: Vec<String>,
}

struct Static {
    identity: u64,
}

impl Candidate for Static {
    fn available(&self) -> bool {
        true
    }
    fn load(&self) -> u32 {
        0
    }
    fn identity(&self) -> u64 {
        self.identity
    }
}

/// Explains `req` against `config`.
pub fn explain(config: &Config, req: &http::Request<()>) -> Explanation {
    let request = format!("{} {}", req.method(), req.uri());
    let port = req.uri().port_u16();
    let listener = config
        .listeners
        .iter()
        .filter(|l| matches!(l.kind, ListenerKind::Http { .. }))
        .find(|l| Some(l.address.port()) == port)
        .or_else(|| {
            config
                .listeners
                .iter()
                .find(|l| matches!(l.kind, ListenerKind::Http { .. }))
        });
    let mut out = Explanation {
        request,
        listener: listener.map(|l| l.name.clone()),
        listener_address: listener.map(|l| l.address.to_string()),
        routes: Vec::new(),
        route: None,
        captures: BTreeMap::new(),
        shards: None,
        split: None,
        cluster: None,
        upstream_path: None,
        timeout: None,
        outcome: String::new(),
    };
    let Some(ListenerKind::Http { routes, .. }) = listener.map(|l| &l.kind) else {
        out.outcome = "no HTTP listener in this config".into();
        return out;
    };
    let head = RequestHead::new(req.method(), req.uri(), req.headers());
    let decision = route::select(routes, &head);
    for (i, r) in routes.iter().enumerate() {
        let result = route::check(&r.matcher, &head);
        out.routes.push(RouteCheck {
            name: r.name.clone(),
            matched: result.is_ok(),
            why_not: result.err().map(|m| m.describe(&r.matcher)),
        });
        if decision.is_some_and(|d| d.route == i) {
            break;
        }
    }
    let Some(decision) = decision else {
        out.outcome = "404 no-route".into();
        return out;
    };
    let r = &routes[decision.route];
    out.route = Some(r.name.clone());
    if let Some(PathMatch::Template(t)) = &r.matcher.path {
        for (name, value) in decision.captures.iter(head.path) {
            out.captures
                .insert(t.names()[name].clone(), value.to_owned());
        }
    }
    out.upstream_path = Some(match (&r.rewrite_prefix, &r.matcher.path) {
        (Some(to), Some(PathMatch::Prefix(from))) => {
            route::rewrite_prefix(head.path, from, to).into_owned()
        }
        _ => head.path.to_owned(),
    });
    out.timeout = Some(format_duration(r.timeout));
    let c = match r.destination {
        Destination::Cluster(c) => c,
        Destination::Shards(set_id) => {
            let set = &config.shard_sets[set_id];
            let choice = explain_shards(config, set, &head, &decision.captures, r);
            let chosen = choice.chosen.clone();
            out.outcome = choice.outcome.clone();
            out.shards = Some(choice);
            match chosen.and_then(|n| set.shards.iter().find(|s| s.name == n)) {
                Some(s) => s.cluster,
                None => return out,
            }
        }
        Destination::Split(split_id) => {
            let split = &config.splits[split_id];
            let choice = crate::split::choose(split, &head, &decision.captures, r);
            let key = split.key.as_ref().and_then(|k| {
                crate::shard::key::extract(k, &head, &decision.captures, r)
                    .ok()
                    .map(|k| k.into_owned())
            });
            let variant = &split.variants[choice.variant];
            let weights = split
                .variants
                .iter()
                .map(|v| {
                    let pct = 100.0 * f64::from(v.weight) / split.total_weight as f64;
                    let pct = (pct * 100.0).round() / 100.0;
                    format!("{} {pct}% → {}", v.name, config.clusters[v.cluster].name)
                })
                .collect();
            out.split = Some(SplitChoice {
                split: split.name.clone(),
                key_source: split.key.as_ref().map(|k| k.to_string()),
                key,
                variant: variant.name.clone(),
                why: match choice.why {
                    crate::split::Why::Random => {
                        "no key: drawn by weight per request (this one is an example)".into()
                    }
                    w => w.as_str().into(),
                },
                weights,
            });
            variant.cluster
        }
    };
    let cluster = &config.clusters[c];
    let hash_key = match &cluster.balance {
        Balance::ConsistentHash(on) => {
            route::key_value(on, &head, &decision.captures, r).map(|v| v.into_owned())
        }
        _ => None,
    };
    let endpoints: Vec<String> = cluster.endpoints.iter().map(|e| e.to_string()).collect();
    let endpoint = hash_key.as_ref().and_then(|k| {
        let statics: Vec<Static> = endpoints
            .iter()
            .map(|e| Static {
                identity: balance::identity_of(e),
            })
            .collect();
        balance::pick(
            &cluster.balance,
            &statics,
            &AtomicUsize::new(0),
            Some(stable_hash(k.as_bytes())),
            None,
        )
        .map(|i| endpoints[i].clone())
    });
    out.cluster = Some(ClusterChoice {
        name: cluster.name.clone(),
        protocol: format!("{:?}", cluster.protocol).to_lowercase(),
        balance: match &cluster.balance {
            Balance::ConsistentHash(on) => format!("consistent_hash on {on}"),
            b => b.name().to_owned(),
        },
        endpoints,
        endpoint,
        hash_key,
        connect_timeout: format_duration(cluster.connect_timeout),
        policies: policies(cluster, r),
    });
    if out.outcome.is_empty() {
        out.outcome = "forward".into();
    }
    out
}

/// The split part of an explanation.
#[derive(Debug, Serialize)]
pub struct SplitChoice {
    pub split: String,
    pub key_source: Option<String>,
    pub key: Option<String>,
    pub variant: String,
    /// `override`, `allow-list`, `weight`, `unkeyed`, or the per-request draw.
    pub why: String,
    /// Each variant's share of keyed traffic and its cluster.
    pub weights: Vec<String>,
}

/// The shard part of an explanation.
#[derive(Debug, Serialize)]
pub struct ShardChoice {
    pub shard_set: String,
    pub key_source: String,
    pub key: Option<String>,
    pub directory: Option<String>,
    /// The directory's answer (a region or a shard), when explain can know it offline.
    pub located: Option<String>,
    /// How the directory would be asked, for lookup services.
    pub lookup: Option<String>,
    pub region: Option<String>,
    pub residency: BTreeMap<String, Vec<String>>,
    pub allowed: Vec<String>,
    /// The first allowed shard: the one taken while it is healthy.
    pub chosen: Option<String>,
    pub failover: Vec<String>,
    pub outcome: String,
}

fn explain_shards(
    config: &Config,
    set: &crate::config::ShardSet,
    head: &RequestHead<'_>,
    captures: &crate::route::Captures,
    route: &crate::config::Route,
) -> ShardChoice {
    use crate::config::{DirectorySource, Locate};
    let names = |ids: &[usize]| {
        ids.iter()
            .map(|i| set.shards[*i].name.clone())
            .collect::<Vec<_>>()
    };
    let mut c = ShardChoice {
        shard_set: set.name.clone(),
        key_source: set.key.to_string(),
        key: None,
        directory: None,
        located: None,
        lookup: None,
        region: None,
        residency: set
            .residency
            .rules
            .iter()
            .map(|(r, ids)| (r.clone(), names(ids)))
            .collect(),
        allowed: Vec::new(),
        chosen: None,
        failover: Vec::new(),
        outcome: String::new(),
    };
    if let Some(d) = &set.residency.default {
        c.residency.insert("*".into(), names(d));
    }
    if route.batch.is_some() {
        c.outcome =
            "scatter-gather: keys are grouped by shard; each group follows the rules above".into();
        return c;
    }
    let key = match crate::shard::key::extract(&set.key, head, captures, route) {
        Ok(k) => k.into_owned(),
        Err(crate::shard::KeyError::Missing) => {
            match set.default_shard {
                Some(d) => {
                    c.allowed = vec![set.shards[d].name.clone()];
                    c.chosen = Some(set.shards[d].name.clone());
                    c.outcome = "forward (no key: the default shard)".into();
                }
                None => c.outcome = "400 shard-key-missing".into(),
            }
            return c;
        }
        Err(e) => {
            c.outcome = format!("{e:?}");
            return c;
        }
    };
    c.key = Some(key.clone());
    let dir = match set.locate {
        Locate::Region(d) | Locate::Shard(d) => Some(&config.directories[d]),
        Locate::Hash => None,
    };
    let located: Option<Option<String>> = dir.and_then(|d| {
        c.directory = Some(d.name.clone());
        match &d.source {
            DirectorySource::Table(t) => Some(t.get(&key).cloned()),
            DirectorySource::File(p) => crate::shard::directory::read_table_file(p)
                .ok()
                .map(|t| t.get(&key).map(|v| v.to_string())),
            DirectorySource::Http { cluster, path, .. } => {
                c.lookup = Some(format!(
                    "GET {}{} on cluster {} (cached; not sent by explain)",
                    "",
                    crate::shard::directory::lookup_path(path, &key),
                    config.clusters[*cluster].name
                ));
                None
            }
        }
    });
    let allowed: Vec<usize> = match (set.locate, located) {
        (Locate::Hash, _) => {
            let k = stable_hash(key.as_bytes());
            let id = (0..set.shards.len())
                .max_by_key(|&i| balance::mix(k ^ balance::identity_of(&set.shards[i].name)))
                .unwrap_or(0);
            vec![id]
        }
        (_, None) => {
            c.outcome = "forward to the allowed shards of the region the lookup service gives (see residency)".into();
            return c;
        }
        (Locate::Shard(_), Some(v)) => {
            c.located = v.clone();
            match v.and_then(|n| set.shards.iter().position(|s| s.name == n)) {
                Some(id) => vec![id],
                None => {
                    c.outcome = "404 shard-key-unknown".into();
                    return c;
                }
            }
        }
        (Locate::Region(_), Some(v)) => {
            c.located = v.clone();
            let Some(region) = v.or_else(|| set.unknown_key_region.clone()) else {
                c.outcome = "404 shard-key-unknown".into();
                return c;
            };
            c.region = Some(region.clone());
            match set.residency.allowed(&region) {
                Some(ids) => ids.to_vec(),
                None => {
                    c.outcome = format!("403 residency-denied (no rule for region {region})");
                    return c;
                }
            }
        }
    };
    c.allowed = names(&allowed);
    c.chosen = c.allowed.first().cloned();
    c.failover = c.allowed.iter().skip(1).cloned().collect();
    c.outcome = match c.allowed.len() {
        1 => format!(
            "forward to shard {} only; if it cannot serve: 503 residency-unavailable",
            c.allowed[0]
        ),
        _ => format!(
            "forward to the first available of {}; if none can serve: 503 residency-unavailable",
            c.allowed.join(", ")
        ),
    };
    if !matches!(set.locate, Locate::Region(_)) {
        c.outcome = c
            .outcome
            .replace("residency-unavailable", "shard-unavailable");
    }
    c
}

fn policies(cluster: &crate::config::Cluster, r: &crate::config::Route) -> Vec<String> {
    let mut out = Vec::new();
    let retry = r.retry.as_ref().unwrap_or(&cluster.retry);
    if retry.attempts <= 1 {
        out.push("retry: off".into());
    } else {
        let mut on = Vec::new();
        if retry.on_connect_failure {
            on.push("connect-failure (any method)".to_owned());
        }
        if retry.on_reset {
            on.push("reset".into());
        }
        if retry.on_timeout {
            on.push("timeout".into());
        }
        if !retry.statuses.is_empty() {
            let codes: Vec<String> = retry
                .statuses
                .iter()
                .take(6)
                .map(|s| s.to_string())
                .collect();
            on.push(codes.join("/"));
        }
        out.push(format!(
            "retry: {} tries on {}; idempotent methods or `{}`; backoff {}..{} with jitter; budget {}% + {}/s{}",
            retry.attempts,
            on.join(", "),
            retry.idempotency_header,
            format_duration(retry.backoff_base),
            format_duration(retry.backoff_max),
            retry.budget_permille as f64 / 10.0,
            retry.budget_min_per_second,
            if r.retry.is_some() { " (route override)" } else { "" }
        ));
    }
    if let Some(t) = r.per_try_timeout.or(cluster.per_try_timeout) {
        out.push(format!("per-try timeout {}", format_duration(t)));
    }
    match &cluster.breaker {
        Some(b) => out.push(format!(
            "breaker: opens after {} failures in a row or {}% of ≥{} in {}; open {} (doubling to {}), {} probe(s)",
            b.consecutive_failures,
            b.failure_rate_permille as f64 / 10.0,
            b.min_requests,
            format_duration(b.window),
            format_duration(b.open_for),
            format_duration(b.max_open_for),
            b.half_open_probes
        )),
        None => out.push("breaker: off".into()),
    }
    if let Some(o) = &cluster.outlier {
        out.push(format!(
            "outlier ejection: after {} errors in a row, {} (growing to {}), at most {}% ejected",
            o.breaker.consecutive_failures,
            format_duration(o.breaker.open_for),
            format_duration(o.breaker.max_open_for),
            o.max_ejected_percent
        ));
    }
    if let Some(m) = cluster.max_requests {
        out.push(format!(
            "limit: {m} in flight, {} pending",
            cluster.max_pending
        ));
    }
    if let Some(h) = r.hedge {
        out.push(format!("hedge after {}", format_duration(h)));
    }
    if let Some(l) = &r.rate_limit {
        let per = l
            .per
            .as_ref()
            .map(|p| format!(" per {p}"))
            .unwrap_or_default();
        out.push(format!(
            "rate limit {}/s, burst {}{per}",
            l.per_second, l.burst
        ));
    }
    if let Some(f) = &r.fallback {
        out.push(format!(
            "fallback: {} when the destination cannot serve",
            f.status
        ));
    }
    out
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "request     {}", self.request);
        match (&self.listener, &self.listener_address) {
            (Some(n), Some(a)) => {
                let _ = writeln!(s, "listener    {n} ({a})");
            }
            _ => {
                let _ = writeln!(s, "listener    (none)");
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let label = if i == 0 { "routes" } else { "" };
            let verdict = if r.matched {
                "matched (first match wins)".to_owned()
            } else {
                format!("no: {}", r.why_not.as_deref().unwrap_or(""))
            };
            let _ = writeln!(s, "{label:<11} {:<20} {verdict}", r.name);
        }
        if let Some(r) = &self.route {
            let _ = writeln!(s, "route       {r}");
        }
        if !self.captures.is_empty() {
            let caps: Vec<String> = self
                .captures
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "captures    {}", caps.join(" "));
        }
        if let Some(sh) = &self.shards {
            let _ = writeln!(s, "shard set   {}", sh.shard_set);
            let _ = writeln!(
                s,
                "shard key   {} (from {})",
                sh.key.as_deref().unwrap_or("(none)"),
                sh.key_source
            );
            if let Some(d) = &sh.directory {
                let answer = match (&sh.located, &sh.lookup) {
                    (Some(v), _) => v.clone(),
                    (None, Some(l)) => l.clone(),
                    (None, None) => "(not known)".into(),
                };
                let _ = writeln!(s, "directory   {d}: {answer}");
            }
            if let Some(r) = &sh.region {
                let _ = writeln!(s, "region      {r}");
            }
            let rules: Vec<String> = sh
                .residency
                .iter()
                .map(|(r, v)| format!("{r} → {}", v.join(" | ")))
                .collect();
            if !rules.is_empty() {
                let _ = writeln!(s, "residency   {}", rules.join(";  "));
            }
            if !sh.allowed.is_empty() {
                let _ = writeln!(s, "allowed     {}", sh.allowed.join(", "));
            }
            if let Some(ch) = &sh.chosen {
                let failover = if sh.failover.is_empty() {
                    "no failover outside this list".to_owned()
                } else {
                    format!("failover: {}", sh.failover.join(", "))
                };
                let _ = writeln!(s, "shard       {ch} ({failover})");
            }
        }
        if let Some(sp) = &self.split {
            let _ = writeln!(s, "split       {}", sp.split);
            if let Some(src) = &sp.key_source {
                let _ = writeln!(
                    s,
                    "split key   {} (from {src})",
                    sp.key.as_deref().unwrap_or("(none)")
                );
            }
            let _ = writeln!(s, "weights     {}", sp.weights.join(";  "));
            let _ = writeln!(s, "variant     {} ({})", sp.variant, sp.why);
        }
        if let Some(c) = &self.cluster {
            let _ = writeln!(s, "cluster     {} ({}, {})", c.name, c.protocol, c.balance);
            let _ = writeln!(s, "endpoints   {}", c.endpoints.join(", "));
            if let Some(k) = &c.hash_key {
                let _ = writeln!(s, "hash key    {k}");
            }
            match &c.endpoint {
                Some(e) => {
                    let _ = writeln!(s, "endpoint    {e} (when healthy)");
                }
                None => {
                    let _ = writeln!(
                        s,
                        "endpoint    chosen per request by {}, among healthy endpoints",
                        c.balance
                    );
                }
            }
        }
        if let Some(p) = &self.upstream_path {
            let _ = writeln!(s, "upstream    path {p}");
        }
        if let (Some(t), Some(c)) = (&self.timeout, &self.cluster) {
            let _ = writeln!(
                s,
                "policies    timeout {t} (response head), connect_timeout {}",
                c.connect_timeout
            );
            for p in &c.policies {
                let _ = writeln!(s, "            {p}");
            }
        }
        let _ = write!(s, "outcome     {}", self.outcome);
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn explains_a_template_route_with_consistent_hash() {
        let config = Config::parse(
            r#"
listeners:
  - name: main
    address: 127.0.0.1:10000
    routes:
      - name: health
        match: { path: { exact: /healthz } }
        cluster: images
      - name: by-user
        match: { path: { template: "/images/{user}/{rest*}" } }
        cluster: images
clusters:
  images:
    endpoints: [127.0.0.1:8081, 127.0.0.1:8082, 127.0.0.1:8083]
    balance: consistent_hash
    hash_on: { capture: user }
"#,
            Path::new("t.yaml"),
        )
        .unwrap();
        let req = http::Request::get("http://127.0.0.1:10000/images/priya/a.png")
            .body(())
            .unwrap();
        let e = explain(&config, &req);
        assert_eq!(e.route.as_deref(), Some("by-user"));
        assert_eq!(e.captures["user"], "priya");
        assert_eq!(e.routes.len(), 2);
        assert!(!e.routes[0].matched);
        let c = e.cluster.as_ref().unwrap();
        assert_eq!(c.hash_key.as_deref(), Some("priya"));
        let first = c.endpoint.clone().unwrap();
        // The same key always names the same endpoint.
        let again = explain(&config, &req);
        assert_eq!(again.cluster.unwrap().endpoint.unwrap(), first);
        let text = e.to_string();
        assert!(text.contains("route       by-user"), "{text}");
        assert!(text.contains("outcome     forward"), "{text}");

        let req = http::Request::get("http://127.0.0.1:10000/nothing")
            .body(())
            .unwrap();
        assert_eq!(explain(&config, &req).outcome, "404 no-route");
    }
}
