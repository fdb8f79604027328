//! Shard keys: read from a header, a query parameter, a cookie, a path capture, or a JWT
//! claim (signature verified unless explicitly opted out), and checked before anything uses
//! them: bounded length, valid UTF-8, no control characters, never `.` or `..`.

use std::borrow::Cow;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{JwtKey, JwtVerify, KeySource, PathMatch, Route};
use crate::route::{Captures, RequestHead};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Why a request has no usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The request does not carry the key at all.
    Missing,
    /// The key is there but unusable (too long, not UTF-8, control characters).
    Invalid(String),
    /// The JWT is missing, malformed, expired or its signature does not verify.
    Unauthorized(String),
}

/// Reads the shard key of a request.
pub fn extract<'a>(
    source: &KeySource,
    head: &RequestHead<'a>,
    captures: &Captures,
    route: &Route,
) -> Result<Cow<'a, str>, KeyError> {
    let raw: Cow<'a, str> = match source {
        KeySource::Header(h) => match head.headers.get(h) {
            None => return Err(KeyError::Missing),
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => return Err(KeyError::Invalid(format!("header {h} is not UTF-8"))),
            },
        },
        KeySource::Query(q) => {
            let query = head.query.ok_or(KeyError::Missing)?;
            let raw = raw_query_param(query, q).ok_or(KeyError::Missing)?;
            strict_decode(raw)?
        }
        KeySource::Cookie(c) => Cow::Borrowed(head.cookie(c).ok_or(KeyError::Missing)?),
        KeySource::Capture(name) => {
            let Some(PathMatch::Template(t)) = &route.matcher.path else {
                return Err(KeyError::Missing);
            };
            let raw = t
                .name_index(name)
                .and_then(|i| captures.get(i, head.path))
                .ok_or(KeyError::Missing)?;
            strict_decode(raw)?
        }
        KeySource::Jwt(jwt) => Cow::Owned(jwt_claim(jwt, head)?),
    };
    check(raw)
}

/// Checks a key from any source (also the keys of a batch).
pub fn check(key: Cow<'_, str>) -> Result<Cow<'_, str>, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Missing);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::Invalid(format!(
            "the key is {} bytes; at most {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(KeyError::Invalid("the key has control characters".into()));
    }
    if key == "." || key == ".." {
        return Err(KeyError::Invalid("`.` and `..` are not keys".into()));
    }
    Ok(key)
}

fn raw_query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Percent-decodes, refusing bytes that are not UTF-8 (a lossy decode would merge keys).
fn strict_decode(raw: &str) -> Result<Cow<'_, str>, KeyError> {
    if !raw.contains(['%', '+']) {
        return Ok(Cow::Borrowed(raw));
    }
    let plus = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(|s| Cow::Owned(s.into_owned()))
        .map_err(|_| KeyError::Invalid("the key is not UTF-8 once percent-decoded".into()))
}

fn jwt_claim(jwt: &JwtKey, head: &RequestHead<'_>) -> Result<String, KeyError> {
    let value = head.headers.get(&jwt.header).ok_or(KeyError::Missing)?;
    let value = crate::route::as_text(value)
        .ok_or_else(|| KeyError::Unauthorized("the token header is not text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .unwrap_or(value)
        .trim();
    let (key, alg) = match &jwt.verify {
        JwtVerify::Hs256(secret) => (DecodingKey::from_secret(secret), Algorithm::HS256),
        JwtVerify::Rs256(pem) => (
            DecodingKey::from_rsa_pem(pem).map_err(|e| KeyError::Unauthorized(e.to_string()))?,
            Algorithm::RS256,
        ),
        JwtVerify::Es256(pem) => (
            DecodingKey::from_ec_pem(pem).map_err(|e| KeyError::Unauthorized(e.to_string()))?,
            Algorithm::ES256,
        ),
        JwtVerify::UnverifiedBehindTrustedGateway => {
            (DecodingKey::from_secret(b""), Algorithm::HS256)
        }
    };
    let mut validation = Validation::new(alg);
    // `exp` is checked when present; tokens without it are accepted (many internal ones).
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    if matches!(jwt.verify, JwtVerify::UnverifiedBehindTrustedGateway) {
        validation.insecure_disable_signature_validation();
        validation.algorithms = vec![
            Algorithm::HS256,
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::PS256,
            Algorithm::EdDSA,
        ];
    }
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| KeyError::Unauthorized(format!("invalid token: {e}")))?;
    match data.claims.get(&jwt.claim) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(KeyError::Invalid(format!(
            "claim `{}` is not a string",
            jwt.claim
        ))),
        None => Err(KeyError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn jwt(verify: JwtVerify) -> JwtKey {
        JwtKey {
            header: http::header::AUTHORIZATION,
            claim: "sub".into(),
            verify,
        }
    }

    fn head_with<'a>(req: &'a http::Request<()>) -> RequestHead<'a> {
        RequestHead::new(req.method(), req.uri(), req.headers())
    }

    #[test]
    fn jwt_claims_are_verified() {
        let token = encode(
            &Header::default(),
            &serde_json::json!({"sub": "priya"}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        let req = http::Request::get("/x")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let head = head_with(&req);
        assert_eq!(
            jwt_claim(&jwt(JwtVerify::Hs256(b"s3cret".to_vec())), &head).unwrap(),
            "priya"
        );
        assert!(matches!(
            jwt_claim(&jwt(JwtVerify::Hs256(b"wrong".to_vec())), &head),
            Err(KeyError::Unauthorized(_))
        ));
        // The explicit opt-in reads claims without a key.
        assert_eq!(
            jwt_claim(&jwt(JwtVerify::UnverifiedBehindTrustedGateway), &head).unwrap(),
            "priya"
        );
        // Expired tokens are refused.
        let expired = encode(
            &Header::default(),
            &serde_json::json!({"sub": "priya", "exp": 1_000_000}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        let req = http::Request::get("/x")
            .header("authorization", format!("Bearer {expired}"))
            .body(())
            .unwrap();
        assert!(matches!(
            jwt_claim(&jwt(JwtVerify::Hs256(b"s3cret".to_vec())), &head_with(&req)),
            Err(KeyError::Unauthorized(_))
        ));
    }

    /// A key pair made by the openssl command (installed by scripts/test): (private, public).
    fn openssl_pair(dir: &std::path::Path, name: &str, algorithm: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let private = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["genpkey", "-out"])
            .arg(&private)
            .args(algorithm)
            .status()
            .expect("openssl is needed for this test (scripts/test installs it)")
            .success();
        assert!(ok);
        let ok = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        (
            std::fs::read(private).unwrap(),
            std::fs::read(public).unwrap(),
        )
    }

    #[test]
    fn rs256_and_es256_signatures_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = openssl_pair(
            dir.path(),
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let other_rsa = openssl_pair(
            dir.path(),
            "rsa2",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let ec = openssl_pair(
            dir.path(),
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        );
        let claims = serde_json::json!({"sub": "arjun"});
        let cases = [
            (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(&rsa.0).unwrap(),
                JwtVerify::Rs256(rsa.1.clone()),
                true,
            ),
            (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(&other_rsa.0).unwrap(),
                JwtVerify::Rs256(rsa.1.clone()),
                false,
            ),
            (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(&ec.0).unwrap(),
                JwtVerify::Es256(ec.1.clone()),
                true,
            ),
            (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(&ec.0).unwrap(),
                JwtVerify::Rs256(rsa.1.clone()),
                false,
            ),
        ];
        for (alg, signing, verify, valid) in cases {
            let token = encode(&Header::new(alg), &claims, &signing).unwrap();
            let req = http::Request::get("/x")
                .header("authorization", format!("Bearer {token}"))
                .body(())
                .unwrap();
            let got = jwt_claim(&jwt(verify), &head_with(&req));
            if valid {
                assert_eq!(got.unwrap(), "arjun", "{alg:?}");
            } else {
                assert!(
                    matches!(got, Err(KeyError::Unauthorized(_))),
                    "{alg:?}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check(Cow::Borrowed("priya")).is_ok());
        assert!(matches!(
            check(Cow::Owned("x".repeat(300))),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            check(Cow::Borrowed("a\nb")),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            check(Cow::Borrowed("..")),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(check(Cow::Borrowed("")), Err(KeyError::Missing));
        assert!(matches!(strict_decode("%FF"), Err(KeyError::Invalid(_))));
        assert_eq!(strict_decode("a%2Fb").unwrap(), "a/b");
    }
}
