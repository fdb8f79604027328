//! Traffic splits against real upstreams: sticky per user, the weights, allow lists, the
//! override header, what explain predicts, metrics and the access log.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::*;

fn config(stable: &Upstream, beta: &Upstream, beta_weight: u32) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: 127.0.0.1:0
    routes:
      - name: feed
        match: {{ path: {{ prefix: /feed }} }}
        split: feed
clusters:
  v1: {{ endpoints: ["{}"] }}
  v2: {{ endpoints: ["{}"] }}
splits:
  feed:
    key: {{ header: x-user-id }}
    variants:
      stable: {{ cluster: v1, weight: {} }}
      beta: {{ cluster: v2, weight: {beta_weight}, keys: [tester] }}
    override: {{ header: x-attache-variant }}
    unkeyed: stable
"#,
        stable.addr,
        beta.addr,
        100 - beta_weight
    )
}

async fn variant_of(a: &Attache, user: &str, extra: &[(&str, &str)]) -> String {
    let mut headers = vec![("x-user-id", user)];
    headers.extend_from_slice(extra);
    let got = get_with(&a.url("app", "/feed"), &headers).await;
    assert_eq!(got.status, 200, "{user}");
    got.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keep_their_variant_and_the_weights_hold() {
    let stable = Upstream::named("stable").await;
    let beta = Upstream::named("beta").await;
    let a = Attache::start(&config(&stable, &beta, 20));

    let mut in_beta = Vec::new();
    for i in 0..200 {
        let user = format!("user-{i}");
        let first = variant_of(&a, &user, &[]).await;
        // Each get_with is a new connection: stickiness is per user, not per connection.
        assert_eq!(first, variant_of(&a, &user, &[]).await, "{user} switched");
        if first == "beta" {
            in_beta.push(user);
        }
    }
    // 20 % of 200 users is 40; the hash is deterministic, so this bound cannot flake.
    assert!(
        (25..=55).contains(&in_beta.len()),
        "{} in beta",
        in_beta.len()
    );
    assert_eq!(beta.hits(), 2 * in_beta.len());
    assert_eq!(stable.hits(), 400 - 2 * in_beta.len());

    // The allow list beats the weights; the override beats both; an unknown name is ignored.
    assert_eq!(variant_of(&a, "tester", &[]).await, "beta");
    let stable_user = (0..200)
        .map(|i| format!("user-{i}"))
        .find(|u| !in_beta.contains(u))
        .unwrap();
    assert_eq!(
        variant_of(&a, &stable_user, &[("x-attache-variant", "beta")]).await,
        "beta"
    );
    assert_eq!(
        variant_of(&a, "tester", &[("x-attache-variant", "stable")]).await,
        "stable"
    );
    assert_eq!(
        variant_of(&a, &stable_user, &[("x-attache-variant", "gamma")]).await,
        "stable"
    );
    // No key: the split's `unkeyed` variant.
    for _ in 0..5 {
        assert_eq!(get(&a.url("app", "/feed")).await.text(), "stable");
    }

    // Metrics count each variant; the access log names it.
    let metrics = get(&a.admin_url("/metrics")).await.text();
    let beta_count = 2 * in_beta.len() + 2;
    assert!(
        metrics.contains(&format!(
            "attache_split_requests_total{{split=\"feed\",variant=\"beta\"}} {beta_count}"
        )),
        "{metrics}"
    );
    let log = a.access_log(409);
    assert_eq!(log.len(), 409);
    assert!(log
        .iter()
        .all(|l| l["variant"] == "stable" || l["variant"] == "beta"));
    assert_eq!(
        log.iter().filter(|l| l["variant"] == "beta").count(),
        beta_count
    );

    // explain predicts what the proxy did, user by user.
    for (i, user) in ["user-0", "user-1", "user-2", "tester", &in_beta[0]]
        .iter()
        .enumerate()
    {
        let out = Command::new(binary())
            .args(["explain", "--json", "--config"])
            .arg(a.config_path())
            .args(["-H", &format!("x-user-id: {user}")])
            .arg(a.url("app", "/feed"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["split"]["variant"].as_str().unwrap(),
            variant_of(&a, user, &[]).await,
            "explain disagrees for {user} ({i})"
        );
        assert_eq!(
            v["split"]["why"],
            if *user == "tester" {
                "allow-list"
            } else {
                "weight"
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_beta_weight_on_reload_keeps_every_beta_user() {
    let stable = Upstream::named("stable").await;
    let beta = Upstream::named("beta").await;
    let a = Attache::start(&config(&stable, &beta, 10));
    let users: Vec<String> = (0..150).map(|i| format!("u{i}")).collect();
    let mut before = Vec::new();
    for u in &users {
        before.push(variant_of(&a, u, &[]).await);
    }
    std::fs::write(a.config_path(), config(&stable, &beta, 30)).unwrap();
    a.signal("HUP");
    let reloaded = eventually(std::time::Duration::from_secs(10), || async {
        get(&a.admin_url("/metrics"))
            .await
            .text()
            .contains("attache_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    assert!(reloaded, "{}", a.stderr.lock().unwrap());
    let mut gained = 0;
    for (u, was) in users.iter().zip(&before) {
        let now = variant_of(&a, u, &[]).await;
        if was == "beta" {
            assert_eq!(now, "beta", "{u} lost the beta when its weight went up");
        } else if now == "beta" {
            gained += 1;
        }
    }
    let had = before.iter().filter(|v| *v == "beta").count();
    assert!(had >= 5, "{had}");
    assert!(gained >= 15, "{gained} users joined the beta at 30%");
}
