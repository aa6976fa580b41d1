//! Shard keys: where a request carries one, and how it is read out (SPEC §3).

use http::{HeaderMap, HeaderName, Uri};
use std::borrow::Cow;
use std::fmt;

/// One place a shard key may be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A request header; the value's bytes as sent.
    Header(HeaderName),
    /// A segment of the path, named `{key}` in the template; percent-decoded.
    Path(PathTemplate),
    /// A query parameter; its value percent-decoded (`+` stays a plus).
    Query(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header {h}"),
            KeySource::Path(t) => write!(f, "path {t}"),
            KeySource::Query(q) => write!(f, "query parameter {q}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Key,
}

/// A path template such as `/kv/{key}` or `/users/{key}/orders`.
///
/// The template matches a path whose leading segments equal the template's;
/// deeper paths (`/kv/abc/history`) still match, so one template covers a
/// resource and its sub-resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
    key_at: usize,
}

/// Why a path template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Templates are absolute paths.
    #[error("template {0:?} must start with '/'")]
    NotAbsolute(String),
    /// Exactly one `{key}` segment is required.
    #[error("template {0:?} must contain exactly one {{key}} segment")]
    KeyCount(String),
    /// Braces outside a whole `{key}` segment.
    #[error("template {0:?}: '{{' and '}}' may only appear as a whole {{key}} segment")]
    StrayBrace(String),
}

impl PathTemplate {
    /// Parse a template; `{key}` must be a whole segment and appear once.
    pub fn parse(text: &str) -> Result<PathTemplate, TemplateError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(TemplateError::NotAbsolute(text.to_owned()));
        };
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if seg == "{key}" {
                segments.push(Segment::Key);
            } else if seg.contains(['{', '}']) {
                return Err(TemplateError::StrayBrace(text.to_owned()));
            } else {
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        let keys: Vec<usize> = segments
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == Segment::Key)
            .map(|(i, _)| i)
            .collect();
        let [key_at] = keys[..] else {
            return Err(TemplateError::KeyCount(text.to_owned()));
        };
        Ok(PathTemplate {
            text: text.to_owned(),
            segments,
            key_at,
        })
    }

    /// The raw (still percent-encoded) key segment of `path`, if the template matches.
    fn raw_key<'p>(&self, path: &'p str) -> Option<&'p str> {
        let mut parts = path.strip_prefix('/')?.split('/');
        let mut key = None;
        for (i, seg) in self.segments.iter().enumerate() {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l.as_str() == part => {}
                Segment::Literal(_) => return None,
                Segment::Key if i == self.key_at => key = Some(part),
                Segment::Key => return None,
            }
        }
        key.filter(|k| !k.is_empty())
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a request's key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No configured source held a key.
    #[error("no shard key found (looked in {0})")]
    Missing(String),
    /// A source held something that is not a usable key.
    #[error("shard key from {origin}: {reason}")]
    Invalid {
        /// The source that held it.
        origin: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Reads shard keys out of requests; built once from configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyExtractor {
    sources: Vec<KeySource>,
    max_len: usize,
    described: String,
}

impl KeyExtractor {
    /// An extractor trying `sources` in order, refusing keys longer than `max_len` bytes.
    pub fn new(sources: Vec<KeySource>, max_len: usize) -> KeyExtractor {
        let described = sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        KeyExtractor {
            sources,
            max_len,
            described,
        }
    }

    /// The configured sources, in the order they are tried.
    pub fn sources(&self) -> &[KeySource] {
        &self.sources
    }

    /// The first key a configured source yields, or why there is none.
    ///
    /// A source that holds an ambiguous or malformed key is an error, never
    /// skipped: routing on a guess could send a write to the wrong partition.
    pub fn extract<'r>(
        &self,
        uri: &'r Uri,
        headers: &'r HeaderMap,
    ) -> Result<Cow<'r, [u8]>, KeyError> {
        for source in &self.sources {
            let found = match source {
                KeySource::Header(name) => header_key(headers, name),
                KeySource::Path(t) => t.raw_key(uri.path()).map(decode),
                KeySource::Query(param) => query_key(uri.query(), param),
            };
            let Some(found) = found else { continue };
            let key = found.map_err(|reason| KeyError::Invalid {
                origin: source.to_string(),
                reason,
            })?;
            if key.is_empty() {
                return Err(KeyError::Invalid {
                    origin: source.to_string(),
                    reason: "key is empty",
                });
            }
            if key.len() > self.max_len {
                return Err(KeyError::Invalid {
                    origin: source.to_string(),
                    reason: "key is longer than the configured limit",
                });
            }
            return Ok(key);
        }
        Err(KeyError::Missing(self.described.clone()))
    }
}

type Found<'r> = Option<Result<Cow<'r, [u8]>, &'static str>>;

fn header_key<'r>(headers: &'r HeaderMap, name: &HeaderName) -> Found<'r> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Err("header appears more than once"));
    }
    Some(Ok(Cow::Borrowed(first.as_bytes())))
}

fn query_key<'r>(query: Option<&'r str>, param: &str) -> Found<'r> {
    let mut found: Found<'r> = None;
    for pair in query?.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name_matches = match decode(name) {
            Ok(n) => *n == *param.as_bytes(),
            Err(_) => false,
        };
        if !name_matches {
            continue;
        }
        if found.is_some() {
            return Some(Err("query parameter appears more than once"));
        }
        found = Some(decode(value));
    }
    found
}

/// Strict percent-decoding: a `%` must be followed by two hex digits.
fn decode(raw: &str) -> Result<Cow<'_, [u8]>, &'static str> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    let mut has_escape = false;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        match bytes.get(at + 1..at + 3) {
            Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {}
            _ => return Err("malformed percent-encoding"),
        }
        has_escape = true;
        i = at + 3;
    }
    if has_escape {
        Ok(percent_encoding::percent_decode(bytes).into())
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn extractor() -> KeyExtractor {
        KeyExtractor::new(
            vec![
                KeySource::Header(HeaderName::from_static("x-shard-key")),
                KeySource::Path(PathTemplate::parse("/kv/{key}").unwrap()),
                KeySource::Query("key".into()),
            ],
            16,
        )
    }

    fn extract(uri: &str, header: Option<&str>) -> Result<Vec<u8>, KeyError> {
        let uri: Uri = uri.parse().unwrap();
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert("x-shard-key", HeaderValue::from_str(h).unwrap());
        }
        extractor().extract(&uri, &headers).map(|k| k.into_owned())
    }

    #[test]
    fn sources_are_tried_in_order() {
        assert_eq!(extract("/kv/p?key=q", Some("h")).unwrap(), b"h");
        assert_eq!(extract("/kv/p?key=q", None).unwrap(), b"p");
        assert_eq!(extract("/other?key=q", None).unwrap(), b"q");
        assert!(matches!(
            extract("/other", None),
            Err(KeyError::Missing(s)) if s.contains("header x-shard-key")
        ));
    }

    #[test]
    fn path_and_query_keys_are_percent_decoded_but_plus_is_literal() {
        assert_eq!(extract("/kv/a%2Fb%20c", None).unwrap(), b"a/b c");
        assert_eq!(extract("/x?key=a%26b+c", None).unwrap(), b"a&b+c");
        assert_eq!(extract("/x?k%65y=v", None).unwrap(), b"v");
    }

    #[test]
    fn template_matches_sub_resources_but_not_empty_keys() {
        assert_eq!(extract("/kv/abc/history", None).unwrap(), b"abc");
        assert!(matches!(extract("/kv/", None), Err(KeyError::Missing(_))));
        assert!(matches!(extract("/kv", None), Err(KeyError::Missing(_))));
        assert!(matches!(extract("/kvx/a", None), Err(KeyError::Missing(_))));
    }

    #[test]
    fn ambiguous_or_malformed_keys_are_refused_not_skipped() {
        assert!(matches!(
            extract("/x?key=a&key=b", None),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(
            extract("/kv/a%zz", None),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(
            extract("/kv/a%2", None),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(
            extract("/x?key=", None),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(
            extract("/x", Some("")),
            Err(KeyError::Invalid { .. })
        ));

        let uri: Uri = "/x".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-shard-key", HeaderValue::from_static("a"));
        headers.append("x-shard-key", HeaderValue::from_static("b"));
        assert!(matches!(
            extractor().extract(&uri, &headers),
            Err(KeyError::Invalid { reason, .. }) if reason.contains("more than once")
        ));
    }

    #[test]
    fn keys_over_the_limit_are_invalid_at_exactly_limit_plus_one() {
        assert!(extract("/x", Some(&"k".repeat(16))).is_ok());
        assert!(matches!(
            extract("/x", Some(&"k".repeat(17))),
            Err(KeyError::Invalid { .. })
        ));
    }

    #[test]
    fn templates_are_validated() {
        assert!(PathTemplate::parse("/users/{key}/orders").is_ok());
        assert!(matches!(
            PathTemplate::parse("kv/{key}"),
            Err(TemplateError::NotAbsolute(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/kv"),
            Err(TemplateError::KeyCount(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{key}/{key}"),
            Err(TemplateError::KeyCount(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/kv/x{key}"),
            Err(TemplateError::StrayBrace(_))
        ));
    }

    #[test]
    fn nested_template_reads_the_right_segment() {
        let t = PathTemplate::parse("/users/{key}/orders").unwrap();
        assert_eq!(t.raw_key("/users/42/orders/7"), Some("42"));
        assert_eq!(t.raw_key("/users/42"), None);
        assert_eq!(t.raw_key("/users/42/cart"), None);
    }
}
