//! The floor of our stack: the least a proxy built on hyper 1 and tokio can
//! spend per request doing `benches/compare.py`'s job.
//!
//! It does what nginx and HAProxy are configured to do there and nothing
//! more: hyper's HTTP/1.1 server on one current-thread runtime, the
//! `x-shard-key` header hashed (XXH3-64, high 32 bits) onto one of the
//! upstreams, `X-Forwarded-For`/`X-Forwarded-Proto` added, the request sent
//! over a pooled keep-alive hyper HTTP/1.1 client connection, the response
//! streamed back. No map, no timeouts, no retries, no breakers, no metrics,
//! no error bodies: every cost shardgate adds on top of the stack is absent,
//! so its CPU per request bounds what any proxy on this stack can reach.
//! `compare.py --floor` runs it beside the peers.
//!
//! Build: `cargo build --release --example floor_proxy`, or profile-guided
//! as shardgate ships: `python3 benches/floor_pgo.py`.
//! Run: `floor_proxy [--h2] LISTEN UPSTREAM...` (socket addresses; `--h2`
//! serves clear-text HTTP/2 with prior knowledge instead of HTTP/1.1, for
//! `compare.py --h2`).

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const SHARD_KEY: HeaderName = HeaderName::from_static("x-shard-key");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Idle client connections per upstream. The runtime is single-threaded, so
/// the pool needs no lock.
struct Pools {
    upstreams: Vec<SocketAddr>,
    idle: Vec<RefCell<Vec<SendRequest<Incoming>>>>,
}

impl Pools {
    async fn checkout(&self, i: usize) -> Result<SendRequest<Incoming>, Error> {
        loop {
            // The borrow must end before the await below: other requests
            // return connections to this pool meanwhile.
            let Some(mut sender) = self.idle[i].borrow_mut().pop() else {
                break;
            };
            // Ready unless the end of its last response is still being read
            // (wait for it) or the upstream closed it (drop it).
            if sender.is_ready() {
                return Ok(sender);
            }
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = TcpStream::connect(self.upstreams[i]).await?;
        stream.set_nodelay(true)?;
        // One flat buffer per message (hyper's `writev(false)`, as shardgate
        // writes): ~560 fewer instructions per request than vectored writes
        // of small messages.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::task::spawn_local(conn);
        Ok(sender)
    }
}

type Error = Box<dyn std::error::Error>;

/// The upstream's response body; when it is dropped (read to its end, or
/// the client went away) its connection goes back to the pool.
struct Pooled {
    body: Incoming,
    sender: Option<SendRequest<Incoming>>,
    home: Rc<Pools>,
    upstream: usize,
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.home.idle[self.upstream].borrow_mut().push(sender);
        }
    }
}

type Answer = Response<http_body_util::Either<Pooled, http_body_util::Empty<Bytes>>>;

async fn forward(
    mut req: Request<Incoming>,
    pools: Rc<Pools>,
    client: HeaderValue,
) -> Result<Answer, Infallible> {
    let key = req
        .headers()
        .get(SHARD_KEY)
        .map_or(&b""[..], |v| v.as_bytes());
    let hash = xxhash_rust::xxh3::xxh3_64(key) >> 32;
    // Equal hash ranges, as the bench's topology gives every proxy.
    let upstream = ((hash * pools.upstreams.len() as u64) >> 32) as usize;
    let headers = req.headers_mut();
    headers.append(FORWARDED_FOR, client);
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
    if req.version() == http::Version::HTTP_2 {
        // HTTP/1.1 to the upstream: the authority becomes Host, the target
        // its origin form.
        let uri = std::mem::take(req.uri_mut());
        if let Some(host) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
        *req.uri_mut() = uri
            .path_and_query()
            .map_or(http::Uri::from_static("/"), |p| http::Uri::from(p.clone()));
        *req.version_mut() = http::Version::HTTP_11;
    }
    let answer = async {
        let mut sender = pools.checkout(upstream).await?;
        let response = sender.send_request(req).await?;
        Ok::<_, Error>(response.map(|body| {
            http_body_util::Either::Left(Pooled {
                body,
                sender: Some(sender),
                home: pools.clone(),
                upstream,
            })
        }))
    };
    Ok(answer.await.unwrap_or_else(|e| {
        eprintln!("floor_proxy: upstream {upstream}: {e}");
        let mut bad = Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
        *bad.status_mut() = http::StatusCode::BAD_GATEWAY;
        bad
    }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: floor_proxy [--h2] LISTEN UPSTREAM...";
    let h2 = args.next_if(|a| a == "--h2").is_some();
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstreams = args
        .map(|a| a.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    if upstreams.is_empty() {
        return Err(usage.into());
    }
    let pools = Rc::new(Pools {
        idle: upstreams.iter().map(|_| RefCell::new(Vec::new())).collect(),
        upstreams,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, serve(listen, pools, h2))
}

/// Runs HTTP/2 streams as tasks on this thread: the service is not `Send`.
#[derive(Clone, Copy)]
struct Local;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for Local {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

async fn serve(
    listen: SocketAddr,
    pools: Rc<Pools>,
    h2: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(listen).await?;
    // Returning from main on SIGTERM lets a profile-generating build write
    // its profile (benches/floor_pgo.py).
    let mut term = signal(SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = term.recv() => return Ok(()),
        };
        stream.set_nodelay(true)?;
        let client = HeaderValue::from_str(&peer.ip().to_string())?;
        let pools = pools.clone();
        let service =
            hyper::service::service_fn(move |req| forward(req, pools.clone(), client.clone()));
        let io = TokioIo::new(stream);
        if h2 {
            tokio::task::spawn_local(
                hyper::server::conn::http2::Builder::new(Local).serve_connection(io, service),
            );
        } else {
            tokio::task::spawn_local(
                hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(io, service),
            );
        }
    }
}
