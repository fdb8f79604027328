//! Config validation: a table of bad configs, each with its exact location, field and message;
//! every shipped example passes `attache check`.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use attache::config::Config;

fn errors(yaml: &str) -> Vec<String> {
    match Config::parse(yaml, Path::new("c.yaml")) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const CLUSTER: &str = "clusters:\n  backend:\n    endpoints: [\"127.0.0.1:8080\"]\n";

#[test]
fn bad_configs_name_file_line_column_field_and_reason() {
    let cases: &[(String, &str)] = &[
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: missing\n{CLUSTER}"),
            "c.yaml:4:18: listeners[0].routes[0].cluster: unknown cluster `missing` (known: backend)",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routez: []\n{CLUSTER}"),
            "c.yaml:3:5: listeners[0].routez: unknown field `routez`",
        ),
        (
            format!("listeners:\n  - address: localhost\n    routes: [ {{ cluster: backend }} ]\n{CLUSTER}"),
            "c.yaml:2:14: listeners[0].address: `localhost` is not an address",
        ),
        (
            format!(
                "listeners:\n  - address: 127.0.0.1:1\n    routes: [ {{ cluster: backend }} ]\n  - address: 127.0.0.1:1\n    routes: [ {{ cluster: backend }} ]\n{CLUSTER}"
            ),
            "c.yaml:4:14: listeners[1].address: address 127.0.0.1:1 is already used by listeners[0]",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: backend\n        timeout: 5\n{CLUSTER}"),
            "c.yaml:5:18: listeners[0].routes[0].timeout: `5` has no unit",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: backend\n        match: {{ path: {{ regex: \"(\" }} }}\n{CLUSTER}"),
            "c.yaml:5:33: listeners[0].routes[0].match.path.regex: invalid regex",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: backend\n        match: {{ path: {{ template: \"/a/{{x*}}/b\" }} }}\n{CLUSTER}"),
            "c.yaml:5:36: listeners[0].routes[0].match.path.template: `{x*}` must be the last segment",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: backend\n        match: {{ path: {{ prefix: /a, exact: /b }} }}\n{CLUSTER}"),
            "c.yaml:5:24: listeners[0].routes[0].match.path: give exactly one of `exact`, `prefix`, `regex`, `template`",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: backend\n        match: {{ methods: [GIT] }}\n{CLUSTER}"),
            "",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: c } ]\nclusters:\n  c:\n    endpoints: [\"no-port\"]\n".to_owned(),
            "c.yaml:6:17: clusters.c.endpoints[0]: `no-port` is not HOST:PORT or IP:PORT",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: c } ]\nclusters:\n  c:\n    endpoints: [\"127.0.0.1:2\"]\n    balance: consistent_hash\n".to_owned(),
            "c.yaml:7:14: clusters.c.balance: consistent_hash needs `hash_on`",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: c } ]\nclusters:\n  c:\n    endpoints: []\n".to_owned(),
            "c.yaml:6:16: clusters.c.endpoints: a cluster needs at least one endpoint",
        ),
        (
            "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: c } ]\nclusters:\n  c:\n    endpoints: [\"127.0.0.1:2\"]\n    health_check: { interval: 1s }\n".to_owned(),
            "c.yaml:7:21: clusters.c.health_check: missing field `path`",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    protocol: udp\n    routes: [ {{ cluster: backend }} ]\n{CLUSTER}"),
            "c.yaml:3:15: listeners[0].protocol: unknown protocol `udp`",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    protocol: tcp\n{CLUSTER}"),
            "c.yaml:2:14: listeners[0].cluster: a tcp listener needs `cluster`",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes: [ {{ split: feed, cluster: backend }} ]\n{CLUSTER}"),
            "c.yaml:3:24: listeners[0].routes[0].split: give one destination: `cluster`, `shard_set` or `split`, not several",
        ),
        (
            format!("listeners:\n  - address: 127.0.0.1:1\n    routes: [ {{ split: feed }} ]\n{CLUSTER}"),
            "c.yaml:3:24: listeners[0].routes[0].split: unknown split `feed` (no splits are defined)",
        ),
        (
            format!("{CLUSTER}splits:\n  feed:\n    variants:\n      a: {{ cluster: backend, weight: 0 }}\n"),
            "c.yaml:7:7: splits.feed.variants: every weight is 0 (or missing)",
        ),
        (
            format!("{CLUSTER}splits:\n  feed:\n    key: {{ header: x-user }}\n    variants:\n      a: {{ cluster: backend, weight: 1, keys: [bob] }}\n      b: {{ cluster: backend, keys: [bob] }}\n"),
            "c.yaml:9:37: splits.feed.variants.b.keys: `bob` is also on the allow list of `a`",
        ),
        (
            format!("{CLUSTER}splits:\n  feed:\n    variants:\n      a: {{ cluster: backend, weight: 1, keys: [bob] }}\n"),
            "c.yaml:7:48: splits.feed.variants.a.keys: an allow list needs the split's `key`",
        ),
        (
            format!("{CLUSTER}splits:\n  feed:\n    variants:\n      a: {{ cluster: backend, weight: 1 }}\n    unkeyed: b\n"),
            "c.yaml:8:14: splits.feed.unkeyed: unknown variant `b` (variants: a)",
        ),
        (
            format!("{CLUSTER}splits:\n  feed:\n    variants:\n      a: {{ cluster: backend, weight: 1 }}\n    override: {{ header: x, cookie: y }}\n"),
            "c.yaml:8:15: splits.feed.override: give exactly one of `header`, `cookie`",
        ),
        (
            format!("workers: 0\nlisteners: []\n{CLUSTER}"),
            "c.yaml:1:10: workers: must be between 1 and 256",
        ),
    ];
    let mut failures = Vec::new();
    for (yaml, want) in cases {
        let got = errors(yaml);
        if want.is_empty() {
            // GIT is a valid extension method token: accepted.
            assert!(got.is_empty(), "{yaml}\n{got:?}");
            continue;
        }
        if !got.iter().any(|g| g.starts_with(want)) {
            failures.push(format!(
                "wanted: {want}\ngot:    {}",
                got.join("\n        ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_error_is_reported_at_once() {
    let yaml = "admin: { address: nope }\nlisteners:\n  - address: 127.0.0.1:1\n    routes:\n      - cluster: a\n      - cluster: b\nclusters:\n  c:\n    endpoints: [\"x\"]\n";
    let got = errors(yaml);
    assert_eq!(got.len(), 4, "{got:#?}");
    // In file order.
    assert!(got[0].starts_with("c.yaml:1:"));
    assert!(got[3].starts_with("c.yaml:9:"));
}

#[test]
fn check_command_exits_1_with_errors_and_0_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: nope } ]\n",
    )
    .unwrap();
    let out = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:3:26: listeners[0].routes[0].cluster: unknown cluster `nope`"),
        "{stderr}"
    );
}

#[test]
fn every_example_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(support::binary())
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok:"));
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn explain_prints_the_decision() {
    let out = Command::new(support::binary())
        .args(["explain", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/quickstart.yaml"
        ))
        .args([
            "-X",
            "POST",
            "-H",
            "x-user: priya",
            "http://127.0.0.1:10000/anything",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("listener    main (127.0.0.1:10000)"),
        "{text}"
    );
    assert!(text.contains("cluster     backend"), "{text}");
    assert!(text.contains("outcome     forward"), "{text}");
    assert!(text.contains("retry: 2 tries on connect-failure"), "{text}");
    assert!(text.contains("budget 20% + 10/s"), "{text}");
    assert!(text.contains("breaker: off"), "{text}");
    let out = Command::new(support::binary())
        .args(["explain", "--json", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/quickstart.yaml"
        ))
        .arg("http://127.0.0.1:10000/x")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cluster"]["endpoints"][0], "127.0.0.1:8080");
}
