//! Hitless binary upgrade on SIGUSR2, after nginx's binary upgrade and
//! HAProxy's `-x`.
//!
//! The running proxy starts the binary at the path it was itself started
//! from, with the same arguments, and hands it both listening sockets. The
//! successor serves from those very sockets, so no connection is refused: the
//! kernel's accept queue never closes. Only once the successor says it is
//! serving does the old process stop accepting and drain (see `listener` for
//! how it lets keep-alive clients go without a race). A successor that exits,
//! or is not serving in time, is stopped, and the old process carries on.
//!
//! The sockets travel with `SCM_RIGHTS` over a socket pair whose other end is
//! the successor's stdin: that is how a process takes over a descriptor it was
//! given without `unsafe` (it duplicates fd 0, which std lets it name safely).
//! The successor answers `ready` on the same pair once it serves.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Set in the successor's environment: its listeners come on stdin.
const INHERIT: &str = "SHARDGATE_LISTENERS";
/// What the predecessor sends with the descriptors (client, then admin).
const HELLO: &[u8] = b"shardgate-listeners/1 client admin";
/// What the successor answers once it serves.
const READY: &[u8] = b"ready\n";
/// How long a successor may take to receive its listeners.
const RECEIVE_WITHIN: Duration = Duration::from_secs(10);

/// Why an upgrade did not happen (the old process keeps serving), or why a
/// successor could not take over its predecessor's listeners (it exits 2).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The new binary could not be started at all.
    #[error("cannot start {exe}: {source}")]
    Spawn {
        /// The path tried.
        exe: String,
        /// Why.
        source: io::Error,
    },
    /// It exited before it served.
    #[error("the new binary exited with {0} before it served; see its output above")]
    Exited(ExitStatus),
    /// It did not say it served in time.
    #[error("the new binary did not serve within {0:?}; it was stopped")]
    NotReady(Duration),
    /// The listeners could not be passed or received.
    #[error("handing the listeners over: {0}")]
    Handover(#[from] io::Error),
    /// What came on stdin was not a predecessor's listeners.
    #[error("inherited listeners: {0}")]
    Malformed(&'static str),
}

/// How to start this process again: the same binary path and arguments.
#[derive(Clone, Debug)]
pub(super) struct Launch {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Launch {
    /// This process's own command line.
    ///
    /// `argv[0]` as given when it names a path: an operator who installs the
    /// new binary by renaming it over the old one, or by switching a symlink,
    /// means that path, not the file this process was loaded from
    /// (`/proc/self/exe`, which is what a bare command name falls back to).
    pub(super) fn of_this_process() -> io::Result<Launch> {
        let mut argv = std::env::args_os();
        let argv0 = argv.next().map(PathBuf::from);
        let exe = match argv0 {
            Some(p) if p.components().count() > 1 => std::path::absolute(p)?,
            _ => std::env::current_exe()?,
        };
        Ok(Launch {
            exe,
            args: argv.collect(),
        })
    }

    /// The binary to start.
    pub(super) fn exe(&self) -> &std::path::Path {
        &self.exe
    }
}

/// The listening sockets, as a predecessor handed them over.
#[derive(Debug)]
pub(super) struct Listeners {
    /// The client listener.
    pub(super) client: std::net::TcpListener,
    /// The admin listener.
    pub(super) admin: std::net::TcpListener,
}

/// A successor's side: the listeners received, and the way to say it serves.
#[derive(Debug)]
pub(super) struct Inherited {
    listeners: Option<Listeners>,
    channel: UnixStream,
}

impl Inherited {
    /// The listeners, if this process was started by a predecessor's
    /// upgrade; `None` for an ordinary start.
    pub(super) fn from_predecessor() -> Result<Option<Inherited>, UpgradeError> {
        if std::env::var_os(INHERIT).is_none_or(|v| v != "stdin") {
            return Ok(None);
        }
        let channel = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        channel.set_read_timeout(Some(RECEIVE_WITHIN))?;
        let mut hello = [0u8; 64];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            &channel,
            &mut [IoSliceMut::new(&mut hello)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let fds: Vec<OwnedFd> = control
            .drain()
            .flat_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                _ => Vec::new(),
            })
            .collect();
        if hello.get(..got.bytes) != Some(HELLO) {
            return Err(UpgradeError::Malformed(
                "stdin did not carry shardgate's listeners",
            ));
        }
        let [client, admin]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| UpgradeError::Malformed("expected exactly two sockets"))?;
        let listener = |fd: OwnedFd| -> Result<std::net::TcpListener, UpgradeError> {
            let l = std::net::TcpListener::from(fd);
            // A descriptor that is not a bound TCP socket fails here, not at
            // the first accept.
            l.local_addr()?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        Ok(Some(Inherited {
            listeners: Some(Listeners {
                client: listener(client)?,
                admin: listener(admin)?,
            }),
            channel,
        }))
    }

    /// The listeners, once.
    pub(super) fn take_listeners(&mut self) -> Option<Listeners> {
        self.listeners.take()
    }

    /// Tell the predecessor this process serves: it stops accepting and drains.
    pub(super) fn serving(self) -> io::Result<()> {
        (&self.channel).write_all(READY)
    }
}

/// Start `launch` with `client` and `admin` and wait until it serves.
///
/// Returns the successor's PID. On any failure the successor is stopped and
/// waited for, and nothing of this process has changed.
pub(super) async fn hand_over(
    launch: &Launch,
    client: BorrowedFd<'_>,
    admin: BorrowedFd<'_>,
    within: Duration,
) -> Result<u32, UpgradeError> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut child = tokio::process::Command::new(&launch.exe)
        .args(&launch.args)
        .env(INHERIT, "stdin")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: launch.exe.display().to_string(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let handshake = async {
        let fds = [client, admin];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        // A few dozen bytes into an empty socket buffer: this does not block.
        sendmsg(
            &ours,
            &[IoSlice::new(HELLO)],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(io::Error::from)?;
        ours.set_nonblocking(true)?;
        let mut ours = tokio::net::UnixStream::from_std(ours)?;
        let mut answer = [0u8; READY.len()];
        ours.read_exact(&mut answer).await?;
        if answer == READY {
            Ok(())
        } else {
            Err(UpgradeError::Malformed(
                "the new binary answered something else",
            ))
        }
    };
    let outcome = tokio::select! {
        done = tokio::time::timeout(within, handshake) => match done {
            Ok(Ok(())) => return Ok(pid),
            Ok(Err(e)) => e,
            Err(_) => UpgradeError::NotReady(within),
        },
        status = child.wait() => match status {
            Ok(status) => UpgradeError::Exited(status),
            Err(e) => UpgradeError::Handover(e),
        },
    };
    // A successor that exited broke the pipe or closed the channel; its exit
    // status says more than that.
    let outcome = match (outcome, child.try_wait()) {
        (UpgradeError::Handover(_), Ok(Some(status))) => UpgradeError::Exited(status),
        (UpgradeError::Handover(_), Ok(None)) => {
            match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(Ok(status)) => UpgradeError::Exited(status),
                _ => UpgradeError::Malformed("the new binary closed the handover channel"),
            }
        }
        (e, _) => e,
    };
    stop(&mut child).await;
    Err(outcome)
}

/// Stop a successor that will not take over, by its PID (our own child).
async fn stop(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Tell systemd (`Type=notify`, `NotifyAccess=all`) that this process is
/// the service and is ready: after an upgrade that moves the main PID to
/// the successor. Nothing happens outside systemd.
pub(super) fn notify_systemd_ready() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
    ]);
}

/// Tell systemd the service is stopping (a real stop, not a handover).
pub(super) fn notify_systemd_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}
