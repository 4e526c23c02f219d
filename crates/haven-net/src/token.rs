//! Join tokens: `haven-join.<id>.<secret>.<ca-sha256>`.
//!
//! The id names the token in the replicated state; only a hash of the secret is stored
//! there, so a snapshot or log leaks no usable token. Expiry and single use are enforced
//! by the state machine (haven-store), where the check and the marking are one commit.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "a join token has the form haven-join.<id>.<secret>.<ca-sha256> (as printed by `haven cluster join-token`); this one {0}"
    )]
    Malformed(&'static str),
}

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl JoinToken {
    /// A fresh token for the cluster whose CA has `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> Self {
        JoinToken {
            id: random_hex(6),
            secret: random_hex(16),
            ca_fingerprint: ca_fingerprint.to_string(),
        }
    }

    /// What the replicated state keeps instead of the secret.
    pub fn secret_hash(&self) -> String {
        crate::tls::fingerprint_der(self.secret.as_bytes())
    }
}

// The secret must not end up in logs through `{:?}`.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({})", self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "haven-join.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some("haven-join") {
            return Err(TokenError::Malformed("does not start with haven-join."));
        }
        let (Some(id), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "does not have four dot-separated parts",
            ));
        };
        let hex = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_hexdigit());
        if !hex(id) || !hex(secret) {
            return Err(TokenError::Malformed("has an id or secret that is not hex"));
        }
        if fp.len() != 64 || !hex(fp) {
            return Err(TokenError::Malformed(
                "has a CA fingerprint that is not 64 hex digits",
            ));
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_through_its_text() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let back: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(back, t);
        assert_ne!(JoinToken::generate(&"ab".repeat(32)).secret, t.secret);
    }

    #[test]
    fn malformed_tokens_are_refused_with_the_rule() {
        assert!("nope".parse::<JoinToken>().is_err());
        assert!("haven-join.aa.bb".parse::<JoinToken>().is_err());
        let e = "haven-join.aa.bb.cc".parse::<JoinToken>().unwrap_err();
        assert!(e.to_string().contains("64 hex digits"));
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let t = JoinToken::generate(&"ab".repeat(32));
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
