//! The `shardgate` binary: parse arguments, run a command, map the outcome to
//! an exit code (0 ok, 1 invalid input or config, 2 runtime failure).
//!
//! The command line (`cli`) and the demo cluster (`demo`) belong to the
//! binary; everything they run is the library's.

mod cli;
mod demo;
mod status;

use clap::Parser;
use cli::{Cli, Command};
use shardgate::config::{AgentFlags, ProxyConfig};
use shardgate::exit::{Exit, Failure};
use shardgate::signals::Signals;
use shardgate::telemetry::LogFormat;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

// jemalloc: glibc malloc cost 9% more proxy CPU per request (free-list
// consolidation); mimalloc 3 sends every Rust allocation through its aligned
// API, whose slow path hyper's two 8 KiB read buffers per request take (they
// are replaced, not reused, while the previous message still borrows them):
// 34,661 -> 33,877 instructions per request with jemalloc (benches/instructions.py).
// Built with background threads on (Cargo.toml): freed memory goes back to
// the system within jemalloc's decay time even when the process is idle
// after a burst, instead of waiting for allocations that never come.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Route(args) => done(cli::route(&args, &mut std::io::stdout().lock())),
        Command::CheckConfig(args) => done(cli::check_config(&args.file).map(|summary| {
            println!("{summary}");
        })),
        Command::Proxy(args) => run_proxy(&args),
        Command::Coordinator(args) => run_coordinator(&args),
        Command::Agent(args) => run_agent(&args.flags()),
        Command::Demo(args) => run_demo(&args),
        Command::Node(args) => run_node(&args.flags()),
        Command::Status(args) => run_status(&args),
        Command::CheckLine(args) => done(cli::check_command(&args.line).map(|summary| {
            println!("{summary}");
        })),
    }
}

/// The exit code for `failure`, after saying what it was in one line.
fn fail(command: &str, failure: &dyn Failure) -> ExitCode {
    eprintln!("shardgate {command}: {failure}");
    ExitCode::from(failure.exit() as u8)
}

/// Success, or the exit code for bad input (its message printed as is:
/// config errors are one problem per line).
fn done(r: Result<(), cli::InputError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(Exit::Invalid as u8)
        }
    }
}

/// Raise the open-file limit as far as allowed, and say so if that is still
/// short of the `wanted` descriptors the configured limits could use.
fn open_files_for(wanted: usize) {
    match shardgate::server::raise_open_files_limit() {
        Ok(have) if (have as usize) < wanted => tracing::warn!(
            open_files = have,
            wanted,
            "the open-file limit is below what the configured connection limits could use; \
             raise it (systemd LimitNOFILE, ulimit -Hn) or lower the limits"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// The async runtime, or the exit code after saying why it could not start.
///
/// One worker (asked for, or all the machine has) means one thread: a
/// current-thread runtime on the main thread, as nginx runs one worker (plus,
/// for a moment, a helper thread for blocking work such as a reload). Beyond
/// saving the work-stealing scheduler's cross-thread bookkeeping, a process with
/// a single thread lets the kernel skip reference-counting the file behind every
/// socket call, and measurably wakes its peers less often.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let single = match workers {
        0 => std::thread::available_parallelism().is_ok_and(|n| n.get() == 1),
        n => n == 1,
    };
    let mut b = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    if single {
        // Blocking helpers (reloads, cache writes) are rare; their thread
        // should not outlive them by long, or the process stays multi-threaded.
        b.thread_keep_alive(std::time::Duration::from_secs(1));
    }
    b.enable_all().build().map_err(|e| {
        eprintln!("cannot start the async runtime: {e}");
        ExitCode::from(Exit::Runtime as u8)
    })
}

fn run_proxy(args: &cli::ProxyArgs) -> ExitCode {
    let overrides = args.overrides();
    let config = match ProxyConfig::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => return done(Err(e.into())),
    };
    shardgate::telemetry::init_logging(&config.log.level, config.log.format);
    // Each client connection may take an upstream one too.
    open_files_for(config.runtime.limits.max_connections.saturating_mul(2));
    // The main thread's runtime accepts, follows the coordinators and
    // serves the admin listener; with more than one worker, connections are
    // served on worker threads with a runtime each (see `shardgate::workers`).
    let n = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let workers = if n > 1 {
        match shardgate::workers::Workers::start(n) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("cannot start the worker threads: {e}");
                return ExitCode::from(Exit::Runtime as u8);
            }
        }
    } else {
        shardgate::workers::Workers::none()
    };
    let reread: Option<shardgate::proxy::Reread> = args.config.clone().map(|path| {
        let reread: shardgate::proxy::Reread =
            Arc::new(move || ProxyConfig::load(Some(&path), &overrides).map_err(Into::into));
        reread
    });
    let result = rt.block_on(shardgate::proxy::run(config, reread, workers, |running| {
        // Tests and scripts wait for this line to learn the bound ports.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "shardgate proxy listening on {} admin {}",
            running.addr, running.admin_addr
        );
        let _ = out.flush();
    }));
    // Everything has drained; a reload stuck on a file read must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("proxy", &e),
    }
}

fn run_coordinator(args: &cli::CoordinatorArgs) -> ExitCode {
    if let Some(cli::CoordinatorAction::MigrateStore { from, to }) = &args.action {
        return migrate_store(from, to);
    }
    let config =
        match shardgate::config::CoordinatorConfig::load(args.config.as_deref(), &args.overrides())
        {
            Ok(c) => c,
            Err(e) => return done(Err(e.into())),
        };
    shardgate::telemetry::init_logging(&config.log_level, config.log_format);
    open_files_for(config.http_max_connections.saturating_add(256));
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(shardgate::coordinator::run(config, |http, grpc| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "shardgate coordinator listening on http {http} grpc {grpc}"
        );
        let _ = out.flush();
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("coordinator", &e),
    }
}

fn migrate_store(from: &str, to: &str) -> ExitCode {
    use shardgate::coordinator::StoreUrl;
    let (from, to) = match (StoreUrl::parse(from), StoreUrl::parse(to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("shardgate coordinator migrate-store: {e}");
            return ExitCode::from(Exit::Invalid as u8);
        }
    };
    shardgate::telemetry::init_logging("warn", LogFormat::Text);
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(shardgate::coordinator::store::migrate_store(
        &from,
        &to,
        "migrate-store",
    )) {
        Ok(state) => {
            println!(
                "copied epoch {} ({} partitions, {} nodes, {} fenced) into the new store",
                state.map.cluster_epoch,
                state.map.partitions.len(),
                state.nodes.len(),
                state.fenced.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("coordinator migrate-store", &e),
    }
}

fn run_agent(flags: &AgentFlags) -> ExitCode {
    let config = match shardgate::agent::AgentConfig::from_flags(flags) {
        Ok(c) => c,
        Err(e) => return done(Err(e.into())),
    };
    shardgate::telemetry::init_logging("info", LogFormat::Text);
    until_stopped("agent", 1, |stop| shardgate::agent::run(config, stop))
}

/// Run a command that lives beside a shard node (agent, node) until
/// SIGTERM/SIGINT, or until the coordinator says TERMINATE (its own exit code).
fn until_stopped<E, Fut>(
    command: &str,
    workers: usize,
    run: impl FnOnce(tokio_util::sync::CancellationToken) -> Fut,
) -> ExitCode
where
    E: Failure + From<shardgate::signals::SignalError>,
    Fut: std::future::Future<Output = Result<shardgate::agent::AgentExit, E>>,
{
    let rt = match runtime(workers) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let exit = rt.block_on(async {
        let mut signals = Signals::stop()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            signals.stopped().await;
            on_signal.cancel();
        });
        run(stop).await
    });
    match exit {
        Ok(shardgate::agent::AgentExit::Stopped) => ExitCode::SUCCESS,
        Ok(shardgate::agent::AgentExit::Terminated) => ExitCode::from(shardgate::agent::TERMINATED),
        Err(e) => fail(command, &e),
    }
}

fn run_demo(args: &cli::DemoArgs) -> ExitCode {
    shardgate::telemetry::init_logging("warn", LogFormat::Text);
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let cfg = demo::DemoConfig {
        proxy: args.listen,
        admin: args.admin_listen,
        coordinator_http: args.coordinator_http,
        coordinator_grpc: args.coordinator_grpc,
    };
    match rt.block_on(demo::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = fail("demo", &e);
            eprintln!(
                "(ports taken? choose others with --listen, --admin-listen, --coordinator-http, --coordinator-grpc)"
            );
            code
        }
    }
}

fn run_node(flags: &shardgate::config::NodeFlags) -> ExitCode {
    let config = match shardgate::node::NodeConfig::from_flags(flags) {
        Ok(c) => c,
        Err(e) => return done(Err(e.into())),
    };
    shardgate::telemetry::init_logging("info", LogFormat::Text);
    until_stopped("node", 0, |stop| shardgate::node::run(config, stop))
}

fn run_status(args: &cli::StatusArgs) -> ExitCode {
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (base, is_coordinator) = match (&args.coordinator, &args.admin) {
        (Some(c), _) => (c.as_str(), true),
        (None, Some(a)) => (a.as_str(), false),
        (None, None) => {
            eprintln!("shardgate status: give --coordinator URL or --admin URL");
            return ExitCode::from(Exit::Invalid as u8);
        }
    };
    let read = rt.block_on(async {
        if is_coordinator {
            status::coordinator(base).await
        } else {
            status::proxy(base).await
        }
        .map(|v| (v, is_coordinator))
    });
    match read {
        Ok((v, _)) if args.json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok((v, coordinator)) => {
            let out = if coordinator {
                status::render_coordinator(&v)
            } else {
                status::render_proxy(&v)
            };
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardgate status: {e}");
            ExitCode::from(Exit::Runtime as u8)
        }
    }
}
