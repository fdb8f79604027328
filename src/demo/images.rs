//! The Image Store of the seed, one instance per shard: image records in memory, for the owners
//! whose data lives in this shard's region, and the owners it has handled (`/stats`), which is
//! how the demo shows that residency held.
//!
//! The store knows nothing of other shards or of users' countries: attache decides which shard
//! a request reaches. It answers whatever it is asked, so a misrouted request would show in
//! `/stats`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::web::{self, Handler};

/// Longest title accepted, in characters.
pub const MAX_TITLE: usize = 80;

/// One image record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Image {
    /// Per owner, `1`, `2`, ...
    pub id: String,
    pub owner: String,
    pub title: String,
    /// The region of the shard that stores it.
    pub region: String,
    /// Where the image itself is: `/images/{owner}/{id}.svg`.
    pub url: String,
}

/// A shard of the Image Store.
pub struct ImageStore {
    shard: String,
    region: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    images: Vec<Image>,
    last_id: BTreeMap<String, u64>,
    /// Every owner whose data this shard served or stored.
    owners: BTreeSet<String>,
}

/// Why an upload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("`{0}` is not a user name")]
    Owner(String),
    #[error("a title is 1 to {MAX_TITLE} printable characters")]
    Title,
}

impl ImageStore {
    /// An empty shard called `shard` whose data lives in `region`.
    pub fn new(shard: &str, region: &str) -> ImageStore {
        ImageStore {
            shard: shard.to_owned(),
            region: region.to_owned(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the records half-written (each change is
        // one push or insert), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a new image for `owner` and returns its record.
    pub fn store(&self, owner: &str, title: &str) -> Result<Image, UploadError> {
        if !web::is_name(owner) {
            return Err(UploadError::Owner(owner.to_owned()));
        }
        let title = title.trim();
        if title.is_empty()
            || title.chars().count() > MAX_TITLE
            || title.chars().any(char::is_control)
        {
            return Err(UploadError::Title);
        }
        let mut state = self.state();
        let id = {
            let last = state.last_id.entry(owner.to_owned()).or_insert(0);
            *last += 1;
            last.to_string()
        };
        let image = Image {
            url: format!("/images/{owner}/{id}.svg"),
            id,
            owner: owner.to_owned(),
            title: title.to_owned(),
            region: self.region.clone(),
        };
        state.images.push(image.clone());
        state.owners.insert(owner.to_owned());
        Ok(image)
    }

    /// The images of these owners, newest first per owner, in the order the owners are given;
    /// the owners count as served.
    pub fn images_of(&self, owners: &[String]) -> Vec<Image> {
        let mut state = self.state();
        let mut out = Vec::new();
        for owner in owners {
            state.owners.insert(owner.clone());
            out.extend(
                state
                    .images
                    .iter()
                    .rev()
                    .filter(|i| &i.owner == owner)
                    .cloned(),
            );
        }
        out
    }

    /// `{"shard", "region", "owners", "images"}`: the owners this shard served or stored.
    pub fn stats(&self) -> serde_json::Value {
        let state = self.state();
        serde_json::json!({
            "shard": self.shard,
            "region": self.region,
            "owners": state.owners,
            "images": state.images.len(),
        })
    }

    /// The shard's HTTP API.
    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req| {
            let resp = self.answer(&req);
            Box::pin(async move { resp })
        })
    }

    fn answer(&self, req: &Request<Bytes>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/health") => {
                web::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            }
            (&Method::GET, "/stats") => web::json(StatusCode::OK, &self.stats()),
            (&Method::GET, "/images") => {
                let owners: Vec<String> = req
                    .uri()
                    .query()
                    .and_then(|q| crate::route::query_param(q, "users"))
                    .map(|v| {
                        v.split(',')
                            .filter(|o| !o.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                let images = self.images_of(&owners);
                web::json(StatusCode::OK, &serde_json::json!({ "images": images }))
            }
            (method, _) => match path.strip_prefix("/images/").map(|r| r.split_once('/')) {
                Some(Some((owner, file))) if method == Method::GET => {
                    self.picture(&web::decode(owner), file)
                }
                Some(None) => {
                    let owner = web::decode(&path["/images/".len()..]);
                    match *method {
                        Method::POST => self.upload(&owner, &req.body()[..]),
                        Method::GET => {
                            let images = self.images_of(std::slice::from_ref(&owner));
                            web::json(StatusCode::OK, &serde_json::json!({ "images": images }))
                        }
                        _ => web::error(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "method-not-allowed",
                            "GET or POST /images/{owner}",
                        ),
                    }
                }
                _ => web::error(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "try GET /images?users=a,b, GET /images/{owner}/{id}.svg, POST /images/{owner}, GET /stats",
                ),
            },
        }
    }

    fn picture(&self, owner: &str, file: &str) -> Response<Full<Bytes>> {
        let id = file.strip_suffix(".svg").unwrap_or(file);
        let found = self
            .images_of(&[owner.to_owned()])
            .into_iter()
            .find(|i| i.id == id);
        match found {
            Some(image) => web::respond(StatusCode::OK, "image/svg+xml", super::svg::tile(&image)),
            None => web::error(
                StatusCode::NOT_FOUND,
                "no-such-image",
                format!("{} has no image {owner}/{id}", self.shard),
            ),
        }
    }

    fn upload(&self, owner: &str, body: &[u8]) -> Response<Full<Bytes>> {
        #[derive(serde::Deserialize)]
        struct Upload {
            title: String,
        }
        let upload: Upload = match serde_json::from_slice(body) {
            Ok(u) => u,
            Err(e) => {
                return web::error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    format!("expected {{\"title\": ...}}: {e}"),
                )
            }
        };
        match self.store(owner, &upload.title) {
            Ok(image) => web::json(
                StatusCode::CREATED,
                &serde_json::to_value(image).unwrap_or_default(),
            ),
            Err(e) => web::error(StatusCode::BAD_REQUEST, "bad-request", e),
        }
    }
}

/// Two titles for each demo person's seeded images.
pub fn seed_titles(owner: &str) -> &'static [&'static str] {
    match owner {
        "alice" => &["Golden Gate at dawn", "Latte art"],
        "bob" => &["Tower Bridge in fog", "Sunday roast"],
        "carlos" => &["Copacabana at noon", "Feijoada night"],
        "priya" => &["Monsoon in Mumbai", "Chai on the corner"],
        "arjun" => &["Hampi boulders", "Diwali lights"],
        _ => &["First picture", "Second picture"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(store: &ImageStore, method: Method, uri: &str, body: &str) -> (u16, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Bytes::from(body.to_owned()))
            .unwrap();
        let resp = store.answer(&req);
        let status = resp.status().as_u16();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        (status, body)
    }

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn stores_lists_draws_and_counts_owners() {
        let store = ImageStore::new("india", "IN");
        store.store("priya", "Monsoon").unwrap();
        assert_eq!(
            json(&call(&store, Method::GET, "/stats", "").1)["owners"],
            serde_json::json!(["priya"])
        );
        let (status, created) = call(
            &store,
            Method::POST,
            "/images/priya",
            r#"{"title": "Chai"}"#,
        );
        assert_eq!(status, 201);
        let created = json(&created);
        assert_eq!(created["id"], "2");
        assert_eq!(created["region"], "IN");
        assert_eq!(created["url"], "/images/priya/2.svg");
        let (_, listed) = call(&store, Method::GET, "/images?users=priya%2Carjun", "");
        let titles: Vec<String> = json(&listed)["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["title"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(titles, ["Chai", "Monsoon"], "newest first");
        let (status, svg) = call(&store, Method::GET, "/images/priya/2.svg", "");
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&svg).contains("Chai"));
        assert_eq!(call(&store, Method::GET, "/images/priya/9.svg", "").0, 404);
        assert_eq!(
            json(&call(&store, Method::GET, "/stats", "").1)["owners"],
            serde_json::json!(["arjun", "priya"]),
            "asked-for owners count as served"
        );
        assert_eq!(call(&store, Method::POST, "/images/priya", "{}").0, 400);
        assert_eq!(
            call(&store, Method::POST, "/images/priya", r#"{"title": " "}"#).0,
            400
        );
        assert_eq!(
            store.store("../x", "t"),
            Err(UploadError::Owner("../x".into()))
        );
    }
}
