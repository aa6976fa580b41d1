//! Node addresses as the shard map writes them: `ip`, `ip:port`, `[v6]:port`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// A shard node's address; the port is optional and defaults per consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    /// The node's IP address.
    pub ip: IpAddr,
    /// The node's port, when the map names one.
    pub port: Option<u16>,
}

impl NodeAddr {
    /// The socket address to dial, filling in `default_port` when the map gave none.
    pub fn socket_addr(&self, default_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(default_port))
    }
}

/// Why a node address string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAddrError {
    /// The string is empty or only whitespace.
    #[error("address is empty")]
    Empty,
    /// Neither an IP nor `ip:port` nor `[v6]:port`.
    #[error("{0:?} is not an IP address, ip:port or [ipv6]:port")]
    Unparseable(String),
    /// Port zero can never be dialled.
    #[error("{0:?} has port 0")]
    PortZero(String),
}

impl FromStr for NodeAddr {
    type Err = NodeAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(NodeAddrError::Empty);
        }
        if s != s.trim() {
            return Err(NodeAddrError::Unparseable(s.to_owned()));
        }
        // Bare IPs first, so an unbracketed IPv6 like `::1` is not read as `ip:port`.
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(NodeAddr { ip, port: None });
        }
        match s.parse::<SocketAddr>() {
            Ok(sa) if sa.port() == 0 => Err(NodeAddrError::PortZero(s.to_owned())),
            Ok(sa) => Ok(NodeAddr {
                ip: sa.ip(),
                port: Some(sa.port()),
            }),
            Err(_) => Err(NodeAddrError::Unparseable(s.to_owned())),
        }
    }
}

/// Addresses travel as the map writes them (`ip`, `ip:port`, `[v6]:port`),
/// and one that does not parse is an error where it is read, never skipped.
impl serde::Serialize for NodeAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, None) => write!(f, "{ip}"),
            (IpAddr::V4(ip), Some(port)) => write!(f, "{ip}:{port}"),
            (IpAddr::V6(ip), Some(port)) => write!(f, "[{ip}]:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_the_spec_allows_and_prints_it_back() {
        for s in ["10.0.1.5", "10.0.1.5:8080", "::1", "[::1]:9000", "fe80::1"] {
            let addr: NodeAddr = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(addr.to_string(), s);
        }
    }

    #[test]
    fn refuses_hostnames_blanks_and_port_zero() {
        assert_eq!("".parse::<NodeAddr>(), Err(NodeAddrError::Empty));
        assert!(matches!(
            "db.local:80".parse::<NodeAddr>(),
            Err(NodeAddrError::Unparseable(_))
        ));
        assert!(matches!(
            " 10.0.0.1".parse::<NodeAddr>(),
            Err(NodeAddrError::Unparseable(_))
        ));
        assert!(matches!(
            "10.0.0.1:0".parse::<NodeAddr>(),
            Err(NodeAddrError::PortZero(_))
        ));
        assert!(matches!(
            "10.0.0.1:70000".parse::<NodeAddr>(),
            Err(NodeAddrError::Unparseable(_))
        ));
    }

    #[test]
    fn addresses_travel_as_text_and_a_bad_one_is_an_error() {
        let a: NodeAddr = "[::1]:9000".parse().unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""[::1]:9000""#);
        assert_eq!(
            serde_json::from_str::<NodeAddr>(r#""[::1]:9000""#).unwrap(),
            a
        );
        let err = serde_json::from_str::<NodeAddr>(r#""db.local:80""#).unwrap_err();
        assert!(err.to_string().contains("db.local"), "{err}");
    }

    #[test]
    fn default_port_applies_only_when_the_map_has_none() {
        let bare: NodeAddr = "10.0.0.1".parse().unwrap();
        let with_port: NodeAddr = "10.0.0.1:81".parse().unwrap();
        assert_eq!(bare.socket_addr(80).port(), 80);
        assert_eq!(with_port.socket_addr(80).port(), 81);
    }
}
