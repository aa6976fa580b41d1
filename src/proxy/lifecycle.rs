//! Start, reload, drain: the proxy as a process.
//!
//! `start` binds both listeners, loads the first map and spawns the tasks;
//! `run` adds the signals (SIGHUP reloads, SIGTERM/SIGINT drain, SIGUSR2
//! hands the listeners to a new binary: `upgrade`).

use super::upgrade::{self, Inherited, Launch, Listeners, UpgradeError};
use super::{Proxy, ProxyConfig, TopologySource, admin, follow, listener, memory};
use crate::exit::{Exit, Failure};
use crate::server::{BindError, bind};
use crate::signals::{Signal, SignalError, Signals};
use crate::telemetry::{Metrics, names};
use crate::tls::{ALPN_H1, ALPN_H2_H1, Terminator, TlsError};
use crate::topology::{TopologyFileError, read_topology_file};
use crate::workers::Workers;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound (exit 2).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Signal handlers could not be installed (exit 2).
    #[error(transparent)]
    Signals(#[from] SignalError),
    /// The initial topology file is unusable (exit 1).
    #[error(transparent)]
    Topology(#[from] TopologyFileError),
    /// A TLS certificate, key or CA is unusable (exit 1).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The OTLP exporter could not be built from the configuration (exit 1).
    #[error(transparent)]
    Otlp(#[from] crate::telemetry::OtlpError),
    /// Started by an upgrade, but the predecessor's listeners did not
    /// arrive intact (exit 2; the predecessor keeps serving).
    #[error(transparent)]
    Inherit(#[from] UpgradeError),
}

impl Failure for StartError {
    fn exit(&self) -> Exit {
        match self {
            StartError::Topology(_) | StartError::Tls(_) | StartError::Otlp(_) => Exit::Invalid,
            StartError::Bind(_) | StartError::Signals(_) | StartError::Inherit(_) => Exit::Runtime,
        }
    }
}

/// Reads the config file again on SIGHUP, the command line's flags applied
/// (the config's own module does the reading: the data plane only asks).
pub type Reread =
    Arc<dyn Fn() -> Result<ProxyConfig, Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// A started proxy: its addresses and the handle to stop it.
pub struct RunningProxy {
    /// Shared state (tests read it; reloads go through it).
    pub proxy: Arc<Proxy>,
    /// The client-facing address actually bound.
    pub addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    /// What a reload replaces. Behind a lock so that a reload runs on a
    /// blocking thread: it reads files (which may sit on a slow or hung
    /// network mount) and parses and indexes maps of thousands of partitions,
    /// none of which may stall a thread that serves requests.
    reloadable: Arc<Mutex<Reloadable>>,
    /// Copies of the client and admin listening sockets, to hand to a
    /// successor binary; closed when this process stops accepting.
    sockets: Option<(OwnedFd, OwnedFd)>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The part of a running proxy that SIGHUP re-reads.
struct Reloadable {
    config: ProxyConfig,
    /// TLS on the client listener and the admin listener, if configured.
    tls: Option<Arc<Terminator>>,
    admin_tls: Option<Arc<Terminator>>,
}

/// Bind, load the initial map and start serving.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    start_with(config, None, Arc::new(Workers::none())).await
}

/// Start serving on `inherited` listeners (a binary upgrade's successor), or
/// on newly bound ones; client connections are served by `workers`.
async fn start_with(
    config: ProxyConfig,
    inherited: Option<Listeners>,
    workers: Arc<Workers>,
) -> Result<RunningProxy, StartError> {
    let ((listener, addr), (admin, admin_addr)) = match inherited {
        Some(l) => (adopt(l.client)?, adopt(l.admin)?),
        None => (
            bind(config.server.listen).await?,
            bind(config.server.admin_listen).await?,
        ),
    };
    let moved = |want: SocketAddr, have: SocketAddr| want.port() != 0 && want != have;
    if moved(config.server.listen, addr) || moved(config.server.admin_listen, admin_addr) {
        tracing::warn!(%addr, %admin_addr, "serving on the listeners inherited from the \
            previous binary; changed listen addresses take effect on a restart");
    }
    let sockets = Some((
        listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(UpgradeError::from)?,
        admin
            .as_fd()
            .try_clone_to_owned()
            .map_err(UpgradeError::from)?,
    ));
    let server = &config.server;
    let client_alpn = if server.http2 { ALPN_H2_H1 } else { ALPN_H1 };
    let tls = server
        .tls
        .as_ref()
        .map(|t| Terminator::new(t, client_alpn, server.tls_handshake_timeout))
        .transpose()?;
    let admin_tls = server
        .admin_tls
        .as_ref()
        .map(|t| Terminator::new(t, ALPN_H1, server.tls_handshake_timeout))
        .transpose()?;
    let registry = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let spans = match &config.otlp {
        Some(otlp) => {
            let (sink, task) =
                crate::telemetry::start_otlp(otlp, addr.to_string(), &registry, shutdown.clone())?;
            tasks.push(task);
            Some(sink)
        }
        None => None,
    };
    let proxy = Proxy::new(&config, registry, spans)?;
    let coordinators: Vec<http::Uri> = config
        .topology_sources
        .iter()
        .filter_map(|s| match s {
            TopologySource::Coordinator(u) => Some(u.clone()),
            TopologySource::File(_) => None,
        })
        .collect();
    for source in &config.topology_sources {
        if let TopologySource::File(path) = source {
            proxy.load_topology_file(path)?;
        }
    }
    if !coordinators.is_empty() {
        tasks.push(tokio::spawn(follow::follow_replication(
            proxy.live.clone(),
            coordinators.clone(),
            config.watch.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(follow::follow(
            proxy.live.clone(),
            coordinators,
            config.watch.clone(),
            shutdown.clone(),
        )));
        first_map_or_cache(&proxy, &config).await;
    }
    tasks.extend([
        tokio::spawn(listener::serve(
            proxy.clone(),
            listener,
            config.server.clone(),
            tls.clone(),
            workers,
            shutdown.clone(),
        )),
        tokio::spawn(admin::serve(
            proxy.clone(),
            admin,
            admin_tls.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(housekeeping(proxy.clone(), shutdown.clone())),
        tokio::spawn(memory::watch(
            proxy.pipeline.limit.clone(),
            proxy.registry.gauge(names::MEMORY_ALLOCATED, &[]),
            shutdown.clone(),
        )),
    ]);
    tracing::info!(%addr, %admin_addr, tls = tls.is_some(), "proxy listening");
    Ok(RunningProxy {
        proxy,
        addr,
        admin_addr,
        reloadable: Arc::new(Mutex::new(Reloadable {
            config,
            tls,
            admin_tls,
        })),
        sockets,
        shutdown,
        tasks,
    })
}

/// Wait (bounded) for a coordinator's first map; without one, serve the cache.
async fn first_map_or_cache(proxy: &Proxy, config: &ProxyConfig) {
    let until = Instant::now() + config.watch.startup_wait;
    if proxy.live.newer_than(0, until).await.is_some() {
        return;
    }
    match &config.watch.cache_file {
        Some(cache) if cache.exists() => match read_topology_file(cache) {
            Ok(map) => {
                tracing::warn!(cache = %cache.display(), epoch = map.epoch(),
                    "no coordinator answered; serving the cached map");
                proxy.live.offer(map, &format!("cache {}", cache.display()));
            }
            Err(e) => {
                tracing::error!("no coordinator answered and the cache is unusable: {e}");
            }
        },
        _ => {
            tracing::warn!("no coordinator answered yet; requests get 503 until one does");
        }
    }
}

/// Periodic chores off the request path: histogram upkeep and idle-pool eviction.
async fn housekeeping(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                proxy.registry.upkeep();
                if let Some(table) = proxy.table() {
                    for u in table.upstreams() {
                        u.pool().evict_expired();
                    }
                }
            }
        }
    }
}

impl RunningProxy {
    /// Re-read the config (with `reread`, when the proxy has a config
    /// file), the TLS certificates and the topology file on a blocking
    /// thread; an invalid config, certificate or map is refused whole and the
    /// old state kept. Established connections are untouched: new
    /// certificates apply to new handshakes.
    pub fn spawn_reload(&self, reread: Option<Reread>) -> JoinHandle<Result<(), ReloadError>> {
        let proxy = self.proxy.clone();
        let reloadable = self.reloadable.clone();
        tokio::task::spawn_blocking(move || {
            let mut state = reloadable.lock().unwrap_or_else(|e| e.into_inner());
            state.reload(&proxy, reread.as_deref())
        })
    }

    /// Stop accepting, drain in-flight requests up to the grace period, stop.
    pub async fn shutdown(mut self) {
        // Closed first, or the kernel would go on queueing connections that
        // nobody will accept until the drain ends.
        self.sockets = None;
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// A successor serves from the same sockets: stop accepting, let
    /// keep-alive clients go after their next answer, then drain as
    /// `shutdown` does.
    pub async fn hand_off(self) {
        self.proxy.pipeline.closing.store(true, Ordering::Release);
        self.shutdown().await;
    }

    /// Start the binary at this process's path on the same listeners, and
    /// wait until it serves (see `upgrade`).
    fn spawn_upgrade(
        &self,
        launch: Launch,
        within: Duration,
    ) -> Option<JoinHandle<Result<u32, UpgradeError>>> {
        let (client, admin) = self.sockets.as_ref()?;
        let client = client.try_clone().ok()?;
        let admin = admin.try_clone().ok()?;
        Some(tokio::spawn(async move {
            upgrade::hand_over(&launch, client.as_fd(), admin.as_fd(), within).await
        }))
    }
}

/// A listener inherited from the previous binary, on this runtime.
fn adopt(l: std::net::TcpListener) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let err = |e: std::io::Error| StartError::Inherit(e.into());
    let addr = l.local_addr().map_err(err)?;
    Ok((tokio::net::TcpListener::from_std(l).map_err(err)?, addr))
}

impl Reloadable {
    /// The reload itself; see [`RunningProxy::spawn_reload`].
    fn reload(
        &mut self,
        proxy: &Proxy,
        reread: Option<&(dyn Fn() -> Result<ProxyConfig, ConfigError> + Send + Sync)>,
    ) -> Result<(), ReloadError> {
        let new = reread
            .map(|r| r())
            .transpose()
            .map_err(ReloadError::Config)?;
        let server = new.as_ref().map_or(&self.config.server, |n| &n.server);
        // Certificates first: they are the part most likely to be refused, and
        // nothing else may change if they are.
        for (terminator, spec, what) in [
            (&self.tls, &server.tls, "client listener"),
            (&self.admin_tls, &server.admin_tls, "admin listener"),
        ] {
            match (terminator, spec) {
                (Some(t), Some(spec)) => t.reload(Some(spec)).map_err(ReloadError::Tls)?,
                (Some(_), None) | (None, Some(_)) => {
                    tracing::warn!(
                        "TLS on the {what} switched on or off; that takes effect on restart"
                    );
                }
                (None, None) => {}
            }
        }
        if let Some(new) = new {
            if new.server.listen != self.config.server.listen
                || new.server.admin_listen != self.config.server.admin_listen
                || new.server.http2 != self.config.server.http2
                || new.server.workers != self.config.server.workers
            {
                tracing::warn!("listener settings changed; they take effect on restart");
            }
            proxy.reconfigure(new.runtime.clone())?;
            self.config.runtime = new.runtime;
            self.config.topology_sources = new.topology_sources;
            self.config.server.tls = new.server.tls;
            self.config.server.admin_tls = new.server.admin_tls;
        }
        for source in &self.config.topology_sources {
            if let TopologySource::File(path) = source {
                proxy.load_topology_file(path)?;
            }
        }
        Ok(())
    }
}

/// Why a config file was refused (every problem, with its location).
type ConfigError = Box<dyn std::error::Error + Send + Sync>;

/// A reload that was refused; the old state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file is invalid.
    #[error("config refused:\n{0}")]
    Config(ConfigError),
    /// A TLS certificate, key or CA is unusable.
    #[error("TLS refused: {0}")]
    Tls(#[from] TlsError),
    /// The topology file is unusable.
    #[error("topology refused: {0}")]
    Topology(#[from] TopologyFileError),
}

/// The outcome of `job` once it ends; never, while there is none. The caller
/// replaces the finished handle.
async fn finished<T>(job: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match job {
        Some(j) => j.await,
        None => std::future::pending().await,
    }
}

/// Run until SIGTERM/SIGINT (drain, then return); SIGHUP reloads; SIGUSR2
/// upgrades to the binary at this process's path (then drain and return).
///
/// A reload still running at shutdown (say, stuck reading a file from a hung
/// mount) is left behind: the caller should not wait for blocking tasks when
/// it drops the runtime.
pub async fn run(
    config: ProxyConfig,
    reread: Option<Reread>,
    workers: Workers,
    ready: impl FnOnce(&RunningProxy),
) -> Result<(), StartError> {
    let mut signals = Signals::proxy()?;
    let mut inherited = Inherited::from_predecessor()?;
    // Taken now: the path an operator replaces is the one this process was
    // started from, whatever it points at by the time of the upgrade.
    let launch = Launch::of_this_process();
    // The successor must be serving within the time it may wait for a first
    // map, and then some.
    let upgrade_within = config.watch.startup_wait + Duration::from_secs(10);
    let listeners = inherited.as_mut().and_then(Inherited::take_listeners);
    let running = start_with(config, listeners, Arc::new(workers)).await?;
    ready(&running);
    if let Some(predecessor) = inherited
        && let Err(e) = predecessor.serving()
    {
        tracing::warn!("could not tell the previous binary that this one serves: {e}");
    }
    upgrade::notify_systemd_ready();
    // One reload at a time; SIGHUPs that arrive during one make one more.
    let mut reloading = None;
    let mut again = false;
    let mut upgrading = None;
    let handed_over = loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => break false,
                Signal::Reload if reloading.is_some() => again = true,
                Signal::Reload => {
                    reloading = Some(running.spawn_reload(reread.clone()));
                }
                Signal::Upgrade if upgrading.is_some() => {
                    tracing::warn!("an upgrade is already under way; SIGUSR2 ignored");
                }
                Signal::Upgrade => match &launch {
                    Ok(launch) => {
                        tracing::info!(exe = %launch.exe().display(), "upgrading: starting the new binary");
                        upgrading = running.spawn_upgrade(launch.clone(), upgrade_within);
                    }
                    Err(e) => tracing::error!("cannot upgrade: this process's path is unknown: {e}"),
                },
            },
            done = finished(&mut reloading) => {
                match done {
                    Ok(Ok(())) => tracing::info!("reload complete"),
                    Ok(Err(e)) => tracing::error!("reload refused, previous state kept: {e}"),
                    Err(e) => tracing::error!("reload failed, previous state kept: {e}"),
                }
                reloading = std::mem::take(&mut again)
                    .then(|| running.spawn_reload(reread.clone()));
            }
            done = finished(&mut upgrading) => {
                upgrading = None;
                match done {
                    Ok(Ok(pid)) => {
                        tracing::info!(successor = pid, "the new binary serves; this one stops accepting and drains");
                        break true;
                    }
                    Ok(Err(e)) => tracing::error!("upgrade failed, this binary keeps serving: {e}"),
                    Err(e) => tracing::error!("upgrade failed, this binary keeps serving: {e}"),
                }
            }
        }
    };
    if handed_over {
        running.hand_off().await;
    } else {
        tracing::info!("draining");
        upgrade::notify_systemd_stopping();
        running.shutdown().await;
    }
    Ok(())
}
