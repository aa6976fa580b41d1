//! Metrics, logs and traces (SPEC §5, §6).

mod otlp;
mod registry;
mod trace;

pub use otlp::{OtlpConfig, OtlpError, ServerSpan, SpanSink, start as start_otlp};
pub use registry::{LATENCY_BUCKETS, Lazy, Metrics, names};
pub use trace::{TraceContext, TraceId};

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    /// Filter directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
    /// Share of successes written to the access log.
    pub access_log_sample: f64,
}

/// Install the process-wide log subscriber: `RUST_LOG` wins over `level`.
///
/// Noisy dependencies are held at `warn` unless the filter names them, so a
/// client that misbehaves cannot fill the log through hyper's own messages.
/// rustls is held at `error`: it warns about what a peer sent (an IP address
/// as the server name — wrk and many OpenSSL clients do that on every
/// connection — or an alert), which made one log line per handshake; the
/// handshake's own outcome is already counted and, when it fails, logged by
/// the listener.
pub fn init_logging(level: &str, format: LogFormat) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let quiet = [
        ("hyper", "warn"),
        ("h2", "warn"),
        ("tower", "warn"),
        ("tonic", "warn"),
        ("rustls", "error"),
        ("tokio_postgres", "warn"),
    ];
    for (target, level) in quiet {
        if !directives.contains(target)
            && let Ok(d) = format!("{target}={level}").parse()
        {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, demo) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
