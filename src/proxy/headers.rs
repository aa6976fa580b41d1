//! Header rules of SPEC §3: what is refused on the way in, what is stripped,
//! added or rewritten on the way to the upstream, and on the way back.

use super::error::{PARTITION_HEADER, ProxyError};
use crate::telemetry::TraceContext;
use http::header::Entry;
use http::header::{CONNECTION, EXPECT, HOST};
use http::uri::{Authority, Uri};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version, request};
use smallvec::SmallVec;
use std::cell::RefCell;

/// `x-cluster-epoch`: the fencing token sent to shard nodes.
pub(crate) const EPOCH_HEADER: HeaderName = HeaderName::from_static("x-cluster-epoch");
/// `x-shardgate-upstream`: the serving node, when configured to expose it.
pub(crate) const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-shardgate-upstream");
const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XF_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XF_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Hop-by-hop headers (RFC 9110 §7.6.1 and RFC 2616 §13.5.1); never forwarded.
/// `Expect` is not hop-by-hop, but hyper answered any `100-continue` itself
/// when it read the body, so forwarding it would ask the upstream twice.
///
/// As the lowercase text header maps hold: comparing against these needs no
/// `HeaderName` (whose comparisons cost a branch per variant).
const HOP_BY_HOP_NAMES: [&str; 9] = [
    "connection",
    "expect",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// `HOP_BY_HOP_NAMES` as names to remove by, built at compile time.
const HOP_BY_HOP: [HeaderName; 9] = {
    let n = HOP_BY_HOP_NAMES;
    [
        HeaderName::from_static(n[0]),
        HeaderName::from_static(n[1]),
        HeaderName::from_static(n[2]),
        HeaderName::from_static(n[3]),
        HeaderName::from_static(n[4]),
        HeaderName::from_static(n[5]),
        HeaderName::from_static(n[6]),
        HeaderName::from_static(n[7]),
        HeaderName::from_static(n[8]),
    ]
};

/// Bit `n` is set when some hop-by-hop name is `n` bytes long.
const HOP_BY_HOP_LENGTHS: u32 = {
    let mut mask = 0u32;
    let mut i = 0;
    while i < HOP_BY_HOP_NAMES.len() {
        mask |= 1 << HOP_BY_HOP_NAMES[i].len();
        i += 1;
    }
    mask
};

/// Where `Connection` sits in `HOP_BY_HOP`.
const CONNECTION_SLOT: usize = 0;

/// Which hop-by-hop header `name` (lowercase, as in a header map) is, if any.
fn hop_by_hop_slot(name: &str) -> Option<usize> {
    // Most names have a length no hop-by-hop name has: one test, no compare.
    if name.len() >= 32 || HOP_BY_HOP_LENGTHS & (1 << name.len()) == 0 {
        return None;
    }
    HOP_BY_HOP_NAMES.iter().position(|h| *h == name)
}

/// Facts about the client connection a request arrived on, computed once per connection.
#[derive(Clone, Debug)]
pub(crate) struct ClientInfo {
    /// The peer's IP as an `X-Forwarded-For` element.
    pub forwarded_for: HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
}

impl ClientInfo {
    /// Describe a client at `addr`.
    pub(crate) fn new(addr: std::net::SocketAddr, tls: bool) -> ClientInfo {
        let forwarded_for = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientInfo { forwarded_for, tls }
    }
}

/// The last `Host` a client connection sent that passed validation.
///
/// Clients send the same Host on every request of a connection, and checking
/// one costs an allocation (`Authority` parses its own copy), so a value
/// byte-for-byte equal to the last valid one is taken as valid. Per
/// connection and never shared between threads: the service's own state.
#[derive(Debug, Default)]
pub(crate) struct HostMemo(RefCell<Option<HeaderValue>>);

impl HostMemo {
    fn knows(&self, host: &HeaderValue) -> bool {
        self.0.borrow().as_ref() == Some(host)
    }

    fn remember(&self, host: &HeaderValue) {
        // A copy, not a clone: a parsed header value shares hyper's whole
        // read buffer (8 KiB and up), which a clone would keep alive for
        // the life of the connection, idle or not.
        let own = HeaderValue::from_bytes(host.as_bytes()).unwrap_or_else(|_| host.clone());
        *self.0.borrow_mut() = Some(own);
    }
}

/// Size of the request line plus headers, as the client framed them (HTTP/1 terms).
fn head_bytes<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Refuse what must not be forwarded; returns the `Host` to send upstream.
///
/// Exactly one valid Host: duplicates, a Host that disagrees with an
/// absolute request target, or userinfo in it make the request ambiguous.
pub(crate) fn check_inbound<B>(
    req: &Request<B>,
    max_header_bytes: usize,
    known: &HostMemo,
) -> Result<Option<HeaderValue>, ProxyError> {
    if head_bytes(req) > max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: max_header_bytes,
        });
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    if let Some(expect) = req.headers().get(EXPECT)
        && !expect.as_bytes().eq_ignore_ascii_case(b"100-continue")
    {
        return Err(ProxyError::ExpectationFailed);
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(h) = header.filter(|h| !known.knows(h)) {
        // A valid authority has an empty host exactly when it starts with the
        // port's colon; testing that on the bytes spares `Authority::host`,
        // which parses the whole value again.
        let bytes = h.as_bytes();
        let valid = !bytes.contains(&b'@')
            && !bytes.starts_with(b":")
            && port_is_numeric(bytes)
            && Authority::try_from(bytes).is_ok();
        if !valid {
            return Err(ProxyError::BadRequest(
                "the Host header is not a valid host[:port]",
            ));
        }
        known.remember(h);
    }
    match (req.uri().authority(), header) {
        (Some(a), Some(h)) if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => Err(
            ProxyError::BadRequest("the Host header disagrees with the request target"),
        ),
        (Some(a), _) if a.as_str().contains('@') => Err(ProxyError::BadRequest(
            "the request target carries userinfo",
        )),
        (_, Some(h)) => Ok(Some(h.clone())),
        (Some(a), None) => Ok(HeaderValue::from_str(a.as_str()).ok()),
        (None, None) if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "HTTP/1.1 request without a Host header",
        )),
        (None, None) => Ok(None),
    }
}

/// Whether a host[:port]'s port, if any, is digits (`Authority` does not check).
fn port_is_numeric(authority: &[u8]) -> bool {
    match authority.iter().rposition(|&b| b == b':') {
        // A colon inside an IPv6 literal's brackets starts no port.
        Some(i) if !authority[i..].contains(&b']') => {
            authority[i + 1..].iter().all(u8::is_ascii_digit)
        }
        _ => true,
    }
}

/// Remove hop-by-hop headers, including any the `Connection` header names.
///
/// `Host` is never removed this way: the upstream must get exactly one.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Every removal hashes its name, and most messages carry at most a
    // `Connection: keep-alive`: one pass over the names (no hashing) finds
    // which hop-by-hop headers are present, and only those are removed.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_slot(name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & (1 << CONNECTION_SLOT) != 0 {
        let mut named: SmallVec<[HeaderName; 4]> = SmallVec::new();
        for value in headers.get_all(CONNECTION) {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                // Hop-by-hop names (the usual `keep-alive`) are removed below anyway.
                if token.is_empty()
                    || HOP_BY_HOP_NAMES
                        .iter()
                        .any(|h| token.eq_ignore_ascii_case(h.as_bytes()))
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token)
                    && name != HOST
                {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
}

/// The request's place in a trace: its `traceparent` continued, or a new trace.
/// Returns the context and whether the client's header was continued.
pub(crate) fn trace_of(headers: &HeaderMap) -> (TraceContext, bool) {
    TraceContext::continue_or_start(headers.get(TRACEPARENT))
}

/// Turn the client's request head into the one sent upstream, as a hop of
/// `trace` (`continued`: the client's own trace, so its `tracestate` stays).
pub(crate) fn to_upstream(
    parts: &mut request::Parts,
    host: Option<HeaderValue>,
    client: &ClientInfo,
    epoch: &HeaderValue,
    (trace, continued): (TraceContext, bool),
) {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // Up to six headers are added below; growing the map once, not twice.
    headers.reserve(6);

    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    }
    parts.version = Version::HTTP_11;

    if let Some(host) = host {
        // HTTP/1 clients already sent exactly this Host; HTTP/2 ones sent :authority.
        if headers.get(HOST) != Some(&host) {
            headers.insert(HOST, host.clone());
        }
        headers.insert(XF_HOST, host);
    }
    append_forwarded_for(headers, &client.forwarded_for);
    headers.insert(
        XF_PROTO,
        HeaderValue::from_static(if client.tls { "https" } else { "http" }),
    );

    if !continued && headers.keys().any(|k| k == TRACESTATE) {
        headers.remove(TRACESTATE);
    }
    headers.insert(TRACEPARENT, trace.header());
    headers.insert(EPOCH_HEADER, epoch.clone());
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let mut existing = match headers.entry(XFF) {
        Entry::Vacant(v) => {
            v.insert(ip.clone());
            return;
        }
        Entry::Occupied(o) => o,
    };
    let mut joined = Vec::new();
    for v in existing.iter() {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(ip.as_bytes());
    existing.insert(HeaderValue::from_bytes(&joined).unwrap_or_else(|_| ip.clone()));
}

/// Turn the upstream's response head into the one sent to the client.
pub(crate) fn to_downstream(
    headers: &mut HeaderMap,
    partition: &HeaderValue,
    upstream: Option<&str>,
) {
    strip_hop_by_hop(headers);
    headers.insert(PARTITION_HEADER, partition.clone());
    match upstream.and_then(|u| HeaderValue::from_str(u).ok()) {
        Some(u) => {
            headers.insert(UPSTREAM_HEADER, u);
        }
        // An upstream must not be able to claim to be someone else.
        None if headers.keys().any(|k| k == UPSTREAM_HEADER) => {
            headers.remove(UPSTREAM_HEADER);
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        build: impl FnOnce(http::request::Builder) -> http::request::Builder,
    ) -> Request<()> {
        build(Request::builder()).body(()).unwrap()
    }

    #[test]
    fn host_rules() {
        let ok = request(|b| b.uri("/x").header("host", "shop.example:8080"));
        assert_eq!(
            check_inbound(&ok, 16384, &HostMemo::default())
                .unwrap()
                .unwrap(),
            "shop.example:8080"
        );

        let dup = request(|b| b.uri("/x").header("host", "a").header("host", "b"));
        assert!(matches!(
            check_inbound(&dup, 16384, &HostMemo::default()),
            Err(ProxyError::BadRequest(_))
        ));

        let disagree = request(|b| b.uri("http://a.example/x").header("host", "b.example"));
        assert!(matches!(
            check_inbound(&disagree, 16384, &HostMemo::default()),
            Err(ProxyError::BadRequest(_))
        ));

        let userinfo = request(|b| b.uri("/x").header("host", "user@a.example"));
        assert!(matches!(
            check_inbound(&userinfo, 16384, &HostMemo::default()),
            Err(ProxyError::BadRequest(_))
        ));

        for bad in [":8080", "", "a b", "a.example:port"] {
            let r = request(|b| b.uri("/x").header("host", bad));
            assert!(
                matches!(
                    check_inbound(&r, 16384, &HostMemo::default()),
                    Err(ProxyError::BadRequest(_))
                ),
                "{bad:?} accepted"
            );
        }
        for good in ["[::1]:8080", "[::1]", "10.0.0.1", "a.example:80"] {
            let r = request(|b| b.uri("/x").header("host", good));
            assert_eq!(
                check_inbound(&r, 16384, &HostMemo::default())
                    .unwrap()
                    .unwrap(),
                good
            );
        }

        let missing = request(|b| b.uri("/x"));
        assert!(matches!(
            check_inbound(&missing, 16384, &HostMemo::default()),
            Err(ProxyError::BadRequest(_))
        ));

        let h10 = request(|b| b.uri("/x").version(Version::HTTP_10));
        assert_eq!(
            check_inbound(&h10, 16384, &HostMemo::default()).unwrap(),
            None
        );

        let h2 = request(|b| b.uri("http://a.example/x").version(Version::HTTP_2));
        assert_eq!(
            check_inbound(&h2, 16384, &HostMemo::default())
                .unwrap()
                .unwrap(),
            "a.example"
        );
    }

    #[test]
    fn a_connections_remembered_host_vouches_only_for_identical_bytes() {
        let hosts = HostMemo::default();
        let with_host = |h: &'static str| request(|b| b.uri("/x").header("host", h));
        let good = with_host("shop.example:8080");
        for _ in 0..2 {
            assert_eq!(
                check_inbound(&good, 16384, &hosts).unwrap().unwrap(),
                "shop.example:8080"
            );
        }
        for bad in [
            "shop.example:port",
            "shop.example:8080@evil",
            "shop example:8080",
        ] {
            assert!(
                matches!(
                    check_inbound(&with_host(bad), 16384, &hosts),
                    Err(ProxyError::BadRequest(_))
                ),
                "{bad:?} accepted after a valid Host"
            );
        }
        let two = request(|b| {
            b.uri("/x")
                .header("host", "shop.example:8080")
                .header("host", "shop.example:8080")
        });
        assert!(matches!(
            check_inbound(&two, 16384, &hosts),
            Err(ProxyError::BadRequest(_))
        ));
    }

    #[test]
    fn expect_other_than_continue_is_refused() {
        let r = request(|b| {
            b.uri("/x")
                .header("host", "a")
                .header("expect", "100-Continue")
        });
        assert!(check_inbound(&r, 16384, &HostMemo::default()).is_ok());
        let r = request(|b| b.uri("/x").header("host", "a").header("expect", "magic"));
        assert!(matches!(
            check_inbound(&r, 16384, &HostMemo::default()),
            Err(ProxyError::ExpectationFailed)
        ));
    }

    #[test]
    fn oversized_heads_are_refused() {
        let r = request(|b| {
            b.uri("/x")
                .header("host", "a")
                .header("x-big", "v".repeat(2000))
        });
        assert!(matches!(
            check_inbound(&r, 1024, &HostMemo::default()),
            Err(ProxyError::HeadersTooLarge { limit: 1024 })
        ));
    }

    #[test]
    fn upstream_head_strips_hop_by_hop_and_adds_forwarding_headers() {
        let r = request(|b| {
            b.uri("http://a.example/kv/1?x=y")
                .version(Version::HTTP_2)
                .header("connection", "keep-alive, x-secret, host")
                .header("x-secret", "s")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("upgrade", "h2c")
                .header("proxy-authorization", "Basic x")
                .header("expect", "100-continue")
                .header("x-forwarded-for", "1.1.1.1")
                .header("x-forwarded-for", "2.2.2.2")
                .header("tracestate", "vendor=1")
                .header("x-keep", "yes")
        });
        let (mut parts, ()) = r.into_parts();
        let client = ClientInfo::new("10.9.8.7:5555".parse().unwrap(), false);
        let host = check_inbound(
            &Request::from_parts(parts.clone_head(), ()),
            16384,
            &HostMemo::default(),
        )
        .unwrap();
        let trace = trace_of(&parts.headers);
        to_upstream(
            &mut parts,
            host,
            &client,
            &HeaderValue::from_static("42"),
            trace,
        );
        let h = &parts.headers;
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-authorization",
            "expect",
            "tracestate",
        ] {
            assert!(!h.contains_key(gone), "{gone} crossed");
        }
        assert_eq!(h["host"], "a.example");
        assert_eq!(h.get_all("host").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.9.8.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert_eq!(h["x-cluster-epoch"], "42");
        assert_eq!(h["x-keep"], "yes");
        assert!(h["traceparent"].to_str().unwrap().starts_with("00-"));
        assert_eq!(parts.uri, "/kv/1?x=y");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn hop_by_hop_names_and_their_text_agree() {
        for (name, text) in HOP_BY_HOP.iter().zip(HOP_BY_HOP_NAMES) {
            assert_eq!(name.as_str(), text);
            assert_eq!(
                hop_by_hop_slot(text).map(|i| HOP_BY_HOP[i].clone()),
                Some(name.clone())
            );
        }
        for other in [
            "host",
            "server",
            "date",
            "x-connection",
            "connectio",
            "t",
            "",
        ] {
            assert_eq!(hop_by_hop_slot(other), None, "{other}");
        }
    }

    #[test]
    fn response_head_is_cleaned_and_labelled() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-internal"));
        h.insert("x-internal", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-shardgate-upstream", HeaderValue::from_static("spoofed"));
        to_downstream(&mut h, &HeaderValue::from_static("3"), None);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-shardgate-partition"], "3");
    }

    trait CloneHead {
        fn clone_head(&self) -> request::Parts;
    }
    impl CloneHead for request::Parts {
        fn clone_head(&self) -> request::Parts {
            let mut b = Request::builder()
                .method(self.method.clone())
                .uri(self.uri.clone())
                .version(self.version);
            for (k, v) in &self.headers {
                b = b.header(k, v);
            }
            b.body(()).unwrap().into_parts().0
        }
    }
}
