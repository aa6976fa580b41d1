//! Resource figures read from /proc for heartbeats.

use std::path::Path;

/// CPU time counters from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CpuTimes {
    busy: u64,
    total: u64,
}

/// Parse the aggregate `cpu` line of /proc/stat.
pub(super) fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// CPU use between two samples, percent.
pub(super) fn cpu_percent(before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    (busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub(super) fn parse_mem_available(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Established connections in a /proc/net/tcp-format table.
pub(super) fn count_established(table: &str) -> i64 {
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("01"))
        .count() as i64
}

/// A sampler that remembers the last CPU reading.
#[derive(Default)]
pub struct Sampler {
    last_cpu: Option<CpuTimes>,
}

/// One reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// CPU in use since the previous sample, percent.
    pub cpu_percent: f64,
    /// Available memory, bytes.
    pub free_memory_bytes: i64,
    /// Established TCP connections (IPv4 and IPv6).
    pub active_connections: i64,
}

impl Sampler {
    /// Read /proc now. Missing files read as zero rather than failing a heartbeat.
    pub fn sample(&mut self) -> Sample {
        let read = |p: &str| std::fs::read_to_string(Path::new(p)).unwrap_or_default();
        let cpu = parse_cpu(&read("/proc/stat"));
        let cpu_percent = match (self.last_cpu, cpu) {
            (Some(a), Some(b)) => cpu_percent(a, b),
            _ => 0.0,
        };
        self.last_cpu = cpu;
        Sample {
            cpu_percent,
            free_memory_bytes: parse_mem_available(&read("/proc/meminfo")).unwrap_or(0),
            active_connections: count_established(&read("/proc/net/tcp"))
                + count_established(&read("/proc/net/tcp6")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let a = parse_cpu("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_cpu("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(cpu_percent(a, b), 50.0);
        assert_eq!(
            parse_mem_available("MemTotal: 10 kB\nMemAvailable:   2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        let tcp = "  sl  local_address rem_address   st\n   0: 0100007F:1F90 00000000:0000 0A\n   1: 0100007F:1F90 0100007F:D2A4 01\n";
        assert_eq!(count_established(tcp), 1);
    }

    #[test]
    fn this_machine_reports_plausible_figures() {
        let mut s = Sampler::default();
        s.sample();
        let r = s.sample();
        assert!(r.free_memory_bytes > 0);
        assert!((0.0..=100.0).contains(&r.cpu_percent));
    }
}
