//! The Activity Feed of the seed, written as a legacy application: it knows one address,
//! attache's listener, and nothing of shards, regions or residency.
//!
//! `GET /feed/{user}` asks attache for the user's follows (`GET /users/{user}`), then for their
//! images in one batch (`GET /images?users=a,b,c`), which attache splits by shard and merges.
//! People whose shard cannot answer come back as `degraded` (attache names them); the feed shows
//! everyone else. `POST /images` uploads through attache, which sends the record to the owner's
//! shard or refuses it; the feed passes a refusal on as it came.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::web::{self, Client, ClientError, Handler, Reply};
use crate::error::REASON_HEADER;

/// How long the feed waits for attache: longer than attache's own route timeouts, so attache
/// is the one that decides.
pub const ATTACHE_TIMEOUT: Duration = Duration::from_secs(5);

/// The feed application.
pub struct Feed {
    /// attache's listener, e.g. `http://127.0.0.1:10000`.
    attache: String,
    client: Client,
}

/// A user's feed: the images of the people they follow, and who is missing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FeedView {
    pub user: String,
    /// The images of the people followed, grouped by person in follow order.
    pub items: Vec<Item>,
    /// Followed people whose images are unavailable right now.
    pub degraded: Vec<String>,
}

/// One image in a feed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    pub owner: String,
    pub title: String,
    pub id: String,
    /// The region the image's data lives in.
    pub region: String,
    /// The picture, through this feed: `/img/{owner}/{id}.svg`.
    pub url: String,
}

/// Why a feed cannot be shown at all.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FeedError {
    UnknownUser(String),
    /// The Users service (through attache) did not give the follows.
    Users {
        status: StatusCode,
        reason: Option<String>,
        detail: String,
    },
}

impl Feed {
    /// A feed that talks to attache at `attache` (a base URL).
    pub fn new(attache: String) -> Feed {
        Feed {
            attache,
            client: Client::new(ATTACHE_TIMEOUT),
        }
    }

    /// The feed's HTTP API.
    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req| {
            let feed = self.clone();
            Box::pin(async move { feed.answer(req).await })
        })
    }

    async fn answer(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/") => redirect(StatusCode::FOUND, "/feed/alice"),
            (&Method::GET, "/health") => {
                web::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::POST, "/images") => self.upload(&req).await,
            (&Method::GET, p) if p.starts_with("/feed/") => {
                let user = web::decode(&p["/feed/".len()..]);
                let want_json = req
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("application/json"));
                self.feed(&user, want_json).await
            }
            (&Method::GET, p) if p.starts_with("/img/") => self.picture(&p["/img/".len()..]).await,
            _ => web::error(
                StatusCode::NOT_FOUND,
                "not-found",
                "try GET /feed/{user}, POST /images",
            ),
        }
    }

    async fn feed(&self, user: &str, want_json: bool) -> Response<Full<Bytes>> {
        match self.build(user).await {
            Ok(view) if want_json => web::json(
                StatusCode::OK,
                &serde_json::to_value(&view).unwrap_or_default(),
            ),
            Ok(view) => web::html(StatusCode::OK, page(&view)),
            Err(FeedError::UnknownUser(name)) if want_json => web::error(
                StatusCode::NOT_FOUND,
                "unknown-user",
                format!("no user `{name}`"),
            ),
            Err(FeedError::UnknownUser(name)) => web::html(
                StatusCode::NOT_FOUND,
                message_page(
                    "No such user",
                    &format!(
                        "There is no user called “{name}”. Try alice, bob, carlos, priya or arjun."
                    ),
                ),
            ),
            Err(FeedError::Users {
                status,
                reason,
                detail,
            }) => {
                let mut resp = if want_json {
                    web::json(
                        status,
                        &serde_json::json!({
                            "error": "users-unavailable",
                            "detail": format!("the Users service did not answer: {detail}"),
                            "reason": reason,
                        }),
                    )
                } else {
                    web::html(
                        status,
                        message_page(
                            "The Users service is unavailable",
                            &format!(
                                "The feed cannot tell whom {user} follows right now ({}). Please try again shortly.",
                                reason.as_deref().unwrap_or(&detail)
                            ),
                        ),
                    )
                };
                pass_reason(&mut resp, reason.as_deref());
                resp
            }
        }
    }

    /// Follows, then their images in one batch.
    async fn build(&self, user: &str) -> Result<FeedView, FeedError> {
        let url = format!("{}/users/{}", self.attache, web::segment(user));
        let reply = self.client.get(&url).await.map_err(|e| FeedError::Users {
            status: StatusCode::BAD_GATEWAY,
            reason: None,
            detail: format!("attache did not answer: {e}"),
        })?;
        if reply.status == StatusCode::NOT_FOUND && reply.reason().is_none() {
            return Err(FeedError::UnknownUser(user.to_owned()));
        }
        if !reply.status.is_success() {
            return Err(FeedError::Users {
                status: if reply.status.is_server_error() {
                    reply.status
                } else {
                    StatusCode::BAD_GATEWAY
                },
                reason: reply.reason().map(str::to_owned),
                detail: format!("GET /users/{user} answered {}", reply.status),
            });
        }
        let follows: Vec<String> = reply
            .json()
            .get("follows")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .ok_or_else(|| FeedError::Users {
                status: StatusCode::BAD_GATEWAY,
                reason: None,
                detail: "the answer has no `follows` list".into(),
            })?;
        if follows.is_empty() {
            return Ok(FeedView {
                user: user.to_owned(),
                items: Vec::new(),
                degraded: Vec::new(),
            });
        }
        let names: Vec<String> = follows.iter().map(|f| web::segment(f)).collect();
        let url = format!("{}/images?users={}", self.attache, names.join(","));
        let (items, degraded) = read_batch(&follows, self.client.get(&url).await);
        Ok(FeedView {
            user: user.to_owned(),
            items,
            degraded,
        })
    }

    /// `/img/{owner}/{id}.svg` → attache's `/images/{owner}/{id}.svg`.
    async fn picture(&self, rest: &str) -> Response<Full<Bytes>> {
        let valid = rest.split_once('/').is_some_and(|(owner, file)| {
            !owner.is_empty()
                && !file.is_empty()
                && !file.contains('/')
                && ![owner, file].iter().any(|s| *s == "." || *s == "..")
        });
        if !valid {
            return web::error(
                StatusCode::NOT_FOUND,
                "not-found",
                "GET /img/{owner}/{id}.svg",
            );
        }
        let url = format!("{}/images/{rest}", self.attache);
        match self.client.get(&url).await {
            Ok(reply) => pass_through(reply),
            Err(e) => unreachable_attache(e),
        }
    }

    /// `POST /images` with `{"owner", "title"}` (or the HTML form's fields).
    async fn upload(&self, req: &Request<Bytes>) -> Response<Full<Bytes>> {
        // `curl -d '{...}'` labels JSON as a form: a body that starts like JSON is JSON.
        let form = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
            && !req.body().trim_ascii_start().starts_with(b"{");
        let (owner, title, back) = if form {
            let text = String::from_utf8_lossy(req.body());
            let field = |name| {
                crate::route::query_param(&text, name)
                    .map(|v| v.into_owned())
                    .unwrap_or_default()
            };
            (field("owner"), field("title"), field("back"))
        } else {
            let v: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
            let field = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
            match (field("owner"), field("title")) {
                (Some(o), Some(t)) => (o, t, String::new()),
                _ => {
                    return web::error(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        r#"expected {"owner": ..., "title": ...}"#,
                    )
                }
            }
        };
        if !web::is_name(&owner) {
            return web::error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("`{owner}` is not a user name"),
            );
        }
        let url = format!("{}/images/{}", self.attache, web::segment(&owner));
        let body = serde_json::json!({ "title": title }).to_string();
        let reply = self
            .client
            .send(
                Method::POST,
                &url,
                Some(("application/json", Bytes::from(body))),
            )
            .await;
        if !form {
            return match reply {
                Ok(reply) => pass_through(reply),
                Err(e) => unreachable_attache(e),
            };
        }
        // The HTML form without script: back to the feed, or a page saying why not.
        match reply {
            Ok(r) if r.status == StatusCode::CREATED => {
                let back = if web::is_name(&back) { back } else { owner };
                redirect(StatusCode::SEE_OTHER, &format!("/feed/{back}"))
            }
            Ok(r) => {
                let reason = r.reason().map(str::to_owned);
                let mut resp = web::html(
                    r.status,
                    message_page(
                        "Upload refused",
                        &format!(
                            "{owner}’s image was not stored: {} {}. Nothing was stored anywhere else.",
                            r.status.as_u16(),
                            reason.as_deref().unwrap_or("")
                        ),
                    ),
                );
                pass_reason(&mut resp, reason.as_deref());
                resp
            }
            Err(e) => web::html(
                StatusCode::BAD_GATEWAY,
                message_page("Upload failed", &format!("attache did not answer: {e}")),
            ),
        }
    }
}

/// Reads attache's batch answer: the items of the people followed, and who is missing. A
/// batch that failed as a whole (every shard involved unavailable, or no answer) leaves
/// everyone missing; the feed still shows.
fn read_batch(follows: &[String], reply: Result<Reply, ClientError>) -> (Vec<Item>, Vec<String>) {
    let reply = match reply {
        Ok(r) if r.status.is_success() => r,
        Ok(r) => {
            tracing::debug!(status = %r.status, reason = r.reason().unwrap_or(""), "image batch failed");
            return (Vec::new(), follows.to_vec());
        }
        Err(e) => {
            tracing::debug!(error = %e, "image batch failed");
            return (Vec::new(), follows.to_vec());
        }
    };
    let v = reply.json();
    let text = |i: &Value, k: &str| i.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut items: Vec<Item> = v
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let owner = text(i, "owner")?;
            let id = text(i, "id")?;
            Some(Item {
                url: format!("/img/{}/{}.svg", web::segment(&owner), web::segment(&id)),
                title: text(i, "title").unwrap_or_default(),
                region: text(i, "region").unwrap_or_default(),
                owner,
                id,
            })
        })
        .filter(|i| follows.contains(&i.owner))
        .collect();
    items.sort_by_key(|i| follows.iter().position(|f| *f == i.owner));
    let missing = v
        .pointer("/degraded/missing_keys")
        .and_then(Value::as_object);
    let degraded = follows
        .iter()
        .filter(|f| missing.is_some_and(|m| m.contains_key(f.as_str())))
        .cloned()
        .collect();
    (items, degraded)
}

/// attache's answer as it came: status, content type, reason and body.
fn pass_through(reply: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = reply.status;
    for name in [http::header::CONTENT_TYPE, http::header::CACHE_CONTROL] {
        if let Some(v) = reply.headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = reply.headers.get(REASON_HEADER) {
        resp.headers_mut().insert(REASON_HEADER, v.clone());
    }
    resp
}

fn pass_reason(resp: &mut Response<Full<Bytes>>, reason: Option<&str>) {
    if let Some(v) = reason.and_then(|r| HeaderValue::from_str(r).ok()) {
        resp.headers_mut().insert(REASON_HEADER, v);
    }
}

fn unreachable_attache(e: ClientError) -> Response<Full<Bytes>> {
    web::error(
        StatusCode::BAD_GATEWAY,
        "attache-unreachable",
        format!("attache did not answer: {e}"),
    )
}

fn redirect(status: StatusCode, to: &str) -> Response<Full<Bytes>> {
    let mut resp = web::respond(status, "text/plain", format!("see {to}\n"));
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f1ec; color: #222; }
header { background: #2b2d42; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; opacity: .8; font-size: 14px; }
main { padding: 20px 24px; max-width: 1100px; }
nav a { margin-right: 12px; color: #2b2d42; }
.banner { background: #fff3cd; border: 1px solid #e0b84c; border-radius: 8px; padding: 12px 16px; margin: 16px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; margin-top: 16px; }
figure { margin: 0; background: #fff; border-radius: 10px; padding: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.15); }
figure img { display: block; width: 256px; height: 192px; border-radius: 8px; }
figcaption { padding: 6px 2px 2px; font-size: 14px; }
.region { display: inline-block; background: #2b2d42; color: #fff; border-radius: 10px; padding: 1px 8px; font-size: 12px; margin-left: 6px; }
form { margin-top: 24px; background: #fff; padding: 12px 16px; border-radius: 10px; display: inline-block; }
form input, form select, form button { font-size: 14px; padding: 4px 8px; margin-right: 6px; }
#result { margin-top: 8px; font-size: 14px; min-height: 1em; }
.empty { color: #666; }
"#;

const SCRIPT: &str = r#"
document.getElementById('upload').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const out = document.getElementById('result');
  const body = JSON.stringify({ owner: form.elements['owner'].value, title: form.elements['title'].value });
  out.textContent = 'Uploading…';
  try {
    const r = await fetch('/images', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    const text = await r.text();
    if (r.status === 201) {
      const image = JSON.parse(text);
      out.textContent = 'Stored ' + image.owner + '/' + image.id + ' in region ' + image.region + '. Reloading…';
      setTimeout(() => location.reload(), 600);
    } else {
      const reason = r.headers.get('x-attache-reason');
      let detail = text;
      try { detail = JSON.parse(text).detail || text; } catch (e) {}
      out.textContent = 'Refused (' + r.status + (reason ? ', ' + reason : '') + '): ' + detail;
    }
  } catch (e) {
    out.textContent = 'Upload failed: ' + e;
  }
});
"#;

fn shell(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <style>{STYLE}</style></head><body>\
         <header><h1>Activity Feed</h1><p>a legacy app: it talks only to attache on localhost</p></header>\
         <main>{body}</main></body></html>\n",
        web::escape(title)
    )
}

fn message_page(title: &str, text: &str) -> String {
    shell(
        title,
        &format!(
            "<h2>{}</h2><p>{}</p><p><a href=\"/feed/alice\">Back to alice’s feed</a></p>",
            web::escape(title),
            web::escape(text)
        ),
    )
}

/// The feed as an HTML page: the banner when degraded, the pictures, and the upload form.
fn page(view: &FeedView) -> String {
    let user = web::escape(&view.user);
    let mut body = format!("<h2>{user}’s feed</h2>");
    let mut people: Vec<&str> = Vec::new();
    for i in &view.items {
        if !people.contains(&i.owner.as_str()) {
            people.push(&i.owner);
        }
    }
    for d in &view.degraded {
        if !people.contains(&d.as_str()) {
            people.push(d);
        }
    }
    body.push_str("<nav>Feeds of: ");
    for p in &people {
        let p = web::escape(p);
        body.push_str(&format!("<a href=\"/feed/{p}\">{p}</a>"));
    }
    body.push_str("</nav>");
    if !view.degraded.is_empty() {
        let n = view.degraded.len();
        body.push_str(&format!(
            "<div class=\"banner\" id=\"degraded\"><strong>Images of {n} {} are temporarily unavailable</strong> ({}). Everything else is shown.</div>",
            if n == 1 { "person" } else { "people" },
            web::escape(&view.degraded.join(", "))
        ));
    }
    body.push_str("<div class=\"grid\">");
    if view.items.is_empty() {
        body.push_str("<p class=\"empty\">No images to show.</p>");
    }
    for i in &view.items {
        body.push_str(&format!(
            "<figure><img src=\"{}\" alt=\"{}\" width=\"256\" height=\"192\"><figcaption>{} by <a href=\"/feed/{owner}\">{owner}</a><span class=\"region\" title=\"stored in region {region}\">{region}</span></figcaption></figure>",
            web::escape(&i.url),
            web::escape(&i.title),
            web::escape(&i.title),
            owner = web::escape(&i.owner),
            region = web::escape(&i.region),
        ));
    }
    body.push_str("</div>");
    let mut owners = vec![view.user.as_str()];
    for p in &people {
        if !owners.contains(p) {
            owners.push(p);
        }
    }
    let options: String = owners
        .iter()
        .map(|o| format!("<option>{}</option>", web::escape(o)))
        .collect();
    body.push_str(&format!(
        "<form id=\"upload\" method=\"post\" action=\"/images\">\
         <strong>Upload an image</strong><br>as <select name=\"owner\">{options}</select>\
         <input name=\"title\" placeholder=\"title\" required maxlength=\"80\">\
         <input type=\"hidden\" name=\"back\" value=\"{user}\">\
         <button type=\"submit\">Upload</button><div id=\"result\"></div></form>\
         <script>{SCRIPT}</script>"
    ));
    shell(&format!("{}’s feed", view.user), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: Value) -> Result<Reply, ClientError> {
        Ok(Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: http::HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        })
    }

    fn follows() -> Vec<String> {
        ["priya", "arjun", "bob", "carlos"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn a_partial_batch_names_the_missing_people() {
        let answer = serde_json::json!({
            "images": [
                {"id": "1", "owner": "carlos", "title": "C", "region": "GLOBAL"},
                {"id": "2", "owner": "bob", "title": "B", "region": "GLOBAL"},
                {"id": "9", "owner": "mallory", "title": "M", "region": "GLOBAL"},
            ],
            "degraded": {"missing_shards": ["india"], "missing_keys": {"arjun": "shard-failed", "priya": "shard-failed"}},
        });
        let (items, degraded) = read_batch(&follows(), reply(200, answer));
        let owners: Vec<&str> = items.iter().map(|i| i.owner.as_str()).collect();
        assert_eq!(
            owners,
            ["bob", "carlos"],
            "in follow order, strangers dropped"
        );
        assert_eq!(items[0].url, "/img/bob/2.svg");
        assert_eq!(degraded, ["priya", "arjun"]);
    }

    #[test]
    fn a_failed_batch_degrades_everyone() {
        let answer = serde_json::json!({"error": "all-shards-unavailable", "detail": "x"});
        let (items, degraded) = read_batch(&follows(), reply(503, answer));
        assert!(items.is_empty());
        assert_eq!(degraded, follows());
        let (_, degraded) = read_batch(&follows(), Err(ClientError::Timeout(Duration::ZERO)));
        assert_eq!(degraded, follows());
    }

    #[test]
    fn the_page_shows_the_banner_and_escapes() {
        let view = FeedView {
            user: "alice".into(),
            items: vec![Item {
                owner: "bob".into(),
                title: "<b>Fog</b>".into(),
                id: "1".into(),
                region: "GLOBAL".into(),
                url: "/img/bob/1.svg".into(),
            }],
            degraded: vec!["priya".into(), "arjun".into()],
        };
        let html = page(&view);
        assert!(html.contains("Images of 2 people are temporarily unavailable"));
        assert!(html.contains("&lt;b&gt;Fog&lt;/b&gt;"));
        assert!(!html.contains("<b>Fog"));
        assert!(html.contains("src=\"/img/bob/1.svg\""));
        let whole = page(&FeedView {
            degraded: Vec::new(),
            ..view
        });
        assert!(!whole.contains("temporarily unavailable"));
    }
}
