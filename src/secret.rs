//! Bearer tokens: compared in constant time, never printed.

use subtle::ConstantTimeEq;

/// A shared secret from config or flags. `Debug` prints no part of it, so a
/// logged config cannot leak it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(unset)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl Secret {
    /// Whether no secret was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` equals the secret, in time independent of where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        bool::from(given.ct_eq(self.0.as_bytes()))
    }

    /// Whether an `Authorization` value is `Bearer <secret>`, in constant
    /// time. The scheme is matched case-insensitively and may be followed by
    /// several spaces (RFC 9110 §11.1, §11.4).
    pub fn matches_bearer(&self, authorization: Option<&str>) -> bool {
        let given = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim_start_matches(' '));
        self.matches(given.as_bytes())
    }

    /// The secret itself, for sending it (e.g. as a bearer token).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_the_secret() {
        let s = Secret::from("hunter2-token".to_owned());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(s)).contains("hunter2"));
    }

    #[test]
    fn bearer_matching_needs_the_exact_token() {
        let s = Secret::from("abc".to_owned());
        assert!(s.matches_bearer(Some("Bearer abc")));
        assert!(
            s.matches_bearer(Some("bearer abc")),
            "the scheme ignores case"
        );
        assert!(s.matches_bearer(Some("BEARER  abc")));
        assert!(!s.matches_bearer(Some("Basic abc")));
        assert!(!s.matches_bearer(Some("Bearerabc")));
        assert!(!s.matches_bearer(Some("Bearer abcd")));
        assert!(!s.matches_bearer(Some("Bearer ab")));
        assert!(!s.matches_bearer(Some("abc")));
        assert!(!s.matches_bearer(None));
    }
}
