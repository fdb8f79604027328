//! The Users service of the seed: who each person is, the country they live in, and whom they
//! follow. The Activity Feed asks it (through attache) for follows; attache's directory asks it
//! for a person's `/country` to find their data's region.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::web::{self, Handler};

/// One person of the demo.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Person {
    /// The user name: the shard key attache reads from `/images/{user}/...`.
    pub name: &'static str,
    /// ISO 3166 country code; `IN` puts the person's data in the India shard.
    pub country: &'static str,
    /// Whose images this person's feed shows.
    pub follows: &'static [&'static str],
}

/// The demo's people (the DESIGN.md contract: alice follows priya, arjun, bob and carlos).
pub const PEOPLE: &[Person] = &[
    Person {
        name: "alice",
        country: "US",
        follows: &["priya", "arjun", "bob", "carlos"],
    },
    Person {
        name: "bob",
        country: "GB",
        follows: &["alice", "carlos"],
    },
    Person {
        name: "carlos",
        country: "BR",
        follows: &["alice", "bob", "priya"],
    },
    Person {
        name: "priya",
        country: "IN",
        follows: &["arjun", "alice"],
    },
    Person {
        name: "arjun",
        country: "IN",
        follows: &["priya", "carlos"],
    },
];

/// The person called `name`.
pub fn find(name: &str) -> Option<&'static Person> {
    PEOPLE.iter().find(|p| p.name == name)
}

/// The Users service: `GET /users/{name}` → `{"name", "country", "follows"}` (404 JSON for
/// anyone else), `GET /users` → everyone, `GET /health`.
pub fn handler() -> Handler {
    Arc::new(|req| {
        let resp = answer(&req);
        Box::pin(async move { resp })
    })
}

fn answer(req: &Request<Bytes>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return web::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "the Users service is read-only",
        );
    }
    let path = req.uri().path();
    if path == "/health" {
        return web::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }));
    }
    if path == "/users" {
        return web::json(StatusCode::OK, &serde_json::json!({ "users": PEOPLE }));
    }
    let Some(name) = path.strip_prefix("/users/") else {
        return web::error(StatusCode::NOT_FOUND, "not-found", "try GET /users/{name}");
    };
    let name = web::decode(name);
    match find(&name) {
        Some(p) => web::json(StatusCode::OK, &serde_json::to_value(p).unwrap_or_default()),
        None => web::error(
            StatusCode::NOT_FOUND,
            "unknown-user",
            format!("no user `{name}`"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> (u16, serde_json::Value) {
        let req = Request::get(path).body(Bytes::new()).unwrap();
        let resp = answer(&req);
        let status = resp.status().as_u16();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn answers_people_and_refuses_strangers() {
        let (status, alice) = get("/users/alice");
        assert_eq!(status, 200);
        assert_eq!(alice["country"], "US");
        assert_eq!(
            alice["follows"],
            serde_json::json!(["priya", "arjun", "bob", "carlos"])
        );
        assert_eq!(get("/users/priya").1["country"], "IN");
        let (status, nobody) = get("/users/a%2F..%2Fadmin");
        assert_eq!(status, 404);
        assert_eq!(nobody["error"], "unknown-user");
        // Everyone followed exists.
        for p in PEOPLE {
            for f in p.follows {
                assert!(find(f).is_some(), "{} follows unknown {f}", p.name);
            }
        }
    }
}
