//! The `shardgate` binary: parse arguments, run a command, map the outcome to
//! an exit code (0 ok, 1 invalid input or config, 2 runtime failure).

use clap::Parser;
use shardgate::cli::{self, Cli, Command};
use shardgate::config::ProxyConfig;
use std::io::Write;
use std::process::ExitCode;

// jemalloc: glibc malloc cost 9% more proxy CPU per request (free-list
// consolidation); mimalloc 3 sends every Rust allocation through its aligned
// API, whose slow path hyper's two 8 KiB read buffers per request take (they
// are replaced, not reused, while the previous message still borrows them):
// 34,661 -> 33,877 instructions per request with jemalloc (benches/instructions.py).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for invalid input or configuration.
const INVALID: u8 = 1;
/// Exit code for failures of the environment (ports in use, I/O).
const RUNTIME: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Route(args) => finish(cli::route(&args, &mut std::io::stdout().lock())),
        Command::CheckConfig(args) => match cli::check_config(&args.file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => finish::<()>(Err(e)),
        },
        Command::Proxy(args) => run_proxy(&args),
        Command::Coordinator(args) => run_coordinator(&args),
        Command::Agent(args) => run_agent(&args),
        Command::Demo(args) => run_demo(&args),
        Command::DemoNode(args) => run_demo_node(&args),
    }
}

fn run_demo(args: &cli::DemoArgs) -> ExitCode {
    shardgate::telemetry::init_logging("warn", shardgate::config::LogFormat::Text);
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let cfg = shardgate::demo::DemoConfig {
        proxy: args.listen,
        admin: args.admin_listen,
        coordinator_http: args.coordinator_http,
        coordinator_grpc: args.coordinator_grpc,
    };
    match rt.block_on(shardgate::demo::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardgate demo: {e}");
            eprintln!(
                "(ports taken? choose others with --listen, --admin-listen, --coordinator-http, --coordinator-grpc)"
            );
            ExitCode::from(RUNTIME)
        }
    }
}

fn run_demo_node(args: &cli::DemoNodeArgs) -> ExitCode {
    shardgate::telemetry::init_logging("info", shardgate::config::LogFormat::Text);
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(shardgate::demo::run_node(
        &args.id,
        args.listen,
        args.addr_file.as_deref(),
        &args.coordinator,
    )) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardgate demo-node: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

fn run_coordinator(args: &cli::CoordinatorArgs) -> ExitCode {
    let config =
        match shardgate::config::CoordinatorConfig::load(args.config.as_deref(), &args.overrides())
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(INVALID);
            }
        };
    shardgate::telemetry::init_logging(&config.log_level, config.log_format);
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
        Err(e) => {
            eprintln!("shardgate coordinator: {e}");
            ExitCode::from(if e.is_input_error() { INVALID } else { RUNTIME })
        }
    }
}

fn run_agent(args: &cli::AgentArgs) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(INVALID);
        }
    };
    shardgate::telemetry::init_logging("info", shardgate::config::LogFormat::Text);
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let exit = rt.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut t), Ok(mut i)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            s.cancel();
        });
        shardgate::agent::run(config, stop).await
    });
    match exit {
        Ok(shardgate::agent::AgentExit::Stopped) => ExitCode::SUCCESS,
        Ok(shardgate::agent::AgentExit::Terminated) => ExitCode::from(shardgate::agent::TERMINATED),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn finish<T>(r: Result<T, cli::InputError>) -> ExitCode {
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(INVALID)
        }
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
        ExitCode::from(RUNTIME)
    })
}

fn run_proxy(args: &cli::ProxyArgs) -> ExitCode {
    let overrides = args.overrides();
    let config = match ProxyConfig::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(INVALID);
        }
    };
    shardgate::telemetry::init_logging(&config.log.level, config.log.format);
    let rt = match runtime(config.server.workers) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(shardgate::proxy::run(
        config,
        args.config.clone(),
        overrides,
        |running| {
            // Tests and scripts wait for this line to learn the bound ports.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "shardgate proxy listening on {} admin {}",
                running.addr, running.admin_addr
            );
            let _ = out.flush();
        },
    ));
    // Everything has drained; a reload stuck on a file read must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardgate proxy: {e}");
            ExitCode::from(if e.is_input_error() { INVALID } else { RUNTIME })
        }
    }
}
