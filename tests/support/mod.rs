//! Shared test support: upstream servers that record every request and can
//! misbehave on demand, proxies started in-process or as the real binary,
//! and a small HTTP client.
//!
//! Everything binds 127.0.0.1:0 so tests run in parallel, and every wait is a
//! bounded poll of a condition, never a fixed sleep.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub(crate) mod tls;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

pub(crate) type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

// ---------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------

/// What a test upstream does with the next requests.
#[derive(Clone, Debug)]
pub(crate) enum Behavior {
    /// 200 with the node's name as the body.
    Ok,
    /// This status, the node's name as the body.
    Status(u16),
    /// This status, these headers, this body.
    Respond {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static str,
    },
    /// Read the request head, then reset the connection (RST) without answering.
    Reset,
    /// Answer 200 with a declared 1 MiB body, send a little of it, then reset.
    ResetMidBody,
    /// Read the request and never answer.
    Hang,
    /// Answer 200, then send `bytes` bytes one at a time, `every` apart.
    Drip { bytes: usize, every: Duration },
    /// Answer 200 (the node's name) after waiting this long.
    Slow(Duration),
    /// Answer 200 with `bytes` bytes streamed in 64 KiB chunks.
    Stream { bytes: u64 },
    /// Write two responses' worth of bytes for one request: a framing error
    /// waiting for whoever reuses the connection.
    ExtraBytes,
}

/// One request as it reached an upstream.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_complete: bool,
    pub body_prefix: Vec<u8>,
}

impl Recorded {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct UpstreamState {
    name: String,
    /// Serve TLS with this acceptor instead of plain HTTP.
    tls: Option<tokio_rustls::TlsAcceptor>,
    behavior: Mutex<Behavior>,
    /// Behaviours for the next requests, one each, before `behavior` applies again.
    script: Mutex<std::collections::VecDeque<Behavior>>,
    log: Mutex<Vec<Recorded>>,
    /// Counts requests as they arrive, before their bodies are read.
    arrivals: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
    /// Requests abandoned before the upstream answered (the proxy hung up).
    cancelled: AtomicU64,
    restart: Notify,
    refusing: Mutex<bool>,
    accepted: AtomicU64,
}

/// A recording HTTP/1.1 upstream on 127.0.0.1.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: AbortHandle,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Upstream {
    /// A well-behaved upstream named `name`.
    pub(crate) async fn start(name: &str) -> Upstream {
        Upstream::start_with(name, None).await
    }

    /// A well-behaved upstream speaking HTTP/1.1 over TLS with `cert` and `key` (PEM files).
    pub(crate) async fn start_tls(name: &str, cert: &Path, key: &Path) -> Upstream {
        let spec = shardgate::tls::ServerTls {
            default: shardgate::tls::CertFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
            sni: Vec::new(),
            client_ca: None,
        };
        let config = shardgate::tls::server_config(&spec, shardgate::tls::ALPN_H1).unwrap();
        Upstream::start_with(name, Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = port_holder("127.0.0.1:0".parse().unwrap())
            .listen(1024)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            tls,
            name: name.to_owned(),
            behavior: Mutex::new(Behavior::Ok),
            script: Mutex::new(std::collections::VecDeque::new()),
            log: Mutex::new(Vec::new()),
            arrivals: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
            cancelled: AtomicU64::new(0),
            restart: Notify::new(),
            refusing: Mutex::new(false),
            accepted: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, addr, state.clone())).abort_handle();
        Upstream { addr, state, task }
    }

    pub(crate) fn name(&self) -> &str {
        &self.state.name
    }

    pub(crate) fn set(&self, b: Behavior) {
        *self.state.behavior.lock().unwrap() = b;
    }

    /// Use `bs` for the next requests, one each, then the standing behaviour again.
    pub(crate) fn script(&self, bs: Vec<Behavior>) {
        *self.state.script.lock().unwrap() = bs.into();
    }

    /// Stop listening and drop every connection: connects are refused.
    pub(crate) fn refuse(&self) {
        *self.state.refusing.lock().unwrap() = true;
        self.state.restart.notify_one();
        self.kill_connections();
    }

    /// Listen again on the same port.
    pub(crate) fn resume(&self) {
        *self.state.refusing.lock().unwrap() = false;
        self.state.restart.notify_one();
    }

    /// Drop every open connection (a crash, as the proxy sees it).
    pub(crate) fn kill_connections(&self) {
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Close every open connection and wait until each is closed: a node that
    /// restarted between two requests, as the proxy's idle pool sees it.
    pub(crate) async fn close_connections(&self) {
        let open: Vec<AbortHandle> = self.state.connections.lock().unwrap().drain(..).collect();
        for c in &open {
            c.abort();
        }
        while !open.iter().all(AbortHandle::is_finished) {
            tokio::task::yield_now().await;
        }
    }

    /// Every request received so far.
    pub(crate) fn log(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    pub(crate) fn requests(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    /// Requests whose head arrived, including ones still reading their body.
    pub(crate) fn arrivals(&self) -> u64 {
        self.state.arrivals.load(Ordering::SeqCst)
    }

    /// Requests abandoned mid-way because the proxy closed the connection.
    pub(crate) fn cancelled(&self) -> u64 {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub(crate) fn connections_accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    pub(crate) fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// Writes (non-read methods) that reached this node.
    pub(crate) fn writes(&self) -> Vec<Recorded> {
        self.log()
            .into_iter()
            .filter(|r| !matches!(r.method.as_str(), "GET" | "HEAD" | "OPTIONS"))
            .collect()
    }
}

/// A socket bound to `addr` but not yet listening. SO_REUSEPORT lets it bind
/// beside the live listener it replaces, so the port is never free.
fn port_holder(addr: SocketAddr) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(addr).unwrap();
    socket
}

async fn accept_loop(mut listener: TcpListener, addr: SocketAddr, state: Arc<UpstreamState>) {
    loop {
        if *state.refusing.lock().unwrap() {
            // Keep the port while refusing: a bound socket that does not listen
            // answers connects with a reset, as a dead node's port does, and no
            // other test's bind to port 0 can take it meanwhile.
            let held = port_holder(addr);
            drop(listener);
            // A connection accepted while refuse() ran would outlive it: kill
            // again now that nothing more can be accepted, as a dying process
            // closes every socket it has.
            for c in state.connections.lock().unwrap().drain(..) {
                c.abort();
            }
            loop {
                state.restart.notified().await;
                if !*state.refusing.lock().unwrap() {
                    break;
                }
            }
            listener = held.listen(1024).unwrap();
            continue;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = state.restart.notified() => continue,
        };
        let Ok((stream, _)) = accepted else { continue };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let std_stream = stream.into_std().unwrap();
        let control = std_stream.try_clone().unwrap();
        let stream = tokio::net::TcpStream::from_std(std_stream).unwrap();
        let control = Arc::new(Mutex::new(Some(control)));
        let st = state.clone();
        let handle = tokio::spawn(async move {
            let tls = st.tls.clone();
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                let control = control.clone();
                async move { respond(st, control, req).await }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
        let mut conns = state.connections.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.push(handle.abort_handle());
    }
}

fn reset_now(control: &Mutex<Option<std::net::TcpStream>>) {
    if let Some(s) = control.lock().unwrap().take() {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
}

async fn respond(
    st: Arc<UpstreamState>,
    control: Arc<Mutex<Option<std::net::TcpStream>>>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, std::io::Error> {
    st.arrivals.fetch_add(1, Ordering::SeqCst);
    // Counts the request as cancelled if this future is dropped before answering.
    struct Unanswered(Arc<UpstreamState>, bool);
    impl Drop for Unanswered {
        fn drop(&mut self) {
            if !self.1 {
                self.0.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let mut unanswered = Unanswered(st.clone(), false);
    let answer = respond_inner(st.clone(), control, req).await;
    unanswered.1 = true;
    drop(unanswered);
    answer
}

async fn respond_inner(
    st: Arc<UpstreamState>,
    control: Arc<Mutex<Option<std::net::TcpStream>>>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, std::io::Error> {
    let scripted = st.script.lock().unwrap().pop_front();
    let behavior = scripted.unwrap_or_else(|| st.behavior.lock().unwrap().clone());
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    let mut body_complete = true;
    let mut prefix = Vec::new();
    if !matches!(behavior, Behavior::Reset) {
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        body_len += d.len() as u64;
                        if prefix.len() < 256 {
                            prefix.extend_from_slice(&d[..d.len().min(256 - prefix.len())]);
                        }
                    }
                }
                Some(Err(_)) => {
                    body_complete = false;
                    break;
                }
                None => break,
            }
        }
    }
    st.log.lock().unwrap().push(Recorded {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body_len,
        body_complete,
        body_prefix: prefix,
    });
    let name = Bytes::from(st.name.clone());
    let full = |status: u16, body: Bytes| {
        Response::builder()
            .status(status)
            .header("x-upstream", st.name.as_str())
            .body(Full::new(body).map_err(|e: Infallible| match e {}).boxed())
            .unwrap()
    };
    match behavior {
        Behavior::Ok => Ok(full(200, name)),
        Behavior::Slow(wait) => {
            tokio::time::sleep(wait).await;
            Ok(full(200, name))
        }
        Behavior::Status(s) => Ok(full(s, name)),
        Behavior::Respond {
            status,
            headers,
            body,
        } => {
            let mut r = full(status, Bytes::from_static(body.as_bytes()));
            for (k, v) in headers {
                r.headers_mut().append(k, v.parse().unwrap());
            }
            Ok(r)
        }
        Behavior::Reset => {
            reset_now(&control);
            Err(std::io::Error::other("reset"))
        }
        Behavior::ResetMidBody => {
            let control = control.clone();
            let stream = async_stream(move |tx| async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"partial-"))))
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                reset_now(&control);
                let _ = tx.send(Err(std::io::Error::other("reset mid-body"))).await;
            });
            Ok(Response::builder()
                .status(200)
                .header("content-length", "1048576")
                .body(stream)
                .unwrap())
        }
        Behavior::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Behavior::Drip { bytes, every } => {
            let stream = async_stream(move |tx| async move {
                for _ in 0..bytes {
                    if tx
                        .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
            Ok(Response::builder().status(200).body(stream).unwrap())
        }
        Behavior::Stream { bytes } => {
            let stream = async_stream(move |tx| async move {
                let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
            Ok(Response::builder()
                .status(200)
                .header("content-length", bytes.to_string())
                .body(stream)
                .unwrap())
        }
        Behavior::ExtraBytes => {
            let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!";
            if let Some(s) = control.lock().unwrap().as_ref() {
                use std::io::Write;
                let mut s = s;
                let _ = s.write_all(raw);
            }
            // Never let hyper write its own response on this connection.
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// A body fed by a spawned producer.
fn async_stream<F, Fut>(produce: F) -> BoxBody
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    StreamBody::new(ChannelStream(rx)).boxed()
}

struct ChannelStream(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl futures_core::Stream for ChannelStream {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

// ---------------------------------------------------------------------------
// Topologies
// ---------------------------------------------------------------------------

/// A map splitting the ring evenly over `partitions` (primary, replicas).
/// Two partitions, each a primary and a replica, on fixed loopback addresses
/// no proxy dials (127.0.0.10/.11 and .20/.21, port 9000): the control plane's
/// test cluster.
/// Coordinator flags for failure detection in clusters whose agents beat every
/// 0.2 s: a timeout of ten intervals, so a loaded machine stalling an agent does
/// not fail over a node the test keeps alive, and a quick sweep.
pub(crate) const DETECTION_FLAGS: [&str; 4] =
    ["--heartbeat-timeout", "2", "--sweep-interval", "0.1"];

pub(crate) fn two_partition_map(epoch: u64) -> String {
    let a = |s: &str| s.parse().unwrap();
    topology(
        epoch,
        &[
            (a("127.0.0.10:9000"), vec![a("127.0.0.11:9000")]),
            (a("127.0.0.20:9000"), vec![a("127.0.0.21:9000")]),
        ],
    )
}

pub(crate) fn topology(epoch: u64, partitions: &[(SocketAddr, Vec<SocketAddr>)]) -> String {
    let n = partitions.len() as u64;
    let span = (1u64 << 32) / n;
    let parts: Vec<_> = partitions
        .iter()
        .enumerate()
        .map(|(i, (primary, replicas))| {
            let start = span * i as u64;
            let end = if i as u64 == n - 1 {
                u32::MAX as u64
            } else {
                start + span - 1
            };
            serde_json::json!({
                "partitionIndex": i,
                "primaryNodeIp": primary.to_string(),
                "replicaNodeIps": replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "hashRangeStart": format!("{start:08x}"),
                "hashRangeEnd": format!("{end:08x}"),
            })
        })
        .collect();
    serde_json::json!({
        "clusterEpoch": epoch,
        "masterNodeId": "test-coordinator",
        "partitionCount": partitions.len(),
        "partitions": parts,
    })
    .to_string()
}

/// The SPEC §2 example map (epoch 10294).
pub(crate) const SPEC_EXAMPLE: &str = include_str!("../fixtures/spec_example.json");

/// One broken variant of a valid map per validation rule of SPEC §2:
/// (rule, map text, a fragment the error message must contain).
pub(crate) fn invalid_maps(valid: &str) -> Vec<(&'static str, String, &'static str)> {
    let base: serde_json::Value = serde_json::from_str(valid).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        f(&mut v);
        v.to_string()
    };
    vec![
        (
            "count mismatch",
            edit(&|v| v["partitionCount"] = 4.into()),
            "partitionCount is 4 but 3 partitions are listed",
        ),
        (
            "duplicate index",
            edit(&|v| v["partitions"][2]["partitionIndex"] = 1.into()),
            "partition 1: partitionIndex is used by more than one partition",
        ),
        (
            "gap",
            edit(&|v| v["partitions"][1]["hashRangeStart"] = "55555557".into()),
            "partition 1: range starts at 55555557, leaving 55555556..55555556 uncovered",
        ),
        (
            "overlap",
            edit(&|v| v["partitions"][1]["hashRangeStart"] = "55555550".into()),
            "partition 1: range 55555550..aaaaaaaa overlaps partition 0",
        ),
        (
            "does not start at zero",
            edit(&|v| v["partitions"][0]["hashRangeStart"] = "00000010".into()),
            "partition 0: range starts at 00000010, leaving 00000000..0000000f uncovered",
        ),
        (
            "does not reach ffffffff",
            edit(&|v| v["partitions"][2]["hashRangeEnd"] = "fffffff0".into()),
            "partition 2: the last range ends at fffffff0, leaving fffffff1..ffffffff uncovered",
        ),
        (
            "bound not 8 hex digits",
            edit(&|v| v["partitions"][1]["hashRangeEnd"] = "aaaaaaa".into()),
            "partition 1: hashRangeEnd \"aaaaaaa\" is not 8 hex digits",
        ),
        (
            "inverted range",
            edit(&|v| v["partitions"][1]["hashRangeEnd"] = "55555555".into()),
            "partition 1: hashRangeStart 55555556 is above hashRangeEnd 55555555",
        ),
        (
            "missing primary",
            edit(&|v| v["partitions"][0]["primaryNodeIp"] = "".into()),
            "partition 0: primaryNodeIp: address is empty",
        ),
        (
            "unparseable primary",
            edit(&|v| v["partitions"][2]["primaryNodeIp"] = "db-3.internal".into()),
            "partition 2: primaryNodeIp: \"db-3.internal\" is not an IP address",
        ),
        (
            "unparseable replica",
            edit(&|v| v["partitions"][0]["replicaNodeIps"][1] = "10.0.1.999".into()),
            "partition 0: replicaNodeIps[1]",
        ),
        (
            "node listed twice",
            edit(&|v| v["partitions"][1]["replicaNodeIps"] = serde_json::json!(["10.0.2.5"])),
            "partition 1: node 10.0.2.5 is listed more than once",
        ),
        (
            "no partitions",
            edit(&|v| {
                v["partitions"] = serde_json::json!([]);
                v["partitionCount"] = 0.into();
            }),
            "no partitions",
        ),
        (
            "required field missing",
            edit(&|v| {
                v.as_object_mut().unwrap().remove("clusterEpoch");
            }),
            "missing field `clusterEpoch`",
        ),
        (
            "not JSON",
            "{\"clusterEpoch\": ".to_owned(),
            "not a topology document",
        ),
    ]
}

// ---------------------------------------------------------------------------
// Proxies
// ---------------------------------------------------------------------------

/// A proxy running inside the test process.
pub(crate) struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub running: Option<shardgate::proxy::RunningProxy>,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Start with `topology_json` and extra TOML appended to a loopback base config.
    pub(crate) async fn start(topology_json: &str, extra_toml: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("topology.json");
        std::fs::write(&topo, topology_json).unwrap();
        let text = base_config(&topo, extra_toml);
        let config =
            shardgate::config::ProxyConfig::from_toml(&text, "test.toml", &Default::default())
                .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let running = shardgate::proxy::start(config).await.unwrap();
        TestProxy {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) fn topology_path(&self) -> PathBuf {
        self.dir.path().join("topology.json")
    }

    pub(crate) fn proxy(&self) -> &Arc<shardgate::proxy::Proxy> {
        &self.running.as_ref().unwrap().proxy
    }

    pub(crate) async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A loopback config: ephemeral ports, the given topology file, then `extra`.
pub(crate) fn base_config(topology: &Path, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [topology]\nsources = [{:?}]\n",
        topology.display().to_string()
    );
    // Later sections in `extra` may repeat a table; merge by re-parsing.
    if !extra.is_empty() {
        let mut base: toml::Table = text.parse().unwrap();
        let add: toml::Table = extra.parse().unwrap();
        for (k, v) in add {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(a)) => b.extend(a),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
        text = toml::to_string(&base).unwrap();
    }
    text
}

/// Append every line from `lines` to a shared string until EOF.
fn collect_lines<R>(
    mut lines: tokio::io::Lines<R>,
) -> (Arc<Mutex<String>>, tokio::task::JoinHandle<()>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut t = t.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    (text, reader)
}

/// The real `shardgate` binary, started with `args`.
pub(crate) struct BinProxy {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shardgate"))
}

impl BinProxy {
    /// Spawn `shardgate proxy <args>` and wait for its listening line.
    pub(crate) async fn spawn(args: &[&str]) -> BinProxy {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.arg("proxy").args(args);
        BinProxy::spawn_cmd(cmd).await
    }

    pub(crate) async fn spawn_cmd(mut cmd: tokio::process::Command) -> BinProxy {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (log, _) = collect_lines(BufReader::new(stderr).lines());
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("proxy did not announce its ports in time")
            .unwrap()
            .unwrap_or_else(|| panic!("proxy exited early: {}", log.lock().unwrap()));
        // "shardgate proxy listening on ADDR admin ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[4].parse().unwrap();
        let admin = words[6].parse().unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        BinProxy {
            child,
            addr,
            admin,
            stderr: log,
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait (at most 10 s) for the proxy to exit, and check it exited 0.
    pub(crate) async fn exits_zero(&mut self) {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the proxy did not exit within 10 s")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.stderr());
    }

    /// Peak resident memory so far, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

/// A process started from the real binary whose stderr is collected.
pub(crate) struct BinProcess {
    pub child: tokio::process::Child,
    pub stderr: Arc<Mutex<String>>,
    /// Everything printed to stdout after the first line.
    pub stdout: Arc<Mutex<String>>,
    pub first_line: String,
    /// The tasks copying stdout and stderr; they end at the process's EOF.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl BinProcess {
    /// Spawn `shardgate <args>`; with `wait_for_line`, wait for its first stdout line.
    pub(crate) async fn spawn(args: &[&str], wait_for_line: bool) -> BinProcess {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (log, stderr_reader) = collect_lines(BufReader::new(stderr).lines());
        let mut lines = BufReader::new(stdout).lines();
        let first_line = if wait_for_line {
            tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("no readiness line in time")
                .unwrap()
                .unwrap_or_else(|| panic!("{args:?} exited early: {}", log.lock().unwrap()))
        } else {
            String::new()
        };
        let (out, stdout_reader) = collect_lines(lines);
        BinProcess {
            child,
            stderr: log,
            stdout: out,
            first_line,
            readers: vec![stderr_reader, stdout_reader],
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Kill (SIGKILL) and reap.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Wait for exit; afterwards `stderr()` and `stdout` hold everything it printed.
    pub(crate) async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let readers = std::mem::take(&mut self.readers);
        tokio::time::timeout(within, async {
            let status = self.child.wait().await.unwrap();
            for r in readers {
                let _ = r.await;
            }
            status.code()
        })
        .await
        .expect("process did not exit in time")
    }
}

/// `shardgate coordinator` from the real binary.
pub(crate) struct BinCoordinator {
    pub proc: BinProcess,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl BinCoordinator {
    pub(crate) async fn spawn(args: &[&str]) -> BinCoordinator {
        let mut all = vec!["coordinator"];
        for flag in ["--http-listen", "--grpc-listen"] {
            if !args.contains(&flag) {
                all.extend([flag, "127.0.0.1:0"]);
            }
        }
        all.extend_from_slice(args);
        let proc = BinProcess::spawn(&all, true).await;
        // "shardgate coordinator listening on http ADDR grpc ADDR"
        let w: Vec<&str> = proc.first_line.split_whitespace().collect();
        let http = w[5].parse().unwrap();
        let grpc = w[7].parse().unwrap();
        BinCoordinator { proc, http, grpc }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub(crate) async fn get_json(&self, path: &str) -> serde_json::Value {
        let a = send(
            &client(),
            Request::get(self.url(path)).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        a.json()
    }

    pub(crate) async fn epoch(&self) -> u64 {
        self.get_json("/v1/cluster/topology").await["clusterEpoch"]
            .as_u64()
            .unwrap()
    }

    /// The node's entry in /v1/cluster/nodes.
    pub(crate) async fn node(&self, id: &str) -> Option<serde_json::Value> {
        let v = self.get_json("/v1/cluster/nodes").await;
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
    }

    pub(crate) async fn grpc_client(
        &self,
    ) -> shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient<
        tonic::transport::Channel,
    > {
        shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient::connect(
            format!("http://{}", self.grpc),
        )
        .await
        .unwrap()
    }
}

/// Now, Unix milliseconds.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A heartbeat request as an agent would send it.
pub(crate) fn heartbeat_req(id: &str, ip: &str, ts: i64) -> shardgate::proto::HeartbeatRequest {
    shardgate::proto::HeartbeatRequest {
        node_id: id.into(),
        ip_address: ip.into(),
        epoch_timestamp_ms: ts,
        resource_status: Some(shardgate::proto::ResourceUsage {
            cpu_percent: 10.0,
            free_memory_bytes: 1 << 30,
            active_connections: 3,
        }),
    }
}

/// Spawn `shardgate agent` for a node.
pub(crate) async fn spawn_agent(
    grpc: SocketAddr,
    id: &str,
    ip: &str,
    interval: &str,
    extra: &[&str],
) -> BinProcess {
    let grpc = grpc.to_string();
    let mut args = vec![
        "agent",
        "--coordinator",
        &grpc,
        "--node-id",
        id,
        "--ip",
        ip,
        "--interval",
        interval,
    ];
    args.extend_from_slice(extra);
    BinProcess::spawn(&args, false).await
}

/// A coordinator stand-in that serves whatever map a test sets, so the
/// proxy's watcher can be driven exactly. A watch (`waitForEpochAbove=N`) is
/// answered at once when the map's epoch is above N, else when the test
/// publishes a map (whatever its epoch: a coordinator gone wrong) or after 30 s.
pub(crate) struct FakeCoordinator {
    pub addr: SocketAddr,
    state: Arc<Mutex<(String, u64)>>,
    published: tokio::sync::watch::Sender<u64>,
    pub requests: Arc<AtomicU64>,
    task: AbortHandle,
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCoordinator {
    pub(crate) async fn start(map: &str) -> FakeCoordinator {
        FakeCoordinator::with_watch_hold(map, Duration::from_secs(30)).await
    }

    /// Watches are held at most `hold`, then answered with the current map.
    pub(crate) async fn with_watch_hold(map: &str, hold: Duration) -> FakeCoordinator {
        let epoch = epoch_of(map);
        let state = Arc::new(Mutex::new((map.to_owned(), epoch)));
        let (published, _) = tokio::sync::watch::channel(epoch);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let (st, tx, n) = (state.clone(), published.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, tx, n) = (st.clone(), tx.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (st, tx, n) = (st.clone(), tx.clone(), n.clone());
                        async move {
                            n.fetch_add(1, Ordering::SeqCst);
                            let wait = req.uri().query().and_then(|q| {
                                q.strip_prefix("waitForEpochAbove=")
                                    .and_then(|v| v.parse::<u64>().ok())
                            });
                            if let Some(above) = wait {
                                let mut rx = tx.subscribe();
                                let current = st.lock().unwrap().1;
                                if current <= above {
                                    let _ = tokio::time::timeout(hold, rx.changed()).await;
                                }
                            }
                            let body = st.lock().unwrap().0.clone();
                            Ok::<_, Infallible>(Response::new(full(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
        .abort_handle();
        FakeCoordinator {
            addr,
            state,
            published,
            requests,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serve `map` and answer every waiting watch with it.
    pub(crate) fn publish(&self, map: &str) {
        let epoch = epoch_of(map);
        *self.state.lock().unwrap() = (map.to_owned(), epoch);
        self.published.send_modify(|generation| *generation += 1);
    }

    /// Serve `map` to plain fetches only; watches keep waiting.
    pub(crate) fn set_silently(&self, map: &str) {
        let epoch = epoch_of(map);
        *self.state.lock().unwrap() = (map.to_owned(), epoch);
    }
}

fn epoch_of(map: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(map)
        .ok()
        .and_then(|v| v["clusterEpoch"].as_u64())
        .unwrap_or(0)
}

/// The value of an unlabelled or fully written metric line on an admin listener.
pub(crate) async fn metric(admin: SocketAddr, line_prefix: &str) -> f64 {
    let text = admin_get(admin, "/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// A fresh, empty database on the throwaway server `scripts/test` started.
pub(crate) async fn pg_database() -> String {
    let admin = std::env::var("SHARDGATE_TEST_PG").expect(
        "SHARDGATE_TEST_PG is not set: run scripts/test, which starts a throwaway PostgreSQL",
    );
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("cannot reach the test PostgreSQL");
    tokio::spawn(conn);
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        unix_ms() % 1_000_000
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// A connected client for `url`.
pub(crate) async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// A pooled HTTP/1.1 test client.
pub(crate) fn client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// An HTTP/2 prior-knowledge test client.
pub(crate) fn h2_client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub(crate) fn empty() -> BoxBody {
    Full::new(Bytes::new())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

pub(crate) fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A response read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert this is a proxy error with the SPEC shape and `code`.
    pub(crate) fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.header("x-shardgate-error"), Some(code));
        let v = self.json();
        assert_eq!(v["error"], code);
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(v.get("partition").is_some(), "partition field present");
        if status == 503 {
            assert!(
                self.header("retry-after").is_some(),
                "503 carries Retry-After"
            );
        }
    }
}

pub(crate) async fn send(client: &Client<HttpConnector, BoxBody>, req: Request<BoxBody>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET `url` with an `x-shard-key` header.
pub(crate) async fn get_key(
    client: &Client<HttpConnector, BoxBody>,
    url: &str,
    key: &str,
) -> Answer {
    send(
        client,
        Request::get(url)
            .header("x-shard-key", key)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// A request with a key header.
/// Start `n` GETs of `key` at `url` and leave them in flight (for an upstream
/// told to hang); abort the returned handles to end them.
pub(crate) fn requests_in_flight(url: &str, key: &str, n: usize) -> Vec<tokio::task::AbortHandle> {
    (0..n)
        .map(|_| {
            let req = keyed("GET", url, key, "");
            tokio::spawn(async move { client().request(req).await }).abort_handle()
        })
        .collect()
}

pub(crate) fn keyed(
    method: &str,
    url: &str,
    key: &str,
    body: impl Into<Bytes>,
) -> Request<BoxBody> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("x-shard-key", key)
        .body(full(body))
        .unwrap()
}

/// GET a path on an admin listener.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> Answer {
    send(
        &client(),
        Request::get(format!("http://{admin}{path}"))
            .body(empty())
            .unwrap(),
    )
    .await
}

/// Poll `cond` every few milliseconds until it holds or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Make `path` a FIFO (replacing any file there): opening or reading it
/// blocks until the test opens the other end, as a file on a hung network
/// mount would.
pub(crate) fn make_fifo(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", path.display()),
    }
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
}

/// Raw bytes over a fresh TCP connection; returns everything read until close or `within`.
pub(crate) async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    out
}

/// A key whose hash lands in partition `index` of an even `n`-way split.
pub(crate) fn key_for_partition(index: usize, n: usize) -> String {
    let span = (1u64 << 32) / n as u64;
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let pos = u64::from(shardgate::topology::key_position(k.as_bytes()));
            let p = ((pos / span) as usize).min(n - 1);
            p == index
        })
        .unwrap()
}
