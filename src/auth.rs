//! Who is asking: JWT identities for WebSocket clients and API keys for the
//! HTTP API. With auth `jwt`, a client's identity comes from nothing but a
//! verified token.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest user id accepted, in bytes: ids are stored and compared in SQL and
/// appear in every frame, so an unbounded one is a cost for everyone.
pub const MAX_USER_ID_BYTES: usize = 256;

/// A verified client: the user and what the token allows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    /// Topic patterns the user may subscribe to (JWT claim `topics`).
    pub topics: Vec<String>,
    /// Topic patterns the user may publish to (JWT claim `publish`).
    pub publish: Vec<String>,
}

impl Identity {
    /// An identity named by the `user` query parameter, for auth `none`.
    pub fn unauthenticated(user_id: &str) -> Result<Self, String> {
        validate_user_id(user_id)?;
        Ok(Self {
            user_id: user_id.into(),
            topics: vec![">".into()],
            publish: vec![">".into()],
        })
    }
}

/// Checks a user id from any source; the error says what is wrong with it.
pub fn validate_user_id(user_id: &str) -> Result<(), String> {
    if user_id.is_empty() {
        return Err("user id is empty".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!("user id is longer than {MAX_USER_ID_BYTES} bytes"));
    }
    if user_id.chars().any(char::is_control) {
        return Err("user id contains control characters".into());
    }
    Ok(())
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Verifies client JWTs with one key and the algorithms that key allows: an
/// HMAC secret never verifies an RSA/EC token and the reverse, which is what
/// stops algorithm confusion; `alg: none` is never accepted.
#[derive(Clone)]
pub struct JwtVerifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

impl JwtVerifier {
    pub fn hs256(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err("PGRELAY_JWT_SECRET must be at least 16 bytes".into());
        }
        Ok(Self::with(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// An RS256 (RSA) or ES256 (P-256) verifier from a PEM public key.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::with(key, Algorithm::ES256));
        }
        Err("not an RSA or EC public key in PEM format".into())
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Self {
            key: Arc::new(key),
            validation: Arc::new(validation),
        }
    }

    /// # Errors
    /// Why the token was refused, fit to show the client.
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        validate_user_id(&data.claims.sub).map_err(|e| format!("invalid token: {e}"))?;
        Ok(Identity {
            user_id: data.claims.sub.into(),
            topics: data.claims.topics,
            publish: data.claims.publish,
        })
    }
}

/// The HTTP API's bearer keys, kept as SHA-256 digests and compared in
/// constant time, so that neither a key's length nor its prefix leaks.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut digests = Vec::new();
        for key in keys.into_iter().map(str::trim).filter(|k| !k.is_empty()) {
            if key.len() < 16 {
                return Err("PGRELAY_API_KEYS: every key must be at least 16 characters".into());
            }
            digests.push(digest(key));
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The scope of a key's idempotency keys: a digest prefix, so that the
    /// key itself is never stored.
    pub fn scope_of(presented: &str) -> String {
        let digest = digest(presented);
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("key:{hex}")
    }

    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        // Visit every key whatever matches, so timing says nothing about which.
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&presented)
            })
            .into()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"a-test-secret-of-some-length";

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn in_an_hour() -> i64 {
        chrono::Utc::now().timestamp() + 3600
    }

    #[test]
    fn a_valid_token_names_the_user_and_its_claims() {
        let verifier = JwtVerifier::hs256(SECRET).unwrap();
        let t = token(
            json!({"sub": "alice", "exp": in_an_hour(), "topics": ["chat.*"]}),
            SECRET,
        );
        let identity = verifier.verify(&t).unwrap();
        assert_eq!(&*identity.user_id, "alice");
        assert_eq!(identity.topics, vec!["chat.*"]);
        assert!(identity.publish.is_empty());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let verifier = JwtVerifier::hs256(SECRET).unwrap();
        let wrong_key = token(
            json!({"sub": "alice", "exp": in_an_hour()}),
            b"another-secret-of-some-length",
        );
        assert!(verifier.verify(&wrong_key).is_err());
        let expired = token(json!({"sub": "alice", "exp": 1_000_000}), SECRET);
        assert!(verifier.verify(&expired).is_err());
        let no_exp = token(json!({"sub": "alice"}), SECRET);
        assert!(verifier.verify(&no_exp).is_err());
        let no_sub = token(json!({"exp": in_an_hour()}), SECRET);
        assert!(verifier.verify(&no_sub).is_err());
        assert!(verifier.verify("not.a.token").is_err());
        // alg "none", unsigned.
        let unsigned =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(verifier.verify(unsigned).is_err());
    }

    #[test]
    fn api_keys_match_exactly() {
        let keys = ApiKeys::new(["key-one-0123456789", " key-two-0123456789 ", ""]).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts("key-one-0123456789"));
        assert!(keys.accepts("key-two-0123456789"));
        assert!(!keys.accepts("key-one-012345678"));
        assert!(!keys.accepts(""));
        assert!(ApiKeys::new(["short"]).is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn user_ids_are_bounded() {
        assert!(validate_user_id("alice").is_ok());
        assert!(validate_user_id("o'brien %_").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id(&"x".repeat(257)).is_err());
        assert!(validate_user_id("a\nb").is_err());
    }
}
