//! Following coordinators: the proxy's live shard map.
//!
//! A watch (`GET /v1/cluster/topology?waitForEpochAbove=N`) is held open on
//! the first coordinator that answers, so a new epoch arrives as soon as it
//! exists. A coordinator that offers no watch is polled with `If-None-Match`.
//! Failures move on to the next coordinator with jittered backoff. Every map
//! is validated and epoch-fenced by `LiveMap::offer` exactly like a file map;
//! the last one applied is saved to the cache file.

use super::live::{LiveMap, MapUpdate};
use crate::resilience::{Backoff, Jitter};
use crate::tls::{ALPN_H1, ClientStream, Connector};
use crate::topology::ShardMap;
use bytes::Bytes;
use http::header::{ETAG, HOST, IF_NONE_MATCH};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rand::RngExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How the proxy follows coordinators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Watch hold time requested.
    pub watch_timeout: Duration,
    /// Polling period without a watch.
    pub poll_interval: Duration,
    /// Plain fetch timeout.
    pub fetch_timeout: Duration,
    /// Map size cap.
    pub max_map_bytes: usize,
    /// Cache file, if any.
    pub cache_file: Option<std::path::PathBuf>,
    /// Start-up wait before using the cache.
    pub startup_wait: Duration,
    /// TLS for https coordinator URLs.
    pub client_tls: crate::tls::ClientTls,
}

/// What one fetch produced.
enum Fetched {
    Map {
        body: Bytes,
        etag: Option<HeaderValue>,
    },
    NotModified,
    Status(StatusCode),
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no answer in time")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Http(String),
}

/// GET `uri` once, bounded in time and size; `https` URLs go through `tls`.
async fn fetch(
    uri: &Uri,
    tls: Option<&Connector>,
    etag: Option<&HeaderValue>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Fetched, FetchError> {
    let work = async {
        let authority = uri
            .authority()
            .ok_or_else(|| FetchError::Http("URL has no host".into()))?;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(FetchError::Connect)?;
        let stream = match (https, tls) {
            (false, _) => ClientStream::Plain(tcp),
            (true, Some(tls)) => {
                let peer = tcp.peer_addr().map_err(FetchError::Connect)?;
                tls.connect(tcp, Some(authority.host()), peer.ip())
                    .await
                    .map_err(FetchError::Tls)?
            }
            (true, None) => return Err(FetchError::Http("no usable TLS settings".into())),
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::get(path)
            .header(HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if let Some(tag) = etag {
            req.headers_mut().insert(IF_NONE_MATCH, tag.clone());
        }
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
            StatusCode::OK => {
                let etag = resp.headers().get(ETAG).cloned();
                let body = Limited::new(resp.into_body(), max_bytes)
                    .collect()
                    .await
                    .map_err(|e| FetchError::Http(format!("reading the map: {e}")))?
                    .to_bytes();
                Ok(Fetched::Map { body, etag })
            }
            other => Ok(Fetched::Status(other)),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout)?
}

fn topology_url(base: &Uri, wait_above: Option<u64>) -> Option<Uri> {
    let base = base.to_string();
    let base = base.trim_end_matches('/');
    let url = match wait_above {
        Some(e) => format!("{base}/v1/cluster/topology?waitForEpochAbove={e}"),
        None => format!("{base}/v1/cluster/topology"),
    };
    url.parse().ok()
}

/// Follow `sources` until `shutdown`.
pub(super) async fn follow(
    live: Arc<LiveMap>,
    sources: Vec<Uri>,
    cfg: WatchConfig,
    shutdown: CancellationToken,
) {
    let backoff = Backoff {
        base: Duration::from_millis(100),
        max: cfg.poll_interval.max(Duration::from_secs(5)),
        jitter: Jitter::Decorrelated,
    };
    let any_https = sources
        .iter()
        .any(|s| s.scheme() == Some(&http::uri::Scheme::HTTPS));
    let tls = if any_https {
        match Connector::new(&cfg.client_tls, ALPN_H1, None) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("cannot reach https coordinators: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut current = 0usize;
    let mut failures = 0u32;
    let mut last_delay = None;
    let mut watch_supported = vec![true; sources.len()];
    let mut etag: Option<HeaderValue> = None;
    // Set when a refresh was asked for while no fetch was running.
    let mut fetch_now = false;
    loop {
        let source = &sources[current];
        let epoch = live.epoch();
        // Watch only once there is an epoch to watch past; a refresh request
        // (421 from an upstream) asks for the map now, not the next one.
        let refresh = live.news().refresh_asked();
        let watching = !fetch_now && watch_supported[current] && epoch.is_some();
        fetch_now = false;
        let Some(url) = topology_url(source, if watching { epoch } else { None }) else {
            tracing::error!(%source, "coordinator URL unusable; skipping it");
            current = (current + 1) % sources.len();
            continue;
        };
        let timeout = if watching {
            cfg.watch_timeout + cfg.fetch_timeout
        } else {
            cfg.fetch_timeout
        };
        let tag = if watching { None } else { etag.as_ref() };
        let asked = tokio::time::Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            () = refresh => {
                // Drop the watch and fetch again immediately.
                let Some(now_url) = topology_url(source, None) else { continue };
                fetch(&now_url, tls.as_deref(), None, cfg.fetch_timeout, cfg.max_map_bytes).await
            }
            r = fetch(&url, tls.as_deref(), tag, timeout, cfg.max_map_bytes) => r,
        };
        let source_name = format!("coordinator {source}");
        let mut pause = None;
        match result {
            Ok(Fetched::Map {
                body,
                etag: new_tag,
            }) => {
                failures = 0;
                last_delay = None;
                // Parsing and indexing a map of thousands of partitions takes
                // milliseconds: a blocking thread does it, not one that serves.
                // Shutdown does not wait for it (the cache file may sit on a
                // hung mount).
                let applying = {
                    let (live, cache) = (live.clone(), cfg.cache_file.clone());
                    let source = source_name.clone();
                    tokio::task::spawn_blocking(move || {
                        apply(&live, &body, &source, cache.as_deref())
                    })
                };
                let applied = tokio::select! {
                    () = shutdown.cancelled() => return,
                    applied = applying => applied,
                };
                match applied {
                    Ok(Some(update)) => {
                        if update != MapUpdate::Applied
                            && watching
                            && asked.elapsed() < Duration::from_secs(1)
                        {
                            // A watch answered at once with nothing newer: the
                            // coordinator ignores watches. Do not spin on it.
                            pause = Some(jittered(cfg.poll_interval));
                        }
                        etag = new_tag;
                    }
                    Ok(None) => pause = Some(cfg.poll_interval),
                    Err(e) => {
                        live.refuse(MapUpdate::RejectedInvalid, &source_name, &e.to_string());
                        pause = Some(cfg.poll_interval);
                    }
                }
                if !watching {
                    pause = Some(jittered(cfg.poll_interval));
                }
            }
            Ok(Fetched::NotModified) => {
                failures = 0;
                live.confirm();
                pause = Some(jittered(cfg.poll_interval));
            }
            Ok(Fetched::Status(StatusCode::BAD_REQUEST)) if watching => {
                tracing::info!(%source, "coordinator offers no watch; polling it instead");
                watch_supported[current] = false;
            }
            Ok(Fetched::Status(status)) => {
                live.refuse(
                    MapUpdate::FetchError,
                    &source_name,
                    &format!("answered {status}"),
                );
                pause = Some(next_backoff(&backoff, &mut failures, &mut last_delay));
                current = (current + 1) % sources.len();
            }
            Err(e) => {
                live.refuse(MapUpdate::FetchError, &source_name, &e.to_string());
                pause = Some(next_backoff(&backoff, &mut failures, &mut last_delay));
                current = (current + 1) % sources.len();
            }
        }
        if let Some(p) = pause {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = live.news().refresh_asked() => fetch_now = true,
                () = tokio::time::sleep(p) => {}
            }
        }
    }
}

/// How often the coordinators' replication view is read.
const REPLICATION_EVERY: Duration = Duration::from_secs(1);

/// One row of `GET /v1/cluster/replication`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplicationRow {
    target_ip: String,
    lag_ms: u64,
    state: String,
}

#[derive(serde::Deserialize)]
struct ReplicationView {
    replication: Vec<ReplicationRow>,
}

/// Read the coordinators' replication view every second and tell each
/// replica's upstream the lag its node last reported, so bounded-staleness
/// reads leave out replicas the proxy has not heard from itself. Lag never
/// changes the map's epoch (SPEC §7). A STALLED replica counts as
/// unboundedly behind. A coordinator without the view (404) is not asked again.
pub(super) async fn follow_replication(
    live: Arc<LiveMap>,
    sources: Vec<Uri>,
    cfg: WatchConfig,
    shutdown: CancellationToken,
) {
    let mut current = 0usize;
    let mut unsupported = vec![false; sources.len()];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(jittered(REPLICATION_EVERY)) => {}
        }
        if unsupported.iter().all(|u| *u) {
            return;
        }
        if unsupported[current] {
            current = (current + 1) % sources.len();
            continue;
        }
        let base = sources[current].to_string();
        let Ok(url) =
            format!("{}/v1/cluster/replication", base.trim_end_matches('/')).parse::<Uri>()
        else {
            unsupported[current] = true;
            continue;
        };
        // Plain http only: an https coordinator's view waits for the TLS
        // connector to be shared with the map's follower.
        if url.scheme() == Some(&http::uri::Scheme::HTTPS) {
            unsupported[current] = true;
            continue;
        }
        match fetch(&url, None, None, cfg.fetch_timeout, cfg.max_map_bytes).await {
            Ok(Fetched::Map { body, .. }) => match serde_json::from_slice::<ReplicationView>(&body)
            {
                Ok(view) => {
                    for row in view.replication {
                        let Ok(addr) = row.target_ip.parse() else {
                            continue;
                        };
                        if let Some(u) = live.upstream_at(&addr) {
                            let lag = if row.state == "STALLED" {
                                u64::MAX
                            } else {
                                row.lag_ms
                            };
                            u.freshness().set_reported_lag(Some(lag));
                        }
                    }
                }
                Err(e) => tracing::debug!(%url, "replication view unreadable: {e}"),
            },
            Ok(Fetched::Status(StatusCode::NOT_FOUND)) => unsupported[current] = true,
            Ok(_) | Err(_) => current = (current + 1) % sources.len(),
        }
    }
}

fn jittered(d: Duration) -> Duration {
    // ±20%, so many proxies do not poll in lockstep.
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

fn next_backoff(b: &Backoff, failures: &mut u32, last: &mut Option<Duration>) -> Duration {
    let d = b.delay(*failures, *last, &mut rand::rng());
    *failures = failures.saturating_add(1);
    *last = Some(d);
    d
}

/// Validate `body`, offer it, and save it to `cache` if it was applied.
/// `None` when it is not a valid map (the refusal is recorded).
fn apply(live: &LiveMap, body: &[u8], source: &str, cache: Option<&Path>) -> Option<MapUpdate> {
    let map = match ShardMap::from_json(body) {
        Ok(map) => map,
        Err(e) => {
            live.refuse(MapUpdate::RejectedInvalid, source, &e.to_string());
            return None;
        }
    };
    let doc = cache.map(|_| map.to_doc());
    let update = live.offer(map, source);
    if update == MapUpdate::Applied
        && let (Some(path), Some(doc)) = (cache, doc)
    {
        let written = serde_json::to_vec_pretty(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::atomic_file::write(path, &bytes));
        if let Err(e) = written {
            tracing::warn!("cannot save the map cache: {e}");
        }
    }
    Some(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn live() -> LiveMap {
        let settings = crate::proxy::ProxyConfig::from_toml(
            "[topology]\nsources = [\"http://127.0.0.1:1\"]\n",
            "t",
            &Default::default(),
        )
        .unwrap()
        .runtime;
        LiveMap::new(settings, 80, Arc::new(Metrics::new())).unwrap()
    }

    fn map(epoch: u64) -> Vec<u8> {
        format!(
            r#"{{"clusterEpoch":{epoch},"masterNodeId":"c","partitionCount":1,"partitions":[
            {{"partitionIndex":0,"primaryNodeIp":"127.0.0.1:9","replicaNodeIps":[],
             "hashRangeStart":"00000000","hashRangeEnd":"ffffffff"}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn the_topology_url_is_built_from_a_coordinators_base() {
        let base: Uri = "http://127.0.0.1:7400".parse().unwrap();
        assert_eq!(
            topology_url(&base, None).unwrap(),
            "http://127.0.0.1:7400/v1/cluster/topology"
        );
        assert_eq!(
            topology_url(&base, Some(7)).unwrap(),
            "http://127.0.0.1:7400/v1/cluster/topology?waitForEpochAbove=7"
        );
        let slash: Uri = "https://c.example:7400/".parse().unwrap();
        assert_eq!(
            topology_url(&slash, None).unwrap(),
            "https://c.example:7400/v1/cluster/topology"
        );
    }

    #[test]
    fn an_applied_map_is_cached_and_a_refused_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache.json");
        let live = live();
        assert_eq!(
            apply(&live, &map(3), "c", Some(&cache)),
            Some(MapUpdate::Applied)
        );
        let cached = crate::topology::read_topology_file(&cache).unwrap();
        assert_eq!(cached.epoch(), 3);
        assert_eq!(
            apply(&live, &map(2), "c", Some(&cache)),
            Some(MapUpdate::RejectedStale)
        );
        assert_eq!(apply(&live, b"{not json", "c", Some(&cache)), None);
        assert!(live.status().last_error.is_some());
        assert_eq!(
            crate::topology::read_topology_file(&cache).unwrap().epoch(),
            3,
            "the cache keeps the last map applied"
        );
        assert_eq!(live.epoch(), Some(3));
    }

    #[test]
    fn polls_are_jittered_and_backoff_grows_after_failures() {
        let d = Duration::from_secs(1);
        for _ in 0..100 {
            let j = jittered(d);
            assert!(j >= d.mul_f64(0.8) && j <= d.mul_f64(1.2), "{j:?}");
        }
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: Jitter::Decorrelated,
        };
        let (mut failures, mut last) = (0, None);
        let delays: Vec<_> = (0..20)
            .map(|_| next_backoff(&b, &mut failures, &mut last))
            .collect();
        assert_eq!(failures, 20);
        assert!(
            delays.iter().all(|d| *d >= b.base && *d <= b.max),
            "{delays:?}"
        );
    }
}
