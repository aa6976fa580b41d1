//! A TCP relay for fault injection: it sits on one link (agent →
//! coordinator, proxy → coordinator, proxy → node, node → node) and can cut
//! it, black-hole it or delay it, without killing either side.
//!
//! - `Pass`: bytes flow both ways.
//! - `Cut`: open connections are closed and new ones are accepted and reset
//!   at once (a peer that is down, or a firewall that rejects).
//! - `BlackHole`: open connections stay open but nothing crosses, and new
//!   ones are accepted and never answered (a partition that drops packets:
//!   the peer finds out only by its own timeouts).
//! - `Delay(d)`: every chunk is held `d` before it crosses (a slow link).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does to the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    Pass,
    Cut,
    BlackHole,
    Delay(Duration),
}

/// One link's relay; dropping it stops it and closes every connection.
pub(crate) struct Relay {
    /// Where the dialling side connects instead of the target.
    pub(crate) addr: SocketAddr,
    mode: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to `target`, passing bytes.
    pub(crate) async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watcher) = watch::channel(Link::Pass);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let watcher = watcher.clone();
                tokio::spawn(carry(client, target, watcher));
            }
        });
        Relay { addr, mode, task }
    }

    /// Change what happens to the link, for open connections and new ones.
    pub(crate) fn set(&self, link: Link) {
        self.mode.send_replace(link);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(Link::Cut);
    }
}

/// Reset `s` rather than close it politely.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn carry(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Link>) {
    let now = *mode.borrow_and_update();
    match now {
        Link::Cut => return reset(client),
        Link::BlackHole => {
            // Hold it, answer nothing, until the link changes; then drop it
            // (the dialler has long since given up or will see the reset).
            let _ = mode.changed().await;
            return reset(client);
        }
        Link::Pass | Link::Delay(_) => {}
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, mode.clone()));
    let down = tokio::spawn(pump(sr, cw, mode));
    let _ = tokio::join!(up, down);
}

/// Copy one direction, following the link's mode chunk by chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            r = mode.changed() => {
                // Dropping both halves closes both connections.
                if r.is_err() || *mode.borrow() == Link::Cut {
                    return;
                }
                continue;
            }
        };
        // Hold the chunk while the link is black-holed; drop everything if
        // it is cut meanwhile.
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Link::Pass => break,
                Link::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Link::Cut => return,
                Link::BlackHole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
