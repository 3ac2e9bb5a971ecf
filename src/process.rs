//! The standard `process_*` metrics, read from `/proc/self` at scrape time.
//!
//! Written by hand because prometheus-client ships no process collector; the
//! names and meanings follow the Prometheus client guidelines so the usual
//! dashboards work. On systems without `/proc` the metrics are simply absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Encodes `process_*` from `/proc/self`.
#[derive(Debug)]
pub struct ProcessCollector;

/// Figures read from `/proc/self`.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub start_time_seconds: f64,
    pub open_fds: f64,
    pub max_fds: Option<f64>,
}

/// Reads this process's figures; `None` where `/proc` is not available.
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    let mut stats = parse_stat(&stat, boot_time)?;
    stats.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    stats.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| parse_max_fds(&limits));
    Some(stats)
}

/// Clock ticks per second and page size as Linux uses them on the platforms
/// we ship for (x86_64, aarch64); reading them needs libc, which the exporter
/// does not otherwise depend on.
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: f64 = 4096.0;

fn parse_stat(stat: &str, boot_time: f64) -> Option<ProcessStats> {
    // The command name (field 2) may hold spaces and parentheses: fields are
    // counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime 15,
    // starttime 22, vsize 23, rss 24.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) / TICKS_PER_SECOND,
        start_time_seconds: boot_time + field(22)? / TICKS_PER_SECOND,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * PAGE_SIZE,
        open_fds: 0.0,
        max_fds: None,
    })
}

fn parse_max_fds(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = read() else { return Ok(()) };
        let mut cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?;
        cpu.encode_counter::<NoLabelSet, _, u64>(&stats.cpu_seconds, None)?;
        let mut gauges = vec![
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                stats.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stats.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                stats.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                stats.open_fds,
            ),
        ];
        if let Some(max) = stats.max_fds {
            gauges.push((
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max,
            ));
        }
        for (name, help, value) in gauges {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let stat = "1234 (my (odd) exe) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 123456789 2560 18446744073709551615";
        let stats = parse_stat(stat, 1_700_000_000.0).expect("parses");
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
        assert_eq!(stats.virtual_bytes, 123_456_789.0);
        assert_eq!(stats.resident_bytes, 2560.0 * 4096.0);
    }

    #[test]
    fn reads_this_process() {
        let stats = read().expect("/proc is there on Linux");
        assert!(stats.resident_bytes > 0.0 && stats.open_fds > 0.0);
        assert_eq!(
            parse_max_fds(
                "Max open files            1024                 524288               files     "
            ),
            Some(1024.0)
        );
    }
}
