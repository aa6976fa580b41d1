//! Upstream servers for tests: real HTTP/1.1 listeners on 127.0.0.1 that
//! record every request and misbehave on demand (reset, hang, drip, stall,
//! refuse connections, write garbage).

use super::client::BoxBody;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

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

/// A bare TCP upstream that answers every request as soon as its head has
/// arrived and never reads its body — a node refusing an upload at once (a
/// 401 or 413), or nginx's `return 200`. Its connections stay open, unread,
/// until it is dropped.
pub(crate) struct EarlyAnswer {
    pub(crate) addr: SocketAddr,
    heads: Arc<AtomicU64>,
    task: AbortHandle,
}

impl Drop for EarlyAnswer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EarlyAnswer {
    /// Answer `status` (e.g. "413 Payload Too Large") with a two-byte body.
    pub(crate) async fn start(status: &'static str) -> EarlyAnswer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(AtomicU64::new(0));
        let counted = heads.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = counted.clone();
                held.push(tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nno");
                    let _ = s.write_all(answer.as_bytes()).await;
                    // Hold the connection, reading nothing more.
                    std::future::pending::<()>().await;
                }));
            }
        })
        .abort_handle();
        EarlyAnswer { addr, heads, task }
    }

    /// Request heads received so far.
    pub(crate) fn heads(&self) -> u64 {
        self.heads.load(Ordering::SeqCst)
    }
}
