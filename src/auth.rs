//! Who is asking: JWT identities for WebSocket clients and API keys for the
//! HTTP API. With auth `jwt`, a client's identity comes from nothing but a
//! verified token.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

reason_error!(
    /// Why a user id is not acceptable.
    InvalidUserId
);
reason_error!(
    /// Why a token was refused, fit to show the client.
    TokenRefused
);
reason_error!(
    /// Why a key (a JWT key, an API key) cannot be used.
    BadKey
);

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
    /// A trusted backend (a STOMP session that presented an API key, such
    /// as a Spring instance's broker relay): it may subscribe and send to
    /// any destination, queues included, and is not held to the per-user
    /// connection limit.
    pub backend: bool,
}

impl Identity {
    /// An identity named by the `user` query parameter, for auth `none`.
    pub fn unauthenticated(user_id: &str) -> Result<Self, InvalidUserId> {
        validate_user_id(user_id)?;
        Ok(Self {
            user_id: user_id.into(),
            topics: vec![">".into()],
            publish: vec![">".into()],
            backend: false,
        })
    }

    /// A trusted backend session named `name` (its STOMP `login`).
    pub fn backend(name: &str) -> Result<Self, InvalidUserId> {
        validate_user_id(name)?;
        Ok(Self {
            user_id: name.into(),
            topics: vec![">".into()],
            publish: vec![">".into()],
            backend: true,
        })
    }
}

/// Checks a user id from any source; the error says what is wrong with it.
pub fn validate_user_id(user_id: &str) -> Result<(), InvalidUserId> {
    if user_id.is_empty() {
        return Err("user id is empty".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!("user id is longer than {MAX_USER_ID_BYTES} bytes").into());
    }
    if user_id.chars().any(char::is_control) {
        return Err("user id contains control characters".into());
    }
    // Percent-decoding turns invalid UTF-8 into U+FFFD, so that distinct
    // byte strings would name the same user.
    if user_id.contains(char::REPLACEMENT_CHARACTER) {
        return Err("user id is not valid UTF-8 (contains U+FFFD)".into());
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

/// Verifies client JWTs. Each key is bound to the one algorithm it allows:
/// an HMAC secret never verifies an RSA/EC token and the reverse, which is
/// what stops algorithm confusion; `alg: none` is never accepted. Several
/// keys are held during a rotation: a token naming a `kid` is checked with
/// that key, one without with every key of its algorithm.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Arc<Vec<VerifyingKey>>,
}

#[derive(Clone)]
struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    pub fn hs256(secret: &[u8]) -> Result<Self, BadKey> {
        if secret.len() < 16 {
            return Err("PGRELAY_JWT_SECRET must be at least 16 bytes".into());
        }
        Ok(Self::with(
            None,
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// RS256 (RSA) and ES256 (P-256) verifiers from PEM public keys: one
    /// file may hold several, for a rotation.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, BadKey> {
        let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file (not UTF-8)")?;
        let mut keys = Vec::new();
        for block in pem_blocks(text) {
            if let Ok(key) = DecodingKey::from_rsa_pem(block.as_bytes()) {
                keys.push(VerifyingKey::new(None, key, Algorithm::RS256));
            } else if let Ok(key) = DecodingKey::from_ec_pem(block.as_bytes()) {
                keys.push(VerifyingKey::new(None, key, Algorithm::ES256));
            } else {
                return Err("not an RSA or EC public key in PEM format".into());
            }
        }
        if keys.is_empty() {
            return Err("no PEM public key found".into());
        }
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// RS256 and ES256 verifiers from a JWKS document (`{"keys": [...]}`),
    /// as identity providers publish them.
    pub fn from_jwks(json: &[u8]) -> Result<Self, BadKey> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let name = jwk.common.key_id.as_deref().unwrap_or("without a kid");
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256) | None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256) | None, AlgorithmParameters::EllipticCurve(ec))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => {
                    return Err(format!(
                        "key {name}: only RS256 (RSA) and ES256 (P-256) keys are supported"
                    )
                    .into());
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
            keys.push(VerifyingKey::new(jwk.common.key_id.clone(), key, algorithm));
        }
        if keys.is_empty() {
            return Err("the JWKS document holds no keys".into());
        }
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// Also accepts tokens that `other` accepts: the previous key during a
    /// rotation.
    pub fn or(self, other: JwtVerifier) -> Self {
        let mut keys: Vec<VerifyingKey> = self.keys.iter().cloned().collect();
        keys.extend(other.keys.iter().cloned());
        Self {
            keys: Arc::new(keys),
        }
    }

    /// Also requires this audience and issuer, where given.
    pub fn expecting(self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        let keys = self
            .keys
            .iter()
            .map(|key| {
                let mut key = key.clone();
                let mut required = vec!["exp", "sub"];
                if let Some(audience) = audience {
                    key.validation.set_audience(&[audience]);
                    key.validation.validate_aud = true;
                    required.push("aud");
                }
                if let Some(issuer) = issuer {
                    key.validation.set_issuer(&[issuer]);
                    required.push("iss");
                }
                // A token without the claim must not slip past its check.
                key.validation.set_required_spec_claims(&required);
                key
            })
            .collect();
        Self {
            keys: Arc::new(keys),
        }
    }

    fn with(kid: Option<String>, key: DecodingKey, algorithm: Algorithm) -> Self {
        Self {
            keys: Arc::new(vec![VerifyingKey::new(kid, key, algorithm)]),
        }
    }

    /// # Errors
    /// Why the token was refused, fit to show the client.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenRefused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("invalid token: {e}"))?;
        let named = header
            .kid
            .as_deref()
            .filter(|kid| self.keys.iter().any(|key| key.kid.as_deref() == Some(kid)));
        let candidates = self.keys.iter().filter(|key| {
            key.validation.algorithms == [header.alg]
                && (named.is_none() || key.kid.as_deref() == named)
        });
        let mut refusal = format!("invalid token: no key for {:?} tokens", header.alg);
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                Ok(data) => {
                    validate_user_id(&data.claims.sub)
                        .map_err(|e| format!("invalid token: {e}"))?;
                    return Ok(Identity {
                        user_id: data.claims.sub.into(),
                        topics: data.claims.topics,
                        publish: data.claims.publish,
                        backend: false,
                    });
                }
                Err(e) => refusal = format!("invalid token: {e}"),
            }
        }
        Err(refusal.into())
    }
}

impl VerifyingKey {
    fn new(kid: Option<String>, key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Self {
            kid,
            key,
            validation,
        }
    }
}

/// The `-----BEGIN ...-----` to `-----END ...-----` blocks of a PEM file.
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let Some(end_marker) = rest[begin..].find("-----END ") else {
            break;
        };
        let end_marker = begin + end_marker;
        let end = rest[end_marker + 9..]
            .find("-----")
            .map_or(rest.len(), |n| end_marker + 9 + n + 5);
        blocks.push(&rest[begin..end]);
        rest = &rest[end..];
    }
    blocks
}

/// The HTTP API's bearer keys, kept as SHA-256 digests and compared in
/// constant time, so that neither a key's length nor its prefix leaks. Keys
/// come from the configuration and from `relay.api_keys` (reloaded while the
/// node runs, so that keys are added and revoked without a restart).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
    stored: Arc<std::sync::RwLock<Vec<[u8; 32]>>>,
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, BadKey> {
        let mut digests = Vec::new();
        for key in keys.into_iter().map(str::trim).filter(|k| !k.is_empty()) {
            if key.len() < 16 {
                return Err("PGRELAY_API_KEYS: every key must be at least 16 characters".into());
            }
            digests.push(digest(key));
        }
        Ok(Self {
            digests: Arc::new(digests),
            stored: Arc::default(),
        })
    }

    /// Replaces the keys read from the database.
    pub fn set_stored(&self, digests: Vec<[u8; 32]>) {
        *self.stored.write().expect("api keys lock") = digests;
    }

    pub fn len(&self) -> usize {
        self.digests.len() + self.stored.read().expect("api keys lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let stored = self.stored.read().expect("api keys lock");
        // Visit every key whatever matches, so timing says nothing about which.
        self.digests
            .iter()
            .chain(stored.iter())
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&presented)
            })
            .into()
    }
}

/// The digest under which a key is stored.
pub fn digest(key: &str) -> [u8; 32] {
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
    fn audience_and_issuer_are_checked_when_configured() {
        let verifier = JwtVerifier::hs256(SECRET)
            .unwrap()
            .expecting(Some("relay"), Some("auth.example"));
        let good = token(
            json!({"sub": "a", "exp": in_an_hour(), "aud": "relay", "iss": "auth.example"}),
            SECRET,
        );
        assert!(verifier.verify(&good).is_ok());
        for bad in [
            json!({"sub": "a", "exp": in_an_hour(), "aud": "other", "iss": "auth.example"}),
            json!({"sub": "a", "exp": in_an_hour(), "aud": "relay", "iss": "evil"}),
            json!({"sub": "a", "exp": in_an_hour()}),
        ] {
            assert!(verifier.verify(&token(bad, SECRET)).is_err());
        }
        // Not yet valid.
        let early = token(
            json!({"sub": "a", "exp": in_an_hour(), "nbf": in_an_hour() - 60, "aud": "relay", "iss": "auth.example"}),
            SECRET,
        );
        assert!(verifier.verify(&early).is_err());
    }

    #[test]
    fn an_hmac_token_signed_with_a_public_key_is_refused() {
        // Algorithm confusion: an attacker signs HS256 with the (public) RSA
        // key bytes; a verifier that holds that key must not accept it.
        let pem = include_bytes!("../tests/keys/rsa-public.pem");
        let verifier = JwtVerifier::from_public_pem(pem).unwrap();
        let forged = token(json!({"sub": "a", "exp": in_an_hour()}), pem);
        assert!(verifier.verify(&forged).is_err());
    }

    fn signed(algorithm: Algorithm, kid: Option<&str>, private_pem: &[u8]) -> String {
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem).unwrap(),
            _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
        };
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        encode(&header, &json!({"sub": "kim", "exp": in_an_hour()}), &key).unwrap()
    }

    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/keys/rsa-private.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../tests/keys/ec-private.pem");

    #[test]
    fn during_a_secret_rotation_both_secrets_verify() {
        let previous = b"the-previous-secret-0123";
        let verifier = JwtVerifier::hs256(SECRET)
            .unwrap()
            .or(JwtVerifier::hs256(previous).unwrap());
        let claims = json!({"sub": "kim", "exp": in_an_hour()});
        assert!(verifier.verify(&token(claims.clone(), SECRET)).is_ok());
        assert!(verifier.verify(&token(claims.clone(), previous)).is_ok());
        assert!(
            verifier
                .verify(&token(claims, b"neither-of-them-0123456"))
                .is_err()
        );
    }

    #[test]
    fn a_pem_file_with_several_keys_verifies_tokens_from_each() {
        let both = [
            &include_bytes!("../tests/keys/rsa-public.pem")[..],
            &include_bytes!("../tests/keys/ec-public.pem")[..],
        ]
        .concat();
        let verifier = JwtVerifier::from_public_pem(&both).unwrap();
        assert!(
            verifier
                .verify(&signed(Algorithm::RS256, None, RSA_PRIVATE))
                .is_ok()
        );
        assert!(
            verifier
                .verify(&signed(Algorithm::ES256, None, EC_PRIVATE))
                .is_ok()
        );
        assert!(JwtVerifier::from_public_pem(b"no keys here").is_err());
    }

    #[test]
    fn a_jwks_document_verifies_by_kid_and_algorithm() {
        let verifier = JwtVerifier::from_jwks(include_bytes!("../tests/keys/jwks.json")).unwrap();
        assert!(
            verifier
                .verify(&signed(Algorithm::RS256, Some("rsa-2026"), RSA_PRIVATE))
                .is_ok()
        );
        assert!(
            verifier
                .verify(&signed(Algorithm::ES256, Some("ec-2026"), EC_PRIVATE))
                .is_ok()
        );
        // No kid, or one this document does not know: every key of the algorithm is tried.
        assert!(
            verifier
                .verify(&signed(Algorithm::ES256, None, EC_PRIVATE))
                .is_ok()
        );
        assert!(
            verifier
                .verify(&signed(Algorithm::RS256, Some("retired"), RSA_PRIVATE))
                .is_ok()
        );
        // A kid names the key: an RSA token claiming the EC key's kid fails.
        assert!(
            verifier
                .verify(&signed(Algorithm::RS256, Some("ec-2026"), RSA_PRIVATE))
                .is_err()
        );
        let forged = token(
            json!({"sub": "kim", "exp": in_an_hour()}),
            include_bytes!("../tests/keys/jwks.json"),
        );
        assert!(verifier.verify(&forged).is_err());
        assert!(JwtVerifier::from_jwks(br#"{"keys": []}"#).is_err());
        assert!(JwtVerifier::from_jwks(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
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
        keys.set_stored(vec![digest("stored-key-0123456789")]);
        assert!(keys.accepts("stored-key-0123456789"));
        keys.set_stored(vec![]);
        assert!(!keys.accepts("stored-key-0123456789"), "revoked");
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
        assert!(
            validate_user_id("\u{FFFD}\u{FFFD}").is_err(),
            "lossily decoded bytes"
        );
    }
}
