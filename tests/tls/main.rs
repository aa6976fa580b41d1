//! TLS everywhere it belongs: the client listener (curl and `openssl
//! s_client` as real clients), certificate reload, mTLS, upstream TLS, the
//! admin listener and an authenticated control plane. Certificates are made
//! at test time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use http::Request;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use support::tls::{CertPair, Pki, curl, curl_https, handshake, http1, s_client};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H1: &[&[u8]] = &[b"http/1.1"];

/// `[tls]` serving `cert`, plus `more` lines in that section.
fn tls_toml(cert: &CertPair, more: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{more}\n",
        cert.cert_str(),
        cert.key_str()
    )
}

fn one_node(up: &Upstream) -> String {
    topology(1, &[(up.addr, vec![])])
}

/// A proxy serving TLS for `shard.test` from a fresh CA, in front of one upstream.
struct Edge {
    /// Holds the certificate files for the proxy's lifetime.
    _dir: tempfile::TempDir,
    pki: Pki,
    up: Upstream,
    proxy: TestProxy,
}

impl Edge {
    async fn start(more_tls: &str) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "edge");
        let cert = pki.server("proxy", &["shard.test", "127.0.0.1"]);
        let up = Upstream::start("a").await;
        let proxy = TestProxy::start(&one_node(&up), &tls_toml(&cert, more_tls)).await;
        Edge {
            _dir: dir,
            pki,
            up,
            proxy,
        }
    }

    fn ca(&self) -> &str {
        self.pki.ca_path.to_str().unwrap()
    }

    fn resolve(&self) -> String {
        format!("shard.test:{}:127.0.0.1", self.proxy.addr.port())
    }

    fn url(&self, path: &str) -> String {
        format!("https://shard.test:{}{path}", self.proxy.addr.port())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_are_served_over_tls_1_2_and_tls_1_3() {
    let edge = Edge::start("").await;
    let (resolve, url) = (edge.resolve(), edge.url("/kv/k1"));
    for (min, max, name) in [
        ("--tlsv1.2", "1.2", "TLSv1.2"),
        ("--tlsv1.3", "1.3", "TLSv1.3"),
    ] {
        let out = curl(&[
            "-v",
            "--cacert",
            edge.ca(),
            "--resolve",
            &resolve,
            min,
            "--tls-max",
            max,
            &url,
        ])
        .await;
        assert!(out.ok, "curl {name}: {}", out.all());
        assert_eq!(out.stdout, "a", "the upstream's answer came back");
        assert!(
            out.stderr.contains(&format!("SSL connection using {name}")),
            "{}",
            out.stderr
        );
    }
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(
            edge.proxy.addr,
            &[
                flag,
                "-brief",
                "-servername",
                "shard.test",
                "-CAfile",
                edge.ca(),
                "-verify_return_error",
            ],
        )
        .await;
        assert!(out.ok, "s_client {name}: {}", out.all());
        let all = out.all();
        assert!(all.contains(&format!("Protocol version: {name}")), "{all}");
        assert!(all.contains("Verification: OK"), "{all}");
    }
    let seen = edge.up.log();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.header("x-forwarded-proto"), Some("https"));
        assert_eq!(r.version, http::Version::HTTP_11);
    }
    edge.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_http_1_1_on_one_port_and_both_proxy() {
    let edge = Edge::start("").await;
    let (resolve, url) = (edge.resolve(), edge.url("/kv/k1"));
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl(&[
            "--cacert",
            edge.ca(),
            "--resolve",
            &resolve,
            flag,
            "-w",
            "|%{http_version}|%{http_code}",
            &url,
        ])
        .await;
        assert!(out.ok, "{}", out.all());
        assert_eq!(out.stdout, format!("a|{version}|200"));
    }
    for (offer, chosen) in [
        ("h2", "h2"),
        ("http/1.1", "http/1.1"),
        ("h2,http/1.1", "h2"),
    ] {
        let hs = handshake(
            edge.proxy.addr,
            "shard.test",
            &edge.pki.ca_path,
            &offer.split(',').map(str::as_bytes).collect::<Vec<_>>(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            hs.alpn.as_deref(),
            Some(chosen.as_bytes()),
            "offered {offer}"
        );
    }
    let out = s_client(
        edge.proxy.addr,
        &[
            "-alpn",
            "h2",
            "-servername",
            "shard.test",
            "-CAfile",
            edge.ca(),
        ],
    )
    .await;
    assert!(out.all().contains("ALPN protocol: h2"), "{}", out.all());
    assert_eq!(edge.up.requests(), 2, "both protocols reached the upstream");
    edge.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused() {
    let edge = Edge::start("").await;
    for flag in ["-tls1", "-tls1_1"] {
        // Security level 0 lets this OpenSSL offer the old versions at all.
        let out = s_client(
            edge.proxy.addr,
            &[
                flag,
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
                "-servername",
                "shard.test",
            ],
        )
        .await;
        let all = out.all();
        assert!(!out.ok, "{flag} was accepted: {all}");
        assert!(
            all.contains("CONNECTED"),
            "the client did offer {flag}: {all}"
        );
        assert!(
            all.contains("alert"),
            "the server refused with an alert: {all}"
        );
        assert!(all.contains("no peer certificate available"), "{all}");
    }
    let ok = s_client(
        edge.proxy.addr,
        &["-tls1_2", "-servername", "shard.test", "-CAfile", edge.ca()],
    )
    .await;
    assert!(ok.ok, "TLS 1.2 from the same client works: {}", ok.all());
    edge.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_for_the_requested_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "edge");
    let default = pki.server("default", &["default.test"]);
    let api = pki.server("api", &["api.test", "api2.test"]);
    let admin = pki.server("admin", &["admin.test"]);
    let up = Upstream::start("a").await;
    let sni = format!(
        "sni = [ {{ names = [\"api.test\", \"API2.test\"], cert = {:?}, key = {:?} }}, \
                 {{ names = [\"admin.test\"], cert = {:?}, key = {:?} }} ]",
        api.cert_str(),
        api.key_str(),
        admin.cert_str(),
        admin.key_str()
    );
    let proxy = TestProxy::start(&one_node(&up), &tls_toml(&default, &sni)).await;
    for (name, want) in [
        ("api.test", &api),
        ("api2.test", &api),
        ("admin.test", &admin),
        ("default.test", &default),
    ] {
        let hs = handshake(proxy.addr, name, &pki.ca_path, H1, None)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hs.leaf, want.leaf_der(), "certificate served for {name}");
    }
    // A name nobody configured gets the default certificate.
    let out = s_client(proxy.addr, &["-servername", "unknown.test"]).await;
    assert!(out.stdout.contains("CN = default.test"), "{}", out.all());
    // curl verifies the name it asked for, so this only works with the right certificate.
    let out = curl_https(proxy.addr, "api.test", &pki.ca_path, "/kv/k").await;
    assert!(out.ok, "{}", out.all());
    proxy.stop().await;
}

/// The real binary with a config file, so SIGHUP can reload it.
async fn bin_proxy_with_tls(dir: &std::path::Path, up: &Upstream, cert: &CertPair) -> BinProxy {
    let topo = dir.join("topology.json");
    std::fs::write(&topo, one_node(up)).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        base_config(&topo, &tls_toml(cert, "handshake_timeout = \"2s\"")),
    )
    .unwrap();
    BinProxy::spawn(&["--config", config.to_str().unwrap()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_renewed_certificate_to_new_connections_while_keep_alive_ones_continue() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "edge");
    let first = pki.server("proxy", &["shard.test"]);
    let first_der = first.leaf_der();
    let up = Upstream::start("a").await;
    let proxy = bin_proxy_with_tls(dir.path(), &up, &first).await;

    let hs = handshake(proxy.addr, "shard.test", &pki.ca_path, H1, None)
        .await
        .unwrap();
    assert_eq!(hs.leaf, first_der);
    let mut established = http1(hs.stream).await;
    let get = || {
        Request::get("/kv/k1")
            .header("host", "shard.test")
            .body(Full::default())
            .unwrap()
    };
    let r = established.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    // Renew in place (same paths, new key and certificate), then reload.
    let renewed = pki.server("proxy", &["shard.test"]);
    let renewed_der = renewed.leaf_der();
    assert_ne!(renewed_der, first_der);
    proxy.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "new connections get the renewed certificate",
        || async {
            let hs = handshake(proxy.addr, "shard.test", &pki.ca_path, H1, None).await;
            hs.is_ok_and(|h| h.leaf == renewed_der)
        },
    )
    .await;

    // The connection made before the reload still works.
    let r = established.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.into_body().collect().await.unwrap().to_bytes()[..], b"a");
    assert_eq!(up.requests(), 2);

    // A broken certificate is refused and the one in force stays.
    std::fs::write(
        &renewed.cert,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    )
    .unwrap();
    proxy.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "the bad certificate is refused",
        || async { proxy.stderr().contains("reload refused") },
    )
    .await;
    let hs = handshake(proxy.addr, "shard.test", &pki.ca_path, H1, None)
        .await
        .unwrap();
    assert_eq!(
        hs.leaf, renewed_der,
        "the previous certificate is still served"
    );
    let r = established.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_from_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "edge");
    let rogue = Pki::new(dir.path(), "rogue");
    let server = pki.server("proxy", &["shard.test"]);
    let good = pki.client("good-client", "client.test");
    let bad = rogue.client("rogue-client", "client.test");
    let up = Upstream::start("a").await;
    let client_ca = format!("client_ca = {:?}", pki.ca_path.to_str().unwrap());
    let proxy = TestProxy::start(&one_node(&up), &tls_toml(&server, &client_ca)).await;
    let port = proxy.addr.port();
    let resolve = format!("shard.test:{port}:127.0.0.1");
    let url = format!("https://shard.test:{port}/kv/k");
    let ca = pki.ca_path.to_str().unwrap();
    let base = ["--cacert", ca, "--resolve", &resolve];

    let none = curl(&[&base[..], &[url.as_str()]].concat()).await;
    assert!(
        !none.ok,
        "no client certificate was accepted: {}",
        none.all()
    );
    let wrong = curl(
        &[
            &base[..],
            &["--cert", bad.cert_str(), "--key", bad.key_str(), &url],
        ]
        .concat(),
    )
    .await;
    assert!(
        !wrong.ok,
        "a rogue CA's certificate was accepted: {}",
        wrong.all()
    );
    assert_eq!(up.requests(), 0, "nothing reached the upstream");

    let right = curl(
        &[
            &base[..],
            &["--cert", good.cert_str(), "--key", good.key_str(), &url],
        ]
        .concat(),
    )
    .await;
    assert!(right.ok, "{}", right.all());
    assert_eq!(right.stdout, "a");
    assert_eq!(up.requests(), 1);
    proxy.stop().await;
}

/// A node answering "secure" over TLS with a certificate for 127.0.0.1 from
/// the `nodes` CA, and the `[upstream]` settings that trust that CA.
async fn tls_node(nodes: &Pki) -> (Upstream, String) {
    let by_ip = nodes.server("node-ip", &["127.0.0.1"]);
    let up = Upstream::start_tls("secure", &by_ip.cert, &by_ip.key).await;
    let upstream = format!(
        "[upstream]\ntls = true\ntls_ca = {:?}\n",
        nodes.ca_path.to_str().unwrap()
    );
    (up, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_reaches_nodes_with_certificates_from_the_configured_ca_and_pools_them() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = Pki::new(dir.path(), "nodes");
    // Verified against the node's IP by default...
    let (up, upstream) = tls_node(&nodes).await;
    let proxy = TestProxy::start(&one_node(&up), &upstream).await;
    let c = client();
    for i in 0..3 {
        let a = get_key(&c, &proxy.url("/kv/x"), &format!("k{i}")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.text(), "secure");
    }
    assert_eq!(up.requests(), 3);
    assert_eq!(up.connections_accepted(), 1, "TLS connections are pooled");
    proxy.stop().await;

    // ...or against a configured name, sent in SNI.
    let by_name = nodes.server("node-name", &["node.internal"]);
    let up = Upstream::start_tls("named", &by_name.cert, &by_name.key).await;
    let named = format!("{upstream}tls_server_name = \"node.internal\"\n");
    let proxy = TestProxy::start(&one_node(&up), &named).await;
    let a = get_key(&c, &proxy.url("/kv/x"), "k").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "named");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_tls_upstream_connection_serves_again_on_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = Pki::new(dir.path(), "nodes");
    let (up, upstream) = tls_node(&nodes).await;
    let proxy = TestProxy::start(&one_node(&up), &upstream).await;
    let c = client();
    let a = get_key(&c, &proxy.url("/kv/x"), "k1").await;
    assert_eq!(a.status, 200, "{}", a.text());
    // Idle for over a second, the pooled connection is parked by the next
    // housekeeping sweep (every 5 s): hyper's state goes, the TLS session stays.
    let pool = |field: &'static str| {
        let admin = proxy.admin;
        async move {
            admin_get(admin, "/admin/upstreams").await.json()["upstreams"][0][field]
                .as_u64()
                .unwrap_or(0)
        }
    };
    eventually(
        Duration::from_secs(15),
        "the idle connection is parked",
        || async { pool("parked_connections").await == 1 },
    )
    .await;
    let b = get_key(&c, &proxy.url("/kv/x"), "k2").await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.text(), "secure");
    assert_eq!(up.requests(), 2);
    assert_eq!(
        up.connections_accepted(),
        1,
        "the parked session was used again"
    );
    assert_eq!(
        pool("parked_connections").await,
        0,
        "and pooled whole again"
    );
    assert_eq!(pool("idle_connections").await, 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_refuses_a_node_whose_certificate_is_not_from_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = Pki::new(dir.path(), "nodes");
    let rogue = Pki::new(dir.path(), "rogue");
    let impostor = rogue.server("impostor", &["127.0.0.1"]);
    let up = Upstream::start_tls("impostor", &impostor.cert, &impostor.key).await;
    let upstream = format!(
        "[upstream]\ntls = true\ntls_ca = {:?}\n[retry]\nmax_attempts = 1\n",
        nodes.ca_path.to_str().unwrap()
    );
    let proxy = TestProxy::start(&one_node(&up), &upstream).await;
    // The handshake fails before a byte of the request is sent: the node
    // counts as unreachable, and the error says why.
    let a = send(&client(), keyed("POST", &proxy.url("/kv/x"), "k", "secret")).await;
    a.assert_error(503, "primary_unavailable");
    assert!(a.text().contains("UnknownIssuer"), "{}", a.text());
    assert_eq!(up.requests(), 0, "no request reached the impostor");
    // A node with the right certificate on the wrong name is refused too.
    let wrong_name = nodes.server("elsewhere", &["elsewhere.internal"]);
    let up = Upstream::start_tls("misnamed", &wrong_name.cert, &wrong_name.key).await;
    let proxy2 = TestProxy::start(&one_node(&up), &upstream).await;
    let a = send(&client(), keyed("GET", &proxy2.url("/kv/x"), "k", "")).await;
    a.assert_error(503, "no_healthy_upstream");
    assert!(a.text().contains("not valid for name"), "{}", a.text());
    assert_eq!(up.requests(), 0);
    proxy.stop().await;
    proxy2.stop().await;
}

/// Read until the peer closes, or fail after `cap`.
async fn closed_within(s: &mut tokio::net::TcpStream, cap: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(cap, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the proxy kept the connection open past {cap:?}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_client_hellos_are_cut_off_at_the_handshake_timeout() {
    let edge = Edge::start("handshake_timeout = \"300ms\"").await;
    // A handshake record header promising 512 bytes, then a few of them.
    let mut partial = tokio::net::TcpStream::connect(edge.proxy.addr)
        .await
        .unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    // And a client that connects and says nothing at all.
    let mut silent = tokio::net::TcpStream::connect(edge.proxy.addr)
        .await
        .unwrap();
    // Both are closed by the proxy, long before any client-side cap.
    assert!(
        closed_within(&mut partial, Duration::from_secs(10))
            .await
            .is_empty()
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(10))
            .await
            .is_empty()
    );
    // Complete handshakes are unaffected.
    let out = curl_https(edge.proxy.addr, "shard.test", &edge.pki.ca_path, "/kv/k").await;
    assert!(out.ok, "{}", out.all());
    edge.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_sent_to_the_tls_port_gets_a_400_and_a_prompt_close() {
    let edge = Edge::start("").await;
    let mut s = tokio::net::TcpStream::connect(edge.proxy.addr)
        .await
        .unwrap();
    s.write_all(b"GET /kv/k HTTP/1.1\r\nHost: shard.test\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(closed_within(&mut s, Duration::from_secs(10)).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("x-shardgate-error: bad_request"),
        "{answer}"
    );
    assert!(answer.contains("use https"), "{answer}");
    assert_eq!(edge.up.requests(), 0, "plain text is never forwarded");
    edge.proxy.stop().await;
}

/// wrk and many OpenSSL clients send the address they connect to as the
/// server name, which RFC 6066 forbids; rustls ignores it and warned on
/// every handshake, so a load test wrote one log line per connection. The
/// log stays quiet; failed handshakes are counted by reason instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_name_an_ip_address_do_not_write_a_log_line_per_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "edge");
    let cert = pki.server("proxy", &["shard.test", "127.0.0.1"]);
    let up = Upstream::start("a").await;
    let proxy = bin_proxy_with_tls(dir.path(), &up, &cert).await;
    // Start-up lines reach the collector after the readiness line on
    // stdout; count from the last of them.
    eventually(Duration::from_secs(10), "the start-up log", || async {
        proxy.stderr().contains("proxy listening")
    })
    .await;
    let before = proxy.stderr().lines().count();

    for _ in 0..5 {
        let out = s_client(proxy.addr, &["-servername", "127.0.0.1", "-tls1_3"]).await;
        assert!(out.all().contains("TLSv1.3"), "{}", out.all());
    }
    // One of each failure the counter tells apart.
    let mut plain = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: shard.test\r\n\r\n")
        .await
        .unwrap();
    closed_within(&mut plain, Duration::from_secs(10)).await;
    let old = s_client(proxy.addr, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]).await;
    assert!(!old.ok && old.all().contains("alert"), "{}", old.all());
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(10)).await;

    let failures = |reason: &'static str| {
        let admin = proxy.admin;
        async move {
            metric(
                admin,
                &format!("shardgate_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
            )
            .await
        }
    };
    assert_eq!(failures("plain_http").await, 1.0);
    assert_eq!(failures("refused").await, 1.0);
    assert_eq!(failures("timeout").await, 1.0);
    let logged: Vec<String> = proxy
        .stderr()
        .lines()
        .skip(before)
        .map(str::to_owned)
        .collect();
    assert!(
        logged.is_empty(),
        "handshakes, good or bad, log nothing by default: {logged:?}"
    );
    assert_eq!(up.requests(), 0);
}

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_tls_port_never_crash_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "edge");
    let cert = pki.server("proxy", &["shard.test"]);
    let up = Upstream::start("a").await;
    let mut proxy = bin_proxy_with_tls(dir.path(), &up, &cert).await;
    let mut rng = XorShift(0x5EED_7152);
    let mut tasks = Vec::new();
    for i in 0..300 {
        let len = 1 + (rng.next() % 4096) as usize;
        let mut blob = rng.bytes(len);
        if i % 3 == 0 {
            // Looks like a handshake record, then garbage: reaches rustls' parser.
            blob[..3.min(len)].copy_from_slice(&[0x16, 0x03, 0x01][..3.min(len)]);
        }
        let close_early = i % 5 == 0;
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let _ = s.write_all(&blob).await;
            if close_early {
                return;
            }
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited: {}",
        proxy.stderr()
    );
    let out = curl_https(proxy.addr, "shard.test", &pki.ca_path, "/kv/k").await;
    assert!(out.ok, "{}", out.all());
    assert_eq!(up.requests(), 1, "no garbage was ever forwarded");
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_can_require_tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ops");
    let server = pki.server("admin", &["127.0.0.1"]);
    let scraper = pki.client("prometheus", "prometheus");
    let up = Upstream::start("a").await;
    let admin = format!(
        "[server]\nadmin_tls_cert = {:?}\nadmin_tls_key = {:?}\nadmin_client_ca = {:?}\n",
        server.cert_str(),
        server.key_str(),
        pki.ca_path.to_str().unwrap()
    );
    let proxy = TestProxy::start(&one_node(&up), &admin).await;
    let url = format!("https://{}/metrics", proxy.admin);
    let ca = pki.ca_path.to_str().unwrap();
    let out = curl(&[
        "--cacert",
        ca,
        "--cert",
        scraper.cert_str(),
        "--key",
        scraper.key_str(),
        &url,
    ])
    .await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout.contains("shardgate_topology_epoch"),
        "{}",
        out.stdout
    );
    let anonymous = curl(&["--cacert", ca, &url]).await;
    assert!(!anonymous.ok, "{}", anonymous.all());
    let plain = curl(&[&format!("http://{}/metrics", proxy.admin)]).await;
    assert!(
        !plain.ok || !plain.stdout.contains("shardgate_"),
        "{}",
        plain.all()
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------

fn control_map(node: &str) -> String {
    serde_json::json!({
        "clusterEpoch": 3, "masterNodeId": "ignored", "partitionCount": 1,
        "partitions": [
            {"partitionIndex": 0, "primaryNodeIp": node, "replicaNodeIps": [],
             "hashRangeStart": "00000000", "hashRangeEnd": "ffffffff"}
        ]
    })
    .to_string()
}

/// The real coordinator binary in `d`, serving `cert` on both listeners with
/// `more` after its `[coordinator]` TLS lines, and a one-partition map on `node`
/// from a file store.
async fn bin_coordinator(
    d: &std::path::Path,
    cert: &CertPair,
    more: &str,
    node: &str,
) -> BinCoordinator {
    std::fs::write(d.join("map.json"), control_map(node)).unwrap();
    std::fs::write(
        d.join("coordinator.toml"),
        format!(
            "[coordinator]\nid = \"c1\"\ntls_cert = {:?}\ntls_key = {:?}\n{more}",
            cert.cert_str(),
            cert.key_str()
        ),
    )
    .unwrap();
    let store = format!("file:{}", d.join("state.json").display());
    BinCoordinator::spawn(&[
        "--config",
        d.join("coordinator.toml").to_str().unwrap(),
        "--topology",
        d.join("map.json").to_str().unwrap(),
        "--store",
        &store,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_runs_over_mutual_tls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d, "cluster");
    let rogue = Pki::new(d, "rogue");
    let coord_cert = pki.server("coordinator", &["localhost", "127.0.0.1"]);
    let agent_cert = pki.client("agent", "agent-n1");
    let proxy_cert = pki.client("proxy-client", "proxy-1");
    let rogue_cert = rogue.client("rogue-client", "agent-n1");
    let ca = pki.ca_path.to_str().unwrap().to_owned();

    let up = Upstream::start("node-1").await;
    let node = up.addr.to_string();
    let coordinator = bin_coordinator(
        d,
        &coord_cert,
        &format!(
            "http_client_ca = {ca:?}\ngrpc_client_ca = {ca:?}\nadmin_token = \"t0ken-never-logged\"\n\
             [log]\nlevel = \"debug\"\n"
        ),
        &node,
    )
    .await;
    let grpc = format!("https://localhost:{}", coordinator.grpc.port());
    let http = format!("https://localhost:{}", coordinator.http.port());

    // An agent with a certificate from the cluster CA gets its heartbeats in.
    let _agent = BinProcess::spawn(
        &[
            "agent",
            "--coordinator",
            &grpc,
            "--node-id",
            "n1",
            "--ip",
            &node,
            "--interval",
            "0.2",
            "--tls-ca",
            &ca,
            "--tls-cert",
            agent_cert.cert_str(),
            "--tls-key",
            agent_cert.key_str(),
        ],
        false,
    )
    .await;
    let nodes_url = format!("{http}/v1/cluster/nodes");
    let with_cert = [
        "--cacert",
        &ca,
        "--cert",
        proxy_cert.cert_str(),
        "--key",
        proxy_cert.key_str(),
    ];
    eventually(
        Duration::from_secs(20),
        "the TLS agent's node is ACTIVE",
        || async {
            let out = curl(&[&with_cert[..], &[nodes_url.as_str()]].concat()).await;
            out.ok && out.stdout.contains("\"n1\"") && out.stdout.contains("ACTIVE")
        },
    )
    .await;

    // gRPC clients without a certificate, or with a rogue one, are refused.
    for identity in [None, Some(&rogue_cert)] {
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&ca).unwrap()),
        );
        if let Some(id) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                std::fs::read(&id.cert).unwrap(),
                std::fs::read(&id.key).unwrap(),
            ));
        }
        let channel = tonic::transport::Endpoint::from_shared(grpc.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        let refused = match channel {
            Err(_) => true,
            Ok(ch) => {
                let mut c = shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient::new(ch);
                c.report_heartbeat(heartbeat_req("n1", &node, unix_ms()))
                    .await
                    .is_err()
            }
        };
        assert!(refused, "a gRPC client without a valid certificate got in");
    }

    // HTTP without a client certificate is refused; a wrong token is refused and never logged.
    let anonymous = curl(&["--cacert", &ca, &nodes_url]).await;
    assert!(!anonymous.ok, "{}", anonymous.all());
    let put = curl(
        &[
            &with_cert[..],
            &[
                "-X",
                "PUT",
                "-H",
                "authorization: Bearer wr0ng-guess",
                "--data",
                "{}",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{http}/v1/cluster/topology"),
            ],
        ]
        .concat(),
    )
    .await;
    assert_eq!(put.stdout, "401", "{}", put.all());

    // A proxy follows the coordinator over mTLS and serves the map.
    let topology = format!(
        "[topology]\nsources = [{http:?}]\ntls_ca = {ca:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
        proxy_cert.cert_str(),
        proxy_cert.key_str()
    );
    let proxy = TestProxy::start(&control_map(&node), &topology).await;
    eventually(
        Duration::from_secs(10),
        "the proxy applied the coordinator's map",
        || async { proxy.proxy().epoch().is_some_and(|e| e >= 3) },
    )
    .await;
    let a = get_key(&client(), &proxy.url("/kv/x"), "k").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "node-1");
    proxy.stop().await;

    let logs = coordinator.proc.stderr();
    assert!(
        !logs.contains("t0ken-never-logged"),
        "the admin token was logged"
    );
    assert!(
        !logs.contains("wr0ng-guess"),
        "a presented token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_gives_the_coordinator_a_renewed_certificate_and_keeps_it_over_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d, "cluster");
    let first = pki.server("coordinator", &["localhost", "127.0.0.1"]);
    let first_der = first.leaf_der();
    let up = Upstream::start("node-1").await;
    let coordinator = bin_coordinator(d, &first, "", &up.addr.to_string()).await;
    // Both listeners: HTTP (http/1.1) and gRPC (h2).
    let listeners = [
        (coordinator.http, H1),
        (coordinator.grpc, &[&b"h2"[..]][..]),
    ];
    let leaves = || async {
        let mut leaves = Vec::new();
        for (addr, alpn) in listeners {
            match handshake(addr, "localhost", &pki.ca_path, alpn, None).await {
                Ok(hs) => leaves.push(hs.leaf),
                Err(_) => return None,
            }
        }
        Some(leaves)
    };
    assert_eq!(leaves().await, Some(vec![first_der.clone(), first_der]));

    // Renew in place (same paths, new key and certificate), then reload.
    let renewed = pki.server("coordinator", &["localhost", "127.0.0.1"]);
    let renewed_der = renewed.leaf_der();
    coordinator.proc.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "both listeners serve the renewed certificate",
        || async { leaves().await == Some(vec![renewed_der.clone(), renewed_der.clone()]) },
    )
    .await;

    // A broken certificate is refused and the one in force stays.
    std::fs::write(
        &renewed.cert,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    )
    .unwrap();
    coordinator.proc.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "the broken certificate is refused",
        || async { coordinator.proc.stderr().contains("TLS reload refused") },
    )
    .await;
    assert_eq!(
        leaves().await,
        Some(vec![renewed_der.clone(), renewed_der]),
        "the previous certificate is still served"
    );
}
