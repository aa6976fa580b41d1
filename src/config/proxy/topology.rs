//! The `[topology]` section's two rules that read more than the file:
//! what a source names (a file, or a coordinator by its base URL or the full
//! URL of its map), and where the last-known-good map is cached by default.

use crate::proxy::TopologySource;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a proxy listening on `listen` keeps its last-known-good map when
/// `cache_file = "auto"`: `map-cache-<ip>-<port>.json`, one file per proxy
/// instance, in the first of
/// - `$STATE_DIRECTORY` (systemd's `StateDirectory=`; its first entry),
/// - `$XDG_STATE_HOME/shardgate`,
/// - `$HOME/.local/state/shardgate`,
/// - `/var/lib/shardgate`.
///
/// A proxy on port 0 has no identity that outlives it (the next start gets
/// another port, and every such proxy would share one file), so it gets no
/// default cache.
pub(super) fn default_cache_file(
    listen: SocketAddr,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if listen.port() == 0 {
        return None;
    }
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    let dir = if let Some(dirs) = set("STATE_DIRECTORY") {
        let first = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        PathBuf::from(first)
    } else if let Some(xdg) = set("XDG_STATE_HOME") {
        PathBuf::from(xdg).join("shardgate")
    } else if let Some(home) = set("HOME") {
        PathBuf::from(home).join(".local/state/shardgate")
    } else {
        PathBuf::from("/var/lib/shardgate")
    };
    let ip = listen.ip().to_string().replace(':', "_");
    Some(dir.join(format!("map-cache-{ip}-{}.json", listen.port())))
}

/// The path of a coordinator's map (SPEC §4).
const TOPOLOGY_PATH: &str = "/v1/cluster/topology";

pub(super) fn parse_topology_source(s: &str) -> Result<TopologySource, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let Some(authority) = uri.authority() else {
            return Err(format!("{s:?} has no host"));
        };
        // SPEC §10: the coordinator's base URL or the full URL of its map,
        // the one a user copies from the curl they just ran; either way the
        // proxy keeps the base and builds the paths it asks for.
        let path = uri.path().trim_end_matches('/');
        let base = path.strip_suffix(TOPOLOGY_PATH).unwrap_or(path);
        if uri.query().is_some() && base.len() == path.len() {
            return Err(format!("{s:?}: a coordinator URL has no query"));
        }
        let scheme = uri.scheme_str().unwrap_or("http");
        let uri = format!("{scheme}://{authority}{base}")
            .parse()
            .map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        Ok(TopologySource::Coordinator(uri))
    } else if s.contains("://") {
        Err(format!(
            "{s:?}: only http:// and https:// coordinator URLs, or file paths"
        ))
    } else if s.is_empty() {
        Err("empty topology source".into())
    } else {
        Ok(TopologySource::File(PathBuf::from(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_source_may_be_its_base_or_the_full_url_of_its_map() {
        for given in [
            "http://127.0.0.1:7400",
            "http://127.0.0.1:7400/",
            "http://127.0.0.1:7400/v1/cluster/topology",
            "http://127.0.0.1:7400/v1/cluster/topology/",
            "http://127.0.0.1:7400/v1/cluster/topology?waitForEpochAbove=3",
        ] {
            let Ok(TopologySource::Coordinator(uri)) = parse_topology_source(given) else {
                panic!("{given}");
            };
            assert_eq!(
                uri.authority().unwrap().as_str(),
                "127.0.0.1:7400",
                "{given}"
            );
            assert!(
                uri.path() == "/" || uri.path().is_empty(),
                "{given} kept {:?}",
                uri.path()
            );
        }
        let Ok(TopologySource::Coordinator(prefixed)) =
            parse_topology_source("https://lb.example/shardgate/v1/cluster/topology")
        else {
            panic!();
        };
        assert_eq!(prefixed.to_string(), "https://lb.example/shardgate");
        assert!(parse_topology_source("http://127.0.0.1:7400/?x=1").is_err());
    }

    #[test]
    fn the_default_cache_is_one_file_per_instance_in_the_state_directory() {
        let listen: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let systemd = env(&[
            ("STATE_DIRECTORY", "/var/lib/shardgate:/other"),
            ("HOME", "/root"),
        ]);
        assert_eq!(
            default_cache_file(listen, &systemd),
            Some(PathBuf::from(
                "/var/lib/shardgate/map-cache-10.0.0.5-8080.json"
            ))
        );
        let xdg = env(&[("XDG_STATE_HOME", "/home/u/.state"), ("HOME", "/home/u")]);
        assert_eq!(
            default_cache_file(listen, &xdg),
            Some(PathBuf::from(
                "/home/u/.state/shardgate/map-cache-10.0.0.5-8080.json"
            ))
        );
        let home = env(&[("HOME", "/home/u")]);
        assert_eq!(
            default_cache_file("[::1]:9000".parse().unwrap(), &home),
            Some(PathBuf::from(
                "/home/u/.local/state/shardgate/map-cache-__1-9000.json"
            ))
        );
        assert_eq!(
            default_cache_file(listen, &env(&[])),
            Some(PathBuf::from(
                "/var/lib/shardgate/map-cache-10.0.0.5-8080.json"
            ))
        );
        assert_eq!(
            default_cache_file("127.0.0.1:0".parse().unwrap(), &home),
            None,
            "port 0 has no identity to keep a cache under"
        );
    }
}
