//! Reading TOML config files so that every problem is reported with its location.
//!
//! Each top-level section is deserialized on its own, so a type error in one
//! section does not hide problems in another, and unknown keys anywhere are
//! collected (not just the first).

use serde::de::DeserializeOwned;
use std::fmt;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// A line and column in a config file, both 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// One problem found in a config file or in the flags that override it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Where in the file, when the problem is tied to text in it.
    pub location: Option<Location>,
    /// The dotted key (`timeouts.connect`) or flag (`--listen`) at fault.
    pub key: String,
    /// What is wrong, as a sentence.
    pub message: String,
}

/// Every problem found while loading one config source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file (or `flags`) the problems are in.
    pub source_name: String,
    /// The problems, in file order where known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.source_name)?;
            if let Some(loc) = issue.location {
                write!(f, ":{}:{}", loc.line, loc.column)?;
            }
            if issue.key.is_empty() {
                write!(f, ": {}", issue.message)?;
            } else {
                write!(f, ": {}: {}", issue.key, issue.message)?;
            }
        }
        Ok(())
    }
}

/// Accumulates problems for one source; turns into `ConfigErrors` at the end.
pub struct Issues<'d> {
    doc: Option<&'d TomlDoc<'d>>,
    list: Vec<ConfigIssue>,
}

impl<'d> Issues<'d> {
    /// Problems tied to `doc` (for locating keys), or to no document.
    pub fn new(doc: Option<&'d TomlDoc<'d>>) -> Issues<'d> {
        Issues {
            doc,
            list: Vec::new(),
        }
    }

    /// Record a problem with `key`, located in the file if the key is written there.
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let location = self.doc.and_then(|d| d.locate(&key));
        self.list.push(ConfigIssue {
            location,
            key,
            message: message.into(),
        });
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// `Ok(value)` if nothing was recorded, else every problem.
    pub fn finish<T>(self, source_name: &str, value: T) -> Result<T, ConfigErrors> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_errors(source_name))
        }
    }

    /// Every problem recorded, in file order (unlocated ones last).
    pub fn into_errors(mut self, source_name: &str) -> ConfigErrors {
        self.list
            .sort_by_key(|i| i.location.map_or((usize::MAX, 0), |l| (l.line, l.column)));
        ConfigErrors {
            source_name: source_name.to_owned(),
            issues: self.list,
        }
    }
}

/// A parsed TOML document that remembers where every key is written.
pub struct TomlDoc<'a> {
    text: &'a str,
    root: DeTable<'a>,
}

impl<'a> TomlDoc<'a> {
    /// Parse `text`; syntax errors are all reported, each with its location.
    pub fn parse(text: &'a str, source_name: &str) -> Result<TomlDoc<'a>, ConfigErrors> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if errors.is_empty() {
            return Ok(TomlDoc {
                text,
                root: root.into_inner(),
            });
        }
        let issues = errors
            .iter()
            .map(|e| ConfigIssue {
                location: e.span().map(|s| location_of(text, s.start)),
                key: String::new(),
                message: format!("syntax error: {}", e.message()),
            })
            .collect();
        Err(ConfigErrors {
            source_name: source_name.to_owned(),
            issues,
        })
    }

    /// Whether the document has a top-level `name`.
    pub fn has(&self, name: &str) -> bool {
        self.root.get(name).is_some()
    }

    /// Deserialize section `name` (its default when absent); problems go to `issues`.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str, issues: &mut Issues<'_>) -> T {
        let Some(value) = self.root.get(name) else {
            return T::default();
        };
        let value: Spanned<DeValue<'a>> = value.clone();
        let mut unknown = Vec::new();
        let de = ValueDeserializer::from(value);
        let result = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
        for path in unknown {
            issues.push(format!("{name}.{path}"), "unknown key");
        }
        match result {
            Ok(v) => v,
            Err(e) => {
                issues.list.push(ConfigIssue {
                    location: e.span().map(|s| location_of(self.text, s.start)),
                    key: name.to_owned(),
                    message: e.message().to_owned(),
                });
                T::default()
            }
        }
    }

    /// Report every top-level key that is not one of `known`.
    pub fn reject_unknown_sections(&self, known: &[&str], issues: &mut Issues<'_>) {
        for key in self.root.keys() {
            if !known.contains(&key.get_ref().as_ref()) {
                let msg = format!("unknown section (expected one of: {})", known.join(", "));
                issues.push(key.get_ref().to_string(), msg);
            }
        }
    }

    /// Where the dotted `path` (`routing.key_sources.1.path`) is written, if it is.
    pub fn locate(&self, path: &str) -> Option<Location> {
        let mut parts = path.split('.');
        let first = parts.next()?;
        let (key, mut value) = self.root.get_key_value(first)?;
        let mut span = key.span();
        for part in parts {
            let next = match value.get_ref() {
                DeValue::Table(t) => {
                    let (k, v) = t.get_key_value(part)?;
                    span = k.span();
                    v
                }
                DeValue::Array(a) => {
                    let v = a.get(part.parse::<usize>().ok()?)?;
                    span = v.span();
                    v
                }
                _ => return None,
            };
            value = next;
        }
        Some(location_of(self.text, span.start))
    }
}

fn location_of(text: &str, offset: usize) -> Location {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    Location {
        line,
        column: offset - line_start + 1,
    }
}

/// `spec` if its files make a working server configuration offering `alpn`;
/// building it is the check (every file read, each certificate paired with
/// its key, exactly as serving would), so a problem is reported at `key`.
pub(super) fn checked_server_tls(
    spec: crate::tls::ServerTls,
    alpn: &[&[u8]],
    key: &str,
    issues: &mut Issues<'_>,
) -> Option<crate::tls::ServerTls> {
    match crate::tls::server_config(&spec, alpn) {
        Ok(_) => Some(spec),
        Err(e) => {
            issues.push(key, e.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Default, Debug)]
    #[serde(default)]
    struct A {
        n: u32,
        s: String,
    }

    #[test]
    fn every_section_and_every_unknown_key_is_reported_with_its_line() {
        let text = "[a]\nn = \"x\"\n\n[b]\nn = 1\nbogus = 2\nalso = 3\n[zzz]\n";
        let doc = TomlDoc::parse(text, "f.toml").unwrap();
        let mut issues = Issues::new(Some(&doc));
        let _: A = doc.section("a", &mut issues);
        let _: A = doc.section("b", &mut issues);
        doc.reject_unknown_sections(&["a", "b"], &mut issues);
        let err = issues.finish("f.toml", ()).unwrap_err();
        let lines: Vec<_> = err
            .issues
            .iter()
            .map(|i| i.location.map(|l| l.line))
            .collect();
        assert_eq!(lines, [Some(2), Some(6), Some(7), Some(8)], "{err}");
        let text = err.to_string();
        assert!(text.contains("f.toml:6:1: b.bogus: unknown key"), "{text}");
        assert!(text.contains("zzz: unknown section"), "{text}");
    }

    #[test]
    fn syntax_errors_carry_locations() {
        let err = TomlDoc::parse("a = 1\nb = \n", "f.toml").err().unwrap();
        assert_eq!(err.issues[0].location.map(|l| l.line), Some(2));
    }
}
