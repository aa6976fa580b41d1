//! Stage 1, key: the request is checked — nothing ambiguous is forwarded
//! (`headers::check_inbound`) — and then its shard key is read and hashed to a
//! ring position, or, for a keyless request when so configured, pinned to a
//! fixed partition.

use super::super::error::ProxyError;
use super::placement::Placement;
use crate::routing::{KeyError, RoutingConfig};
use crate::topology::key_position;
use http::Request;

/// Where the request's key places it.
pub(crate) fn placement<B>(
    req: &Request<B>,
    routing: &RoutingConfig,
) -> Result<Placement, ProxyError> {
    match routing.keys.extract(req.uri(), req.headers()) {
        Ok(key) => Ok(Placement::Position(key_position(&key))),
        Err(KeyError::Missing(looked)) => match routing.keyless_partition {
            Some(i) => Ok(Placement::Index(i)),
            None => Err(ProxyError::MissingShardKey(format!(
                "no shard key found (looked in {looked})"
            ))),
        },
        Err(e @ KeyError::Invalid { .. }) => Err(ProxyError::InvalidShardKey(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ProxyConfig;

    fn routing(extra: &str) -> RoutingConfig {
        ProxyConfig::from_toml(
            &format!("[topology]\nsources = [\"m.json\"]\n{extra}"),
            "t",
            &Default::default(),
        )
        .unwrap()
        .runtime
        .routing
        .clone()
    }

    fn get(uri: &str, key_header: Option<&str>) -> Request<()> {
        let mut b = Request::get(uri);
        if let Some(k) = key_header {
            b = b.header("x-shard-key", k);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_key_is_hashed_to_its_ring_position() {
        let r = routing("");
        assert_eq!(
            placement(&get("/anything", Some("user:42")), &r).unwrap(),
            Placement::Position(key_position(b"user:42"))
        );
        assert_eq!(
            placement(&get("/kv/user%3A42", None), &r).unwrap(),
            Placement::Position(key_position(b"user:42")),
            "a path segment after percent-decoding"
        );
    }

    #[test]
    fn a_keyless_request_is_refused_unless_a_partition_takes_them() {
        let e = placement(&get("/health", None), &routing("")).unwrap_err();
        assert_eq!(e.code(), "missing_shard_key");
        let r = routing("[routing]\nkeyless_partition = 2\n");
        assert_eq!(
            placement(&get("/health", None), &r).unwrap(),
            Placement::Index(2)
        );
    }

    #[test]
    fn an_ambiguous_key_is_refused_not_guessed() {
        let req = Request::get("/")
            .header("x-shard-key", "a")
            .header("x-shard-key", "b")
            .body(())
            .unwrap();
        let e = placement(&req, &routing("")).unwrap_err();
        assert_eq!(e.code(), "invalid_shard_key");
    }
}
