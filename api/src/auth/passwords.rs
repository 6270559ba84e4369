//! Passwords: argon2id hashing and the acceptance rules.
//!
//! - Hashes are argon2id (19 MiB, 2 passes, 1 lane: the OWASP baseline) in PHC form with a
//!   random salt each; verification reads the parameters from the stored string, so they
//!   can be raised later without invalidating old hashes.
//! - A password is accepted when it is 12 to 128 characters long and `zxcvbn` (which
//!   knows the passwords of public breach corpora, keyboard walks, dates, repeats and
//!   l33t substitutions) scores it at least 3 of 4 — with the account's own email and
//!   name counted as known words. The upper bound keeps hashing cost bounded.
//! - Hashing is CPU work of tens of ms: callers run it on the blocking pool.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

pub const MIN_LEN: usize = 12;
pub const MAX_LEN: usize = 128;

fn hasher() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"),
    )
}

/// Checks `password` against the rules; the error says what to change.
pub fn check_policy(password: &str, known: &[&str]) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_LEN {
        return Err(format!(
            "password is {chars} characters; use at least {MIN_LEN} (a passphrase of several words works well)"
        ));
    }
    if chars > MAX_LEN {
        return Err(format!(
            "password is {chars} characters; use at most {MAX_LEN}"
        ));
    }
    let entropy = zxcvbn::zxcvbn(password, known);
    if (entropy.score() as u8) < 3 {
        let hint = entropy
            .feedback()
            .and_then(|f| f.warning().map(|w| w.to_string()))
            .unwrap_or_else(|| "it is too easy to guess".into());
        return Err(format!(
            "password is too weak ({hint}); avoid common passwords, names, dates and keyboard patterns"
        ));
    }
    Ok(())
}

/// The argon2id PHC string of `password`.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with valid parameters cannot fail")
        .to_string()
}

/// Whether `password` matches the stored PHC string (false for a malformed one).
pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|parsed| {
            hasher()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash no password matches, verified against when an email is unknown so that a
/// failed login takes as long whether or not the account exists.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash(&super::tokens::random_secret()));
    &DECOY
}

/// A generated password that passes the rules: 24 characters from a 56-symbol alphabet
/// without look-alikes (~139 bits).
pub fn generate() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let h1 = hash("correct horse battery staple");
        let h2 = hash("correct horse battery staple");
        assert!(h1.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h1}");
        assert_ne!(h1, h2, "a fresh salt each time");
        assert!(verify("correct horse battery staple", &h1));
        assert!(!verify("correct horse battery stapler", &h1));
        assert!(!verify("anything", "not a phc string"));
        assert!(!verify("", decoy_hash()));
    }

    #[test]
    fn the_policy_refuses_short_long_common_and_personal_passwords() {
        let err = check_policy("Sh0rt!", &[]).unwrap_err();
        assert!(err.contains("use at least 12"), "{err}");
        let err = check_policy(&"x".repeat(129), &[]).unwrap_err();
        assert!(err.contains("at most 128"), "{err}");
        for weak in [
            "password1234",
            "qwertyuiop123",
            "123456789012",
            "iloveyou2024!",
        ] {
            let err = check_policy(weak, &[]).unwrap_err();
            assert!(err.contains("too weak"), "{weak}: {err}");
        }
        // The person's own address as a password.
        let err = check_policy(
            "ana.lopez@acme.example1",
            &["ana.lopez@acme.example", "Ana Lopez"],
        )
        .unwrap_err();
        assert!(err.contains("too weak"), "{err}");
        check_policy("violet tram ceiling 47 oboe", &[]).unwrap();
        for _ in 0..20 {
            let g = generate();
            assert_eq!(g.len(), 24);
            check_policy(&g, &[]).unwrap();
        }
    }
}
