//! Traffic splits (beta testing, canaries): which variant of a split a request gets.
//!
//! The decision is attache's, in this order: a header or cookie that names a variant (when
//! the split allows an override), the allow lists, then the request's key against the
//! weights. A key's place on the weight range is a stable hash of the split's name and the
//! key, the same in every sidecar and every version, so a user keeps their variant across
//! requests, restarts and replicas; raising a variant's weight only adds keys to it when it
//! is first or last in name order (the usual two-variant ramp). Requests without a key get
//! the split's `unkeyed` variant, or one drawn by weight per request.

use crate::balance::{mix, stable_hash};
use crate::config::{Route, Split, VariantOverride};
use crate::route::{Captures, RequestHead};
use crate::shard::key;

/// Why a request got its variant (explain, access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The override header or cookie named it.
    Override,
    /// The key is on the variant's allow list.
    AllowList,
    /// The key's place on the weight range.
    Weight,
    /// The request has no key; the split names a variant for that.
    Unkeyed,
    /// The request has no key; drawn by weight.
    Random,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Override => "override",
            Why::AllowList => "allow-list",
            Why::Weight => "weight",
            Why::Unkeyed => "unkeyed",
            Why::Random => "random",
        }
    }
}

/// A variant (index into [`Split::variants`]) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub variant: usize,
    pub why: Why,
}

/// Chooses the variant of `split` for a request. No allocation unless the key is a JWT claim
/// or percent-encoded.
pub fn choose(split: &Split, head: &RequestHead<'_>, captures: &Captures, route: &Route) -> Choice {
    if let Some(variant) = overridden(split, head) {
        return Choice {
            variant,
            why: Why::Override,
        };
    }
    // A key that is missing or unusable (malformed, a JWT that does not verify) makes the
    // request unkeyed: a split picks a version, it does not authorise.
    match split
        .key
        .as_ref()
        .and_then(|k| key::extract(k, head, captures, route).ok())
    {
        Some(k) => by_key(split, &k),
        None => match split.unkeyed {
            Some(variant) => Choice {
                variant,
                why: Why::Unkeyed,
            },
            None => Choice {
                variant: by_weight(split, fastrand::u64(..split.total_weight)),
                why: Why::Random,
            },
        },
    }
}

/// The variant an override header or cookie names, if it names one of this split's.
pub fn overridden(split: &Split, head: &RequestHead<'_>) -> Option<usize> {
    let named = match split.override_.as_ref()? {
        VariantOverride::Header(h) => head.header(h)?,
        VariantOverride::Cookie(c) => head.cookie(c)?,
    };
    let named = named.trim();
    split.variants.iter().position(|v| v.name == named)
}

/// The variant of a key: its allow list, else its place on the weight range.
pub fn by_key(split: &Split, key: &str) -> Choice {
    if let Ok(i) = split.allow.binary_search_by(|(k, _)| (**k).cmp(key)) {
        return Choice {
            variant: split.allow[i].1,
            why: Why::AllowList,
        };
    }
    Choice {
        variant: by_weight(split, bucket(split, key)),
        why: Why::Weight,
    }
}

/// The key's place in `0..total_weight`. The hash is scaled onto the range (not taken modulo
/// it), so a key keeps its fraction of the range when the weights change.
pub fn bucket(split: &Split, key: &str) -> u64 {
    let h = mix(stable_hash(key.as_bytes()) ^ split.salt);
    ((u128::from(h) * u128::from(split.total_weight)) >> 64) as u64
}

/// The variant whose share of the weight range holds `point`.
fn by_weight(split: &Split, point: u64) -> usize {
    let mut end = 0u64;
    for (i, v) in split.variants.iter().enumerate() {
        end += u64::from(v.weight);
        if point < end {
            return i;
        }
    }
    // Unreachable while point < total_weight; the last variant is a safe answer.
    split.variants.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Destination, ListenerKind};
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
listeners:
  - address: 127.0.0.1:10000
    routes:
      - split: feed
clusters:
  v1: {{ endpoints: ["127.0.0.1:1"] }}
  v2: {{ endpoints: ["127.0.0.1:2"] }}
splits:
  feed:
    key: {{ header: x-user }}
{extra}
"#
        );
        Config::parse(&text, Path::new("t.yaml")).expect("valid config")
    }

    fn choose_for(c: &Config, headers: &[(&str, &str)]) -> Choice {
        let mut req = http::Request::builder().uri("/feed");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(()).expect("request");
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        let ListenerKind::Http { routes, .. } = &c.listeners[0].kind else {
            panic!("http listener")
        };
        assert_eq!(routes[0].destination, Destination::Split(0));
        let d = crate::route::select(routes, &head).expect("route");
        choose(&c.splits[0], &head, &d.captures, &routes[d.route])
    }

    const NINETY_TEN: &str = "    variants:\n      stable: { cluster: v1, weight: 90 }\n      beta: { cluster: v2, weight: 10, keys: [alice] }\n    override: { header: x-variant }";

    #[test]
    fn a_key_keeps_its_variant_and_weights_hold_over_many_keys() {
        let c = config(NINETY_TEN);
        let split = &c.splits[0];
        let beta = split
            .variants
            .iter()
            .position(|v| v.name == "beta")
            .unwrap();
        let mut in_beta = 0;
        for i in 0..20_000 {
            let k = format!("user-{i}");
            let first = by_key(split, &k);
            assert_eq!(first, by_key(split, &k), "sticky");
            assert_eq!(first.why, Why::Weight);
            in_beta += usize::from(first.variant == beta);
        }
        // 10 % of 20,000 = 2,000; a fair hash stays well within ±10 %.
        assert!(
            (1_800..=2_200).contains(&in_beta),
            "{in_beta} of 20000 in beta"
        );
    }

    #[test]
    fn raising_the_beta_weight_keeps_every_beta_user() {
        let ten = config(NINETY_TEN);
        let twenty = config(
            &NINETY_TEN
                .replace("weight: 10", "weight: 20")
                .replace("90", "80"),
        );
        let beta = |c: &Config| c.splits[0].variants.iter().position(|v| v.name == "beta");
        let mut kept = 0;
        for i in 0..5_000 {
            let k = format!("u{i}");
            if by_key(&ten.splits[0], &k).variant == beta(&ten).unwrap() {
                assert_eq!(
                    by_key(&twenty.splits[0], &k).variant,
                    beta(&twenty).unwrap()
                );
                kept += 1;
            }
        }
        assert!(kept > 300, "{kept}");
    }

    #[test]
    fn override_then_allow_list_then_weight_then_unkeyed() {
        let c = config(&format!("{NINETY_TEN}\n    unkeyed: stable"));
        let names = |ch: Choice| (c.splits[0].variants[ch.variant].name.clone(), ch.why);
        assert_eq!(
            names(choose_for(&c, &[("x-user", "bob"), ("x-variant", "beta")])),
            ("beta".into(), Why::Override)
        );
        // An override that names no variant is ignored.
        assert_eq!(
            choose_for(&c, &[("x-user", "alice"), ("x-variant", "gamma")]).why,
            Why::AllowList
        );
        assert_eq!(
            names(choose_for(&c, &[("x-user", "alice")])),
            ("beta".into(), Why::AllowList)
        );
        assert_eq!(choose_for(&c, &[("x-user", "bob")]).why, Why::Weight);
        assert_eq!(names(choose_for(&c, &[])), ("stable".into(), Why::Unkeyed));
    }

    #[test]
    fn unkeyed_requests_are_drawn_by_weight() {
        let c = config(
            "    variants:\n      a: { cluster: v1, weight: 1 }\n      b: { cluster: v2, weight: 0, keys: [x] }",
        );
        for _ in 0..100 {
            let ch = choose_for(&c, &[]);
            assert_eq!((ch.variant, ch.why), (0, Why::Random));
        }
    }

    #[test]
    fn two_splits_do_not_share_their_betas() {
        let a = config(NINETY_TEN);
        let b = Config::parse(
            &format!(
                "listeners:\n  - address: 127.0.0.1:10000\n    routes:\n      - split: search\nclusters:\n  v1: {{ endpoints: [\"127.0.0.1:1\"] }}\n  v2: {{ endpoints: [\"127.0.0.1:2\"] }}\nsplits:\n  search:\n    key: {{ header: x-user }}\n{NINETY_TEN}\n"
            ),
            Path::new("t.yaml"),
        )
        .expect("valid");
        let differ = (0..1000)
            .filter(|i| {
                let k = format!("k{i}");
                bucket(&a.splits[0], &k) != bucket(&b.splits[0], &k)
            })
            .count();
        assert!(differ > 900, "{differ}");
    }
}
