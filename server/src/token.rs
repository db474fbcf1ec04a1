//! The bearer token a listener requires, as a value the node's settings
//! can hold below the transport that checks it (`api::auth`).

use std::fmt;

use sha2::{Digest, Sha256};

/// The token calls must present, kept only as its SHA-256 so it is compared
/// in constant time whatever its length and never printed.
#[derive(Clone)]
pub struct AuthToken {
    digest: [u8; 32],
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    pub fn new(token: &str) -> AuthToken {
        AuthToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token, in time independent of where they
    /// differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}
