//! Scatter-gather: a batch request naming many keys is split by shard, sent as one
//! sub-request per shard in parallel (each with its own timeout), and the JSON answers are
//! merged. Keys whose shard cannot serve are left out and named: the answer is partial
//! (`x-attache-partial` and a field in the merged object), never wrong, and never crosses a
//! residency border.

use std::collections::BTreeMap;

use crate::proxy::ClientBody;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use super::key;
use crate::config::{Batch, BatchKeys, Forwarded, Merge, Route, ShardId};
use crate::error::ProxyError;
use crate::proxy::{attempt, ConnCtx};
use crate::state::Snapshot;

/// The header naming the shards whose part of a batch is missing.
pub const PARTIAL_HEADER: &str = "x-attache-partial";

/// Handles a batch request on a shard-set route.
#[allow(clippy::too_many_arguments)]
pub async fn gather(
    req: Request<ClientBody>,
    snap: &Snapshot,
    set_id: usize,
    route: &Route,
    batch: &Batch,
    forwarded: &Forwarded,
    conn: &ConnCtx,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let set = &snap.config.shard_sets[set_id];
    let (parts, body) = req.into_parts();

    // 1. The keys, deduplicated in order, bounded and checked.
    let (keys, body_json) = match &batch.keys {
        BatchKeys::Query { name, separator } => {
            let raw = parts
                .uri
                .query()
                .and_then(|q| crate::route::query_param(q, name))
                .ok_or_else(|| ProxyError::ShardKeyMissing {
                    from: format!("query parameter {name}"),
                })?;
            let keys: Vec<String> = raw
                .split(separator.as_str())
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect();
            (keys, None)
        }
        BatchKeys::JsonBody { pointer } => {
            let bytes = Limited::new(body, batch.max_bytes)
                .collect()
                .await
                .map_err(|_| ProxyError::TooLarge {
                    what: "the request body",
                    max: batch.max_bytes,
                })?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ProxyError::BadRequest(format!("the body is not JSON: {e}")))?;
            let keys = v
                .pointer(pointer)
                .and_then(Value::as_array)
                .ok_or_else(|| ProxyError::ShardKeyMissing {
                    from: format!("JSON array at {pointer}"),
                })?
                .iter()
                .map(|k| match k {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ProxyError::ShardKeyInvalid(format!(
                        "{other} is not a string key"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            (keys, Some(v))
        }
    };
    let mut unique: Vec<String> = Vec::with_capacity(keys.len());
    for k in keys {
        if !unique.contains(&k) {
            unique.push(k);
        }
    }
    if unique.is_empty() {
        return Err(ProxyError::ShardKeyMissing {
            from: "the batch names no key".into(),
        });
    }
    if unique.len() > batch.max_keys {
        return Err(ProxyError::TooManyKeys {
            count: unique.len(),
            max: batch.max_keys,
        });
    }
    for k in &unique {
        key::check(std::borrow::Cow::Borrowed(k.as_str()))
            .map_err(|e| ProxyError::from_refusal(super::Refusal::Key(e), "batch"))?;
    }

    // 2. Each key's allowed shards, then the first available one: grouped by shard.
    let dir = snap.directory_of(set);
    let plans =
        futures_util::future::join_all(unique.iter().map(|k| super::plan_key(set, dir, k))).await;
    let mut groups: BTreeMap<ShardId, Vec<&str>> = BTreeMap::new();
    let mut missing_keys: BTreeMap<String, String> = BTreeMap::new();
    let mut missing_shards: Vec<String> = Vec::new();
    for (k, plan) in unique.iter().zip(plans) {
        match plan {
            Ok(plan) => {
                let available = |id: ShardId| snap.clusters[set.shards[id].cluster].available();
                match super::first_available(&plan.allowed, &[], available) {
                    Some(shard) => groups.entry(shard).or_default().push(k),
                    None => {
                        let reason = if plan.residency {
                            "residency-unavailable"
                        } else {
                            "shard-unavailable"
                        };
                        if plan.residency {
                            conn.shared
                                .metrics
                                .residency_denial(&set.name, plan.region.as_deref().unwrap_or("?"));
                        }
                        missing_keys.insert(k.clone(), reason.into());
                        for &id in &plan.allowed {
                            push_unique(&mut missing_shards, &set.shards[id].name);
                        }
                    }
                }
            }
            Err(r) => {
                missing_keys.insert(
                    k.clone(),
                    ProxyError::from_refusal(r, "batch").reason().into(),
                );
            }
        }
    }

    // 3. One sub-request per shard, in parallel, each bounded by the batch timeout.
    let subs = groups.iter().map(|(&shard, keys)| {
        let sub = sub_request(&parts, batch, keys, body_json.as_ref());
        let cluster = set.shards[shard].cluster;
        async move {
            let stats = &snap.shard_stats[set_id][shard];
            stats.requests.inc();
            let started = std::time::Instant::now();
            let mut in_flight = None;
            let result = tokio::time::timeout(batch.timeout, async {
                let sub = sub?;
                let resp = attempt(
                    sub,
                    snap,
                    cluster,
                    None,
                    route,
                    forwarded,
                    conn,
                    &mut in_flight,
                )
                .await?;
                let status = resp.status();
                let bytes = Limited::new(resp.into_body(), batch.max_bytes)
                    .collect()
                    .await
                    .map_err(|_| ProxyError::TooLarge {
                        what: "a shard's answer",
                        max: batch.max_bytes,
                    })?
                    .to_bytes();
                Ok::<_, ProxyError>((status, bytes))
            })
            .await;
            stats.latency.observe(started.elapsed());
            let outcome = match result {
                Err(_) => Err(format!("no answer within {:?}", batch.timeout)),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok((status, _))) if !status.is_success() => Err(format!("answered {status}")),
                Ok(Ok((_, bytes))) => serde_json::from_slice::<Value>(&bytes)
                    .map_err(|e| format!("answer is not JSON: {e}")),
            };
            if outcome.is_err() {
                stats.errors.inc();
            }
            (shard, outcome)
        }
    });
    let results = futures_util::future::join_all(subs).await;

    // 4. Merge what came back; name what did not.
    let mut answers = Vec::new();
    for (shard, outcome) in results {
        match outcome {
            Ok(v) => answers.push(v),
            Err(e) => {
                tracing::debug!(shard = %set.shards[shard].name, error = %e, "batch part failed");
                push_unique(&mut missing_shards, &set.shards[shard].name);
                for k in &groups[&shard] {
                    missing_keys.insert((*k).to_owned(), "shard-failed".into());
                }
            }
        }
    }
    if answers.is_empty() {
        let detail = if missing_shards.is_empty() {
            "no key could be placed on a shard".to_owned()
        } else {
            format!("failed: {}", missing_shards.join(", "))
        };
        return Err(ProxyError::AllShardsFailed(detail));
    }
    let mut merged = merge(&batch.merge, answers).map_err(ProxyError::BadRequest)?;
    let partial = !missing_keys.is_empty();
    if partial {
        conn.shared.metrics.partial(&set.name);
        if let Value::Object(o) = &mut merged {
            o.insert(
                batch.partial_field.clone(),
                json!({ "missing_shards": missing_shards, "missing_keys": missing_keys }),
            );
        }
    }
    let body = serde_json::to_vec(&merged).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    if body.len() > batch.max_bytes {
        return Err(ProxyError::TooLarge {
            what: "the merged answer",
            max: batch.max_bytes,
        });
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if partial {
        let value = if missing_shards.is_empty() {
            "keys".to_owned()
        } else {
            missing_shards.join(",")
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(PARTIAL_HEADER, v);
        }
    }
    Ok(resp)
}

fn push_unique(list: &mut Vec<String>, name: &str) {
    if !list.iter().any(|n| n == name) {
        list.push(name.to_owned());
    }
}

/// The sub-request for one shard: the batch's keys replaced by that shard's keys.
fn sub_request(
    parts: &http::request::Parts,
    batch: &Batch,
    keys: &[&str],
    body_json: Option<&Value>,
) -> Result<Request<Either<ClientBody, Full<Bytes>>>, ProxyError> {
    let mut headers = parts.headers.clone();
    headers.remove(http::header::CONTENT_LENGTH);
    let (uri, body) = match (&batch.keys, body_json) {
        (BatchKeys::Query { name, separator }, _) => {
            let joined: Vec<String> = keys
                .iter()
                .map(|k| utf8_percent_encode(k, NON_ALPHANUMERIC).to_string())
                .collect();
            let mut query: Vec<String> = parts
                .uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty() && p.split('=').next() != Some(name.as_str()))
                .map(str::to_owned)
                .collect();
            let sep = utf8_percent_encode(separator, NON_ALPHANUMERIC).to_string();
            query.push(format!("{name}={}", joined.join(&sep)));
            let uri = format!("{}?{}", parts.uri.path(), query.join("&"));
            (uri, Bytes::new())
        }
        (BatchKeys::JsonBody { pointer }, Some(v)) => {
            let mut v = v.clone();
            if let Some(slot) = v.pointer_mut(pointer) {
                *slot = json!(keys);
            }
            let body = serde_json::to_vec(&v).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            (
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".into()),
                Bytes::from(body),
            )
        }
        (BatchKeys::JsonBody { .. }, None) => return Err(ProxyError::BadRequest("no body".into())),
    };
    let mut req = Request::new(Either::Right(Full::new(body)));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri
        .parse()
        .map_err(|e| ProxyError::BadRequest(format!("sub-request URI: {e}")))?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Merges the shards' JSON answers.
pub fn merge(how: &Merge, answers: Vec<Value>) -> Result<Value, String> {
    match how {
        Merge::Concat { items: None } => {
            let mut out = Vec::new();
            for a in answers {
                match a {
                    Value::Array(items) => out.extend(items),
                    other => {
                        return Err(format!(
                            "a shard answered {} where an array was expected",
                            kind(&other)
                        ))
                    }
                }
            }
            Ok(Value::Array(out))
        }
        Merge::Concat {
            items: Some(pointer),
        } => {
            let mut all = Vec::new();
            let mut first: Option<Value> = None;
            for a in answers {
                match a.pointer(pointer) {
                    Some(Value::Array(items)) => all.extend(items.iter().cloned()),
                    _ => return Err(format!("a shard's answer has no array at {pointer}")),
                }
                if first.is_none() {
                    first = Some(a);
                }
            }
            let mut merged = first.unwrap_or(Value::Null);
            if let Some(slot) = merged.pointer_mut(pointer) {
                *slot = Value::Array(all);
            }
            Ok(merged)
        }
        Merge::Object => {
            let mut out = serde_json::Map::new();
            for a in answers {
                match a {
                    Value::Object(o) => out.extend(o),
                    other => {
                        return Err(format!(
                            "a shard answered {} where an object was expected",
                            kind(&other)
                        ))
                    }
                }
            }
            Ok(Value::Object(out))
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges() {
        let concat = merge(
            &Merge::Concat { items: None },
            vec![json!([1, 2]), json!([3])],
        )
        .unwrap();
        assert_eq!(concat, json!([1, 2, 3]));
        let items = merge(
            &Merge::Concat {
                items: Some("/images".into()),
            },
            vec![
                json!({"images": [1], "n": 1}),
                json!({"images": [2], "n": 2}),
            ],
        )
        .unwrap();
        assert_eq!(items, json!({"images": [1, 2], "n": 1}));
        let object = merge(&Merge::Object, vec![json!({"a": 1}), json!({"b": 2})]).unwrap();
        assert_eq!(object, json!({"a": 1, "b": 2}));
        assert!(merge(&Merge::Object, vec![json!([1])]).is_err());
    }
}
