//! Access tokens: short-lived JWTs signed with HS256 (`jsonwebtoken`).
//!
//! What it guarantees:
//! - **Pinned algorithm.** Only HS256 verifies. A token whose header names anything else
//!   (`none`, RS256 — the HS/RS confusion attack —, HS512, …) is refused before any
//!   signature work, whatever its signature.
//! - **Key rotation by `kid`.** Tokens are signed with the first configured key and carry
//!   its `kid`; every configured key verifies, so a new key can be put first while tokens
//!   signed with the old one live out their minutes. A token without a known `kid` is
//!   refused.
//! - **Checked claims.** Expiry (with 5 s of leeway for clock skew), not-before, issuer and
//!   audience are required and checked; the role must be one of the catalogue.
//!
//! Refresh tokens are not JWTs: they are 256-bit random strings whose digests live in the
//! metadata store, so they can be spent once and revoked (see `infra::meta::identity`).

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::rbac::Role;

const ISSUER: &str = "digame";
const AUDIENCE: &str = "digame-api";

/// The claims of an access token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The account id.
    pub sub: String,
    /// The tenant.
    pub tid: String,
    /// The role's name.
    pub role: String,
    /// The pseudonymous person id of the account, if linked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
    /// The session (refresh-token family): revoking it ends the token at once.
    pub sid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

impl Claims {
    /// The identity claims; times, issuer and audience are set by [`TokenKeys::issue`].
    pub fn new(sub: &str, tid: &str, role: &str, person: Option<&str>, sid: &str) -> Claims {
        Claims {
            sub: sub.into(),
            tid: tid.into(),
            role: role.into(),
            person: person.map(str::to_string),
            sid: sid.into(),
            iat: 0,
            nbf: 0,
            exp: 0,
            iss: String::new(),
            aud: String::new(),
        }
    }
}

/// Why a token was refused (the caller answers 401 with the message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm {0} is not accepted; tokens are HS256")]
    Algorithm(String),
    #[error("the token's key id is missing or unknown (keys rotated? sign in again)")]
    UnknownKey,
    #[error("the token has expired; refresh it or sign in again")]
    Expired,
    #[error("the token's signature or claims are invalid")]
    Invalid,
}

/// Signs and verifies access tokens.
pub struct TokenKeys {
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    validation: Validation,
    pub access_ttl_secs: i64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("signing_kid", &self.signing_kid)
            .field("kids", &self.verifying.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenKeys {
    /// `keys` are `(kid, secret)` pairs, the first one signing.
    pub fn new(keys: &[(String, String)], access_ttl_secs: i64) -> Result<TokenKeys, String> {
        // Only the RustCrypto backend is compiled in; installing it explicitly keeps that
        // choice independent of inference (a second backend would make it ambiguous).
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let (kid, secret) = keys
            .first()
            .ok_or("no token signing keys configured (auth.jwt_keys)")?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Ok(TokenKeys {
            signing_kid: kid.clone(),
            signing: EncodingKey::from_secret(secret.as_bytes()),
            verifying: keys
                .iter()
                .map(|(k, s)| (k.clone(), DecodingKey::from_secret(s.as_bytes())))
                .collect(),
            validation,
            access_ttl_secs,
        })
    }

    /// An access token for `claims` (its times and issuer are set here).
    pub fn issue(&self, mut claims: Claims, now_secs: i64) -> String {
        claims.iat = now_secs;
        claims.nbf = now_secs;
        claims.exp = now_secs + self.access_ttl_secs;
        claims.iss = ISSUER.into();
        claims.aud = AUDIENCE.into();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing_kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing).expect("HS256 signing cannot fail")
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            // An unknown `alg` (like "none") fails header parsing itself.
            if token.split('.').next().is_some_and(|h| !h.is_empty())
                && matches!(e.kind(), jsonwebtoken::errors::ErrorKind::Json(_))
            {
                TokenError::Algorithm("(unsupported)".into())
            } else {
                TokenError::Malformed
            }
        })?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or(TokenError::UnknownKey)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid,
                }
            })?;
        if Role::parse(&data.claims.role).is_none() {
            return Err(TokenError::Invalid);
        }
        Ok(data.claims)
    }
}

/// A fresh random secret of 256 bits, URL-safe (refresh tokens, reset tokens, keys).
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut out = String::with_capacity(64);
    for b in bytes {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    fn keys() -> TokenKeys {
        TokenKeys::new(
            &[
                ("k2".into(), "second-secret-of-at-least-32-bytes!!".into()),
                ("k1".into(), "first-secret-of-at-least-32-bytes!!!".into()),
            ],
            900,
        )
        .unwrap()
    }

    fn claims() -> Claims {
        Claims::new("acct-1", "acme", "member", Some("u-ana"), "s1")
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    /// A token with the given header and payload JSON, signed with HMAC-SHA256 `secret`.
    fn forge(header: &str, payload: &serde_json::Value, secret: &[u8]) -> String {
        use hmac::Mac;
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(payload.to_string()));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    fn payload(now: i64) -> serde_json::Value {
        serde_json::json!({"sub": "acct-1", "tid": "acme", "role": "tenant_admin", "sid": "s1",
            "iat": now, "nbf": now, "exp": now + 600, "iss": "digame", "aud": "digame-api"})
    }

    #[test]
    fn issued_tokens_verify_with_every_configured_kid() {
        let k = keys();
        let token = k.issue(claims(), now());
        let c = k.verify(&token).unwrap();
        assert_eq!((c.sub.as_str(), c.tid.as_str()), ("acct-1", "acme"));
        assert_eq!(c.exp - c.iat, 900);
        // After rotation (k1 now first), tokens signed with k2 still verify.
        let rotated = TokenKeys::new(
            &[
                ("k1".into(), "first-secret-of-at-least-32-bytes!!!".into()),
                ("k2".into(), "second-secret-of-at-least-32-bytes!!".into()),
            ],
            900,
        )
        .unwrap();
        assert_eq!(rotated.verify(&token).unwrap(), c);
        // Once k2 is retired, they do not.
        let retired = TokenKeys::new(
            &[("k1".into(), "first-secret-of-at-least-32-bytes!!!".into())],
            900,
        )
        .unwrap();
        assert_eq!(retired.verify(&token), Err(TokenError::UnknownKey));
    }

    #[test]
    fn expired_tampered_and_wrong_key_tokens_are_refused() {
        let k = keys();
        let old = k.issue(claims(), now() - 3600);
        assert_eq!(k.verify(&old), Err(TokenError::Expired));

        let token = k.issue(claims(), now());
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        // Promote oneself: same signature, changed payload.
        let mut p: serde_json::Value =
            serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        p["role"] = "platform_admin".into();
        parts[1] = B64.encode(p.to_string());
        assert_eq!(k.verify(&parts.join(".")), Err(TokenError::Invalid));

        // Signed with a key the server does not have, under a kid it does have.
        let wrong = forge(
            r#"{"alg":"HS256","typ":"JWT","kid":"k2"}"#,
            &payload(now()),
            b"attacker-secret-attacker-secret-000",
        );
        assert_eq!(k.verify(&wrong), Err(TokenError::Invalid));
        // A correctly signed token with the wrong audience or issuer.
        let mut other_aud = payload(now());
        other_aud["aud"] = "another-service".into();
        let t = forge(
            r#"{"alg":"HS256","kid":"k2"}"#,
            &other_aud,
            b"second-secret-of-at-least-32-bytes!!",
        );
        assert_eq!(k.verify(&t), Err(TokenError::Invalid));
        // Sanity: the forger makes tokens the server accepts when everything is right.
        let good = forge(
            r#"{"alg":"HS256","kid":"k2"}"#,
            &payload(now()),
            b"second-secret-of-at-least-32-bytes!!",
        );
        assert_eq!(k.verify(&good).unwrap().role, "tenant_admin");
        assert_eq!(k.verify("not a token"), Err(TokenError::Malformed));
    }

    #[test]
    fn none_and_confused_algorithms_are_refused() {
        let k = keys();
        let n = now();
        // alg: none with an empty signature.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","typ":"JWT","kid":"k2"}"#),
            B64.encode(payload(n).to_string())
        );
        assert!(
            matches!(k.verify(&none), Err(TokenError::Algorithm(_))),
            "{:?}",
            k.verify(&none)
        );
        // HS/RS confusion: RS256 in the header, HMAC'd with the server's secret (as an
        // attacker who holds a "public key" would); and other HMAC sizes with the secret.
        for alg in ["RS256", "ES256", "PS256", "HS384", "HS512", "EdDSA"] {
            let t = forge(
                &format!(r#"{{"alg":"{alg}","kid":"k2"}}"#),
                &payload(n),
                b"second-secret-of-at-least-32-bytes!!",
            );
            assert!(
                matches!(k.verify(&t), Err(TokenError::Algorithm(_))),
                "{alg}: {:?}",
                k.verify(&t)
            );
        }
        // A token without kid.
        let t = forge(
            r#"{"alg":"HS256"}"#,
            &payload(n),
            b"second-secret-of-at-least-32-bytes!!",
        );
        assert_eq!(k.verify(&t), Err(TokenError::UnknownKey));
    }

    #[test]
    fn unknown_roles_are_refused() {
        let k = keys();
        let mut p = payload(now());
        p["role"] = "superuser".into();
        let t = forge(
            r#"{"alg":"HS256","kid":"k2"}"#,
            &p,
            b"second-secret-of-at-least-32-bytes!!",
        );
        assert_eq!(k.verify(&t), Err(TokenError::Invalid));
    }
}
