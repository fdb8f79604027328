//! `attache demo`: the seed's image-sharing system, runnable on one machine, in one process.
//!
//! | part | owns |
//! |---|---|
//! | [`users`] | the Users service: people, countries, follows |
//! | [`images`] | the Image Store, one instance per shard (`india`, `global`) |
//! | [`feed`] | the Activity Feed, a legacy app that knows only attache's address |
//! | [`faults`] | the services' listeners with fault modes, and the admin routes that set them |
//! | [`svg`] | the pictures, drawn on request |
//! | [`web`] | the little HTTP the services share |
//!
//! attache itself runs from `examples/image-sharing.yaml` (built into the binary), with the
//! addresses rewritten to the ports the demo could bind: the example's ports (and 8080 for the
//! feed) when free, any free port otherwise, or any free port for everything with
//! `ATTACHE_DEMO_PORTS=auto`. The services run on one runtime of this process; attache runs
//! [`Server::run`] on its own thread, with its own runtimes, as it would in a pod.
//!
//! ```text
//!  browser ─▶ feed ─▶ attache :10000 ─┬─▶ users            (follows; the directory's /country)
//!                                     ├─▶ images-india    (region IN: priya, arjun)
//!                                     └─▶ images-global   (everyone else)
//!  curl ─▶ attache admin :9901 ── /demo/fault/{target}/{mode} ─▶ the services' listeners
//! ```

pub mod faults;
pub mod feed;
pub mod images;
pub mod svg;
pub mod users;
pub mod web;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigErrors, EndpointSpec};
use crate::server::{Server, StartError};
use faults::{Faults, Switch};
use images::ImageStore;

/// The config attache runs in the demo: the example file, built into the binary so that the
/// demo runs from anywhere.
pub const EXAMPLE: &str = include_str!("../../examples/image-sharing.yaml");

/// Where [`EXAMPLE`] lives in the repository.
pub const EXAMPLE_PATH: &str = "examples/image-sharing.yaml";

/// The environment variable that picks ports: `auto` takes free ports for everything.
pub const PORTS_ENV: &str = "ATTACHE_DEMO_PORTS";

/// The feed's preferred address.
pub const FEED_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// How long the demo waits for every part to answer before giving up.
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// The image-store shards: name, cluster in the example, region.
const SHARDS: [(&str, &str, &str); 2] = [
    ("india", "images-india", "IN"),
    ("global", "images-global", "GLOBAL"),
];

/// Why the demo cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the built-in {EXAMPLE_PATH} is invalid:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("{EXAMPLE_PATH} has no {0}")]
    Missing(String),
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot start the demo services: {0}")]
    Io(#[from] std::io::Error),
    #[error("the demo was not ready within {READY_WITHIN:?}: {0} did not answer")]
    NotReady(String),
    #[error("attache stopped: {0}")]
    Stopped(String),
}

/// The base URLs of the running demo (printed as one JSON line by `--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Urls {
    /// The Activity Feed: `/feed/{user}`, `POST /images`.
    pub feed: String,
    /// attache's listener: where the feed sends everything.
    pub attache: String,
    /// attache's admin listener: the dashboard, `/demo/fault/{target}/{mode}`.
    pub admin: String,
    /// The Users service.
    pub users: String,
    /// Shard name → the Image Store instance.
    pub shards: BTreeMap<String, String>,
}

/// Runs the demo until attache stops (SIGTERM or SIGINT). With `json`, prints one line of
/// [`Urls`] as JSON once everything answers; otherwise a banner and a tour.
pub fn run(json: bool) -> Result<(), DemoError> {
    let auto = std::env::var(PORTS_ENV).is_ok_and(|v| v == "auto");
    let mut config = Config::parse(EXAMPLE, std::path::Path::new(EXAMPLE_PATH))?;
    // A reload (SIGHUP, POST /reload) reads this path: there is no such file, so a reload is
    // refused and the rewritten addresses stay.
    config.source = PathBuf::from(format!("{EXAMPLE_PATH} (built into attache demo)"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("demo-services")
        .enable_all()
        .build()?;

    // 1. The services' sockets, and the clusters pointed at them.
    let users_socket = bind(
        "the Users service",
        cluster_address(&config, "users")?,
        auto,
    )?;
    point(&mut config, "users", users_socket.local_addr()?)?;
    let mut shard_sockets = Vec::new();
    for (name, cluster, _) in SHARDS {
        let socket = bind(
            &format!("the `{name}` image store"),
            cluster_address(&config, cluster)?,
            auto,
        )?;
        point(&mut config, cluster, socket.local_addr()?)?;
        shard_sockets.push(socket);
    }
    let feed_socket = bind("the Activity Feed", FEED_ADDRESS, auto)?;

    // 2. attache.
    let server = bind_attache(config, auto)?;
    let addresses = server.addresses().clone();
    let listener = addresses
        .listener("app")
        .ok_or_else(|| DemoError::Missing("listener `app`".into()))?;

    // 3. The services.
    let handle = runtime.handle().clone();
    let users = Switch::start("users", users_socket, users::handler(), &handle)?;
    let mut switches = vec![users.clone()];
    let mut shards = BTreeMap::new();
    for ((name, _, region), socket) in SHARDS.into_iter().zip(shard_sockets) {
        let store = Arc::new(ImageStore::new(name, region));
        seed(&store, region);
        let switch = Switch::start(name, socket, store.handler(), &handle)?;
        shards.insert(name.to_owned(), url(switch.addr()));
        switches.push(switch);
    }
    let feed = Arc::new(feed::Feed::new(url(listener)));
    let feed = Switch::start("feed", feed_socket, feed.handler(), &handle)?;
    let faults = Arc::new(Faults::new(switches));
    if server.shared().admin_hook.set(faults.hook()).is_err() {
        tracing::warn!("an admin hook was already installed; fault controls are off");
    }
    let urls = Urls {
        feed: url(feed.addr()),
        attache: url(listener),
        admin: url(addresses.admin),
        users: url(users.addr()),
        shards,
    };

    // 4. attache on its own thread, then wait until every part answers.
    let attache = std::thread::Builder::new()
        .name("attache".into())
        .spawn(move || server.run(std::future::pending()))?;
    runtime.block_on(wait_ready(&urls, || attache.is_finished()))?;

    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::to_string(&urls).unwrap_or_default();
        let _ = writeln!(out, "{line}");
    } else {
        let _ = write!(out, "{}", banner(&urls));
    }
    let _ = out.flush();
    drop(out);

    let ended = attache.join();
    runtime.shutdown_timeout(Duration::from_millis(500));
    match ended {
        Ok(result) => Ok(result?),
        Err(_) => Err(DemoError::Stopped("its thread panicked".into())),
    }
}

/// Seeds a shard with two images of every demo person whose data belongs in its region.
fn seed(store: &ImageStore, region: &str) {
    let india = region == "IN";
    for person in users::PEOPLE {
        if (person.country == "IN") != india {
            continue;
        }
        for title in images::seed_titles(person.name) {
            if let Err(e) = store.store(person.name, title) {
                tracing::warn!(owner = person.name, error = %e, "cannot seed an image");
            }
        }
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn any_port(ip: std::net::IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

/// Binds `preferred`, or any free port on its address when it is taken (or when `auto`).
fn bind(what: &str, preferred: SocketAddr, auto: bool) -> Result<std::net::TcpListener, DemoError> {
    let fallback = |source| DemoError::Bind {
        what: what.to_owned(),
        source,
    };
    if auto {
        return std::net::TcpListener::bind(any_port(preferred.ip())).map_err(fallback);
    }
    match std::net::TcpListener::bind(preferred) {
        Ok(l) => Ok(l),
        Err(e) => {
            let l = std::net::TcpListener::bind(any_port(preferred.ip())).map_err(fallback)?;
            if let Ok(a) = l.local_addr() {
                tracing::warn!(%preferred, error = %e, "{what}: port taken, using {a}");
            }
            Ok(l)
        }
    }
}

/// Binds attache: the example's listener and admin ports when free, any free port otherwise.
fn bind_attache(mut config: Config, auto: bool) -> Result<Server, DemoError> {
    let usable = |what: &str, preferred: SocketAddr| -> SocketAddr {
        if auto {
            return any_port(preferred.ip());
        }
        match std::net::TcpListener::bind(preferred) {
            Ok(_) => preferred,
            Err(e) => {
                tracing::warn!(%preferred, error = %e, "{what}: port taken, using a free one");
                any_port(preferred.ip())
            }
        }
    };
    config.admin.address = usable("attache admin", config.admin.address);
    for l in &mut config.listeners {
        l.address = usable(&format!("attache listener `{}`", l.name), l.address);
    }
    Ok(Server::bind(config, Some("off"))?)
}

/// The address the example gives a cluster.
fn cluster_address(config: &Config, cluster: &str) -> Result<SocketAddr, DemoError> {
    config
        .cluster_id(cluster)
        .and_then(|id| {
            config.clusters[id].endpoints.iter().find_map(|e| match e {
                EndpointSpec::Addr(a) => Some(*a),
                EndpointSpec::Dns { .. } => None,
            })
        })
        .ok_or_else(|| DemoError::Missing(format!("cluster `{cluster}` with an address")))
}

/// Points a cluster at the address its service actually bound.
fn point(config: &mut Config, cluster: &str, addr: SocketAddr) -> Result<(), DemoError> {
    let id = config
        .cluster_id(cluster)
        .ok_or_else(|| DemoError::Missing(format!("cluster `{cluster}`")))?;
    config.clusters[id].endpoints = vec![EndpointSpec::Addr(addr)];
    Ok(())
}

/// Polls until attache is ready and every service answers (directly and through attache).
async fn wait_ready(urls: &Urls, attache_ended: impl Fn() -> bool) -> Result<(), DemoError> {
    let client = web::Client::new(Duration::from_secs(2));
    let mut probes = vec![
        ("attache".to_owned(), format!("{}/ready", urls.admin)),
        (
            "the Users service".to_owned(),
            format!("{}/users/alice", urls.users),
        ),
        (
            "the Activity Feed".to_owned(),
            format!("{}/health", urls.feed),
        ),
        (
            "the Users service through attache".to_owned(),
            format!("{}/users/alice", urls.attache),
        ),
    ];
    for (name, base) in &urls.shards {
        probes.push((
            format!("the `{name}` image store"),
            format!("{base}/health"),
        ));
    }
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let mut waiting = None;
        for (what, probe) in &probes {
            match client.get(probe).await {
                Ok(r) if r.status.is_success() => {}
                _ => {
                    waiting = Some(format!("{what} ({probe})"));
                    break;
                }
            }
        }
        let Some(waiting) = waiting else {
            return Ok(());
        };
        if attache_ended() {
            return Err(DemoError::Stopped("before it was ready".into()));
        }
        if Instant::now() > deadline {
            return Err(DemoError::NotReady(waiting));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The friendly banner: what runs where, and a five-step tour.
pub fn banner(urls: &Urls) -> String {
    let shard = |n: &str| urls.shards.get(n).cloned().unwrap_or_default();
    format!(
        r#"
attache demo: the seed's image-sharing system, sharded for data localization

  Activity Feed    {feed}          (a legacy app: it only knows attache)
  attache          {attache}
  attache admin    {admin}          (dashboard, /metrics, /clusters)
  Users service    {users}
  Image Store      india  {india}   (region IN: priya, arjun)
                   global {global}   (everyone else: alice, bob, carlos)

A tour in five steps:
  1. Open alice's feed: {feed}/feed/alice
     Her friends' pictures come from two shards, each tagged with its region.
  2. Open the dashboard: {admin}/
  3. Take the India shard down:
       curl -X POST {admin}/demo/fault/india/down
  4. Reload alice's feed: bob's and carlos's pictures are still there, and a banner says the
     images of 2 people are temporarily unavailable. Upload a picture as priya: attache refuses
     it (503 residency-unavailable) rather than store it outside India. Check:
       curl {global}/stats
  5. Bring India back, and watch the feed become whole again:
       curl -X POST {admin}/demo/fault/india/ok

Other faults: POST {admin}/demo/fault/{{india|global|users}}/{{down|hang|slow|errors|ok}}
Press Ctrl-C to stop.
"#,
        feed = urls.feed,
        attache = urls.attache,
        admin = urls.admin,
        users = urls.users,
        india = shard("india"),
        global = shard("global"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_the_demo_topology() {
        let config = Config::parse(EXAMPLE, std::path::Path::new(EXAMPLE_PATH)).unwrap();
        for cluster in ["users", "images-india", "images-global"] {
            assert!(cluster_address(&config, cluster).is_ok(), "{cluster}");
        }
        assert!(config.listener("app").is_some());
        let set = &config.shard_sets[0];
        let names: Vec<&str> = set.shards.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"india") && names.contains(&"global"));
        let india = set.shards.iter().position(|s| s.name == "india").unwrap();
        assert_eq!(set.residency.allowed("IN"), Some(&[india][..]));
    }

    #[test]
    fn seeding_keeps_each_persons_data_in_their_region() {
        let india = ImageStore::new("india", "IN");
        let global = ImageStore::new("global", "GLOBAL");
        seed(&india, "IN");
        seed(&global, "GLOBAL");
        assert_eq!(
            india.stats()["owners"],
            serde_json::json!(["arjun", "priya"])
        );
        assert_eq!(
            global.stats()["owners"],
            serde_json::json!(["alice", "bob", "carlos"])
        );
        assert_eq!(global.stats()["images"], 6);
    }
}
