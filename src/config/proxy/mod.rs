//! `shardgate proxy` configuration: the file as written (`file`), and its
//! validation (`validate`) into the typed values the data plane runs on,
//! which live beside the code that uses them (`proxy::ProxyConfig`,
//! `routing::RoutingConfig`, `upstream::UpstreamSettings`...).

mod file;
mod topology;
mod validate;

pub use file::ProxyOverrides;
pub(super) use validate::parse_log;
