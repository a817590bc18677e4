//! ACT's `act_storage` configuration: the same keys, defaults, checks and derived rates as
//! ACT 6.6 (`src/storage/cfg_storage.c`), and the same echo of both.
//!
//! Two deliberate differences: an unparsable number or yes/no value is an error naming the
//! key (ACT silently reads it as 0 / "no"), and a record larger than a large block is refused
//! (ACT divides by zero).

use std::fmt::Write;

/// Stored records are rounded up to this many bytes (RBLOCK_SIZE, "as in Aerospike server").
pub const RBLOCK_BYTES: u32 = 16;
/// Largest record and large block (WBLOCK_SIZE in ACT).
pub const WBLOCK_BYTES: u32 = 8 << 20;
/// Most devices one test may name.
pub const MAX_DEVICES: usize = 128;
/// The ACT version whose output format is reproduced (act_latency.py accepts 6.x).
pub const ACT_VERSION: &str = "6.6";

/// Every key of the configuration file, in ACT's echo order.
pub const KEYS: [&str; 21] = [
    "device-names",
    "file-size-mbytes",
    "service-threads",
    "test-duration-sec",
    "report-interval-sec",
    "microsecond-histograms",
    "read-reqs-per-sec",
    "write-reqs-per-sec",
    "record-bytes",
    "record-bytes-range-max",
    "large-block-op-kbytes",
    "replication-factor",
    "update-pct",
    "defrag-lwm-pct",
    "no-defrag-reads",
    "compress-pct",
    "disable-odsync",
    "commit-to-device",
    "tomb-raider",
    "tomb-raider-sleep-usec",
    "max-lag-sec",
];

/// A configuration that cannot be used; every variant names the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Read { path: String, reason: String },
    UnknownKey { key: String, line: usize },
    BadValue { key: String, value: String, line: usize, expected: &'static str },
    Invalid { key: String, reason: String },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read { path, reason } => write!(f, "couldn't open config file {path}: {reason}"),
            ConfigError::UnknownKey { key, line } => write!(f, "unknown config item '{key}' (line {line})"),
            ConfigError::BadValue { key, value, line, expected } => {
                write!(f, "bad value '{value}' for '{key}' (line {line}): expected {expected}")
            }
            ConfigError::Invalid { key, reason } => {
                write!(f, "invalid or missing configuration of '{key}': {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// The parsed configuration, with ACT's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActConfig {
    pub device_names: Vec<String>,
    /// Undocumented ACT key: use regular files of this size (MiB), created when missing.
    pub file_size_mbytes: u32,
    /// 0 = 5 × online CPUs (resolved by [`ActConfig::check`]).
    pub service_threads: u32,
    pub test_duration_sec: u32,
    pub report_interval_sec: u32,
    pub microsecond_histograms: bool,
    pub read_reqs_per_sec: u32,
    pub write_reqs_per_sec: u32,
    pub record_bytes: u32,
    pub record_bytes_range_max: u32,
    pub large_block_op_kbytes: u32,
    pub replication_factor: u32,
    pub update_pct: u32,
    pub defrag_lwm_pct: u32,
    pub no_defrag_reads: bool,
    pub compress_pct: u32,
    pub disable_odsync: bool,
    pub commit_to_device: bool,
    pub tomb_raider: bool,
    pub tomb_raider_sleep_usec: u32,
    pub max_lag_sec: u32,
}

impl Default for ActConfig {
    fn default() -> Self {
        ActConfig {
            device_names: Vec::new(),
            file_size_mbytes: 0,
            service_threads: 0,
            test_duration_sec: 0,
            report_interval_sec: 1,
            microsecond_histograms: false,
            read_reqs_per_sec: 0,
            write_reqs_per_sec: 0,
            record_bytes: 1536,
            record_bytes_range_max: 0,
            large_block_op_kbytes: 128,
            replication_factor: 1,
            update_pct: 0,
            defrag_lwm_pct: 50,
            no_defrag_reads: false,
            compress_pct: 100,
            disable_odsync: false,
            commit_to_device: false,
            tomb_raider: false,
            tomb_raider_sleep_usec: 0,
            max_lag_sec: 10,
        }
    }
}

/// The rates ACT derives from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// record-bytes rounded up to 16.
    pub record_stored_bytes: u32,
    /// record-bytes-range-max rounded up to 16 (record_stored_bytes when not set).
    pub record_stored_bytes_rmx: u32,
    /// Client reads plus the reads of updates.
    pub internal_read_reqs_per_sec: u32,
    /// Record-sized writes: replication-factor × writes with commit-to-device, else 0.
    pub internal_write_reqs_per_sec: u32,
    /// large-block bytes / average stored record bytes, integer division as in ACT.
    pub records_per_large_block: u32,
    /// 100 / (100 − defrag-lwm-pct).
    pub defrag_write_amplification: f64,
    pub large_block_reads_per_sec: f64,
    pub large_block_writes_per_sec: f64,
}

fn parse_u32(key: &str, v: Option<&str>, line: usize) -> Result<u32, ConfigError> {
    let bad = |value: &str| ConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        line,
        expected: "an unsigned 32-bit integer",
    };
    let v = v.ok_or_else(|| bad(""))?;
    v.parse::<u32>().map_err(|_| bad(v))
}

fn parse_yes_no(key: &str, v: Option<&str>, line: usize) -> Result<bool, ConfigError> {
    match v {
        Some("yes" | "y" | "true") => Ok(true),
        Some("no" | "n" | "false") => Ok(false),
        other => Err(ConfigError::BadValue {
            key: key.into(),
            value: other.unwrap_or("").into(),
            line,
            expected: "yes or no",
        }),
    }
}

impl ActConfig {
    /// Read and check a configuration file.
    pub fn load(path: &str) -> Result<ActConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.into(), reason: e.to_string() })?;
        let mut c = ActConfig::parse(&text)?;
        c.check()?;
        Ok(c)
    }

    /// Parse `name: value` lines (`#` starts a comment) over ACT's defaults. Does not check
    /// cross-key constraints; see [`ActConfig::check`].
    pub fn parse(text: &str) -> Result<ActConfig, ConfigError> {
        let mut c = ActConfig::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let body = raw.split('#').next().unwrap_or("");
            // Like ACT's strtok(line, ":" WHITE_SPACE): the tag ends at a colon or white space.
            let body = body.trim_start();
            let end = body.find(|ch: char| ch == ':' || ch.is_whitespace()).unwrap_or(body.len());
            let tag = &body[..end];
            if tag.is_empty() {
                continue;
            }
            let rest = body[end..].trim_start_matches(|ch: char| ch == ':' || ch.is_whitespace());
            let mut words = rest.split_whitespace();
            let v = words.next();
            match tag {
                "device-names" => {
                    for name in rest.split(|ch: char| ch == ',' || ch == ';' || ch.is_whitespace()) {
                        if !name.is_empty() {
                            c.device_names.push(name.to_string());
                        }
                    }
                }
                "file-size-mbytes" => c.file_size_mbytes = parse_u32(tag, v, line)?,
                "service-threads" => c.service_threads = parse_u32(tag, v, line)?,
                "test-duration-sec" => c.test_duration_sec = parse_u32(tag, v, line)?,
                "report-interval-sec" => c.report_interval_sec = parse_u32(tag, v, line)?,
                "microsecond-histograms" => c.microsecond_histograms = parse_yes_no(tag, v, line)?,
                "read-reqs-per-sec" => c.read_reqs_per_sec = parse_u32(tag, v, line)?,
                "write-reqs-per-sec" => c.write_reqs_per_sec = parse_u32(tag, v, line)?,
                "record-bytes" => c.record_bytes = parse_u32(tag, v, line)?,
                "record-bytes-range-max" => c.record_bytes_range_max = parse_u32(tag, v, line)?,
                "large-block-op-kbytes" => c.large_block_op_kbytes = parse_u32(tag, v, line)?,
                "replication-factor" => c.replication_factor = parse_u32(tag, v, line)?,
                "update-pct" => c.update_pct = parse_u32(tag, v, line)?,
                "defrag-lwm-pct" => c.defrag_lwm_pct = parse_u32(tag, v, line)?,
                "no-defrag-reads" => c.no_defrag_reads = parse_yes_no(tag, v, line)?,
                "compress-pct" => c.compress_pct = parse_u32(tag, v, line)?,
                "disable-odsync" => c.disable_odsync = parse_yes_no(tag, v, line)?,
                "commit-to-device" => c.commit_to_device = parse_yes_no(tag, v, line)?,
                "tomb-raider" => c.tomb_raider = parse_yes_no(tag, v, line)?,
                "tomb-raider-sleep-usec" => c.tomb_raider_sleep_usec = parse_u32(tag, v, line)?,
                "max-lag-sec" => c.max_lag_sec = parse_u32(tag, v, line)?,
                _ => return Err(ConfigError::UnknownKey { key: tag.into(), line }),
            }
        }
        Ok(c)
    }

    /// ACT's check_configuration() and the load checks of derive_configuration(); resolves
    /// the service-threads default (5 × online CPUs).
    pub fn check(&mut self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| Err(ConfigError::Invalid { key: key.into(), reason });
        if self.device_names.is_empty() {
            return invalid("device-names", "no devices named".into());
        }
        if self.device_names.len() > MAX_DEVICES {
            return invalid(
                "device-names",
                format!("{} devices named, at most {MAX_DEVICES}", self.device_names.len()),
            );
        }
        if self.service_threads == 0 {
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u32;
            self.service_threads = 5 * cpus;
        }
        if self.test_duration_sec == 0 {
            return invalid("test-duration-sec", "must be set and non-zero".into());
        }
        if self.report_interval_sec == 0 {
            return invalid("report-interval-sec", "must be non-zero".into());
        }
        if self.record_bytes == 0 || self.record_bytes > WBLOCK_BYTES {
            return invalid("record-bytes", format!("{} is out of range 1..{WBLOCK_BYTES}", self.record_bytes));
        }
        if self.record_bytes_range_max != 0
            && (self.record_bytes_range_max <= self.record_bytes || self.record_bytes_range_max > WBLOCK_BYTES)
        {
            return invalid(
                "record-bytes-range-max",
                format!(
                    "{} must be above record-bytes ({}) and at most {WBLOCK_BYTES}",
                    self.record_bytes_range_max, self.record_bytes
                ),
            );
        }
        let lb = self.large_block_op_kbytes as u64 * 1024;
        if lb == 0 || lb > WBLOCK_BYTES as u64 || !lb.is_power_of_two() {
            return invalid(
                "large-block-op-kbytes",
                format!("{} is not a power of two of at most 8192", self.large_block_op_kbytes),
            );
        }
        if self.replication_factor == 0 {
            return invalid("replication-factor", "must be at least 1".into());
        }
        if self.update_pct > 100 {
            return invalid("update-pct", format!("{} is above 100", self.update_pct));
        }
        if self.defrag_lwm_pct >= 100 {
            return invalid("defrag-lwm-pct", format!("{} must be below 100", self.defrag_lwm_pct));
        }
        if self.compress_pct > 100 {
            return invalid("compress-pct", format!("{} is above 100", self.compress_pct));
        }
        if self.disable_odsync && self.commit_to_device {
            return invalid("disable-odsync", "cannot be combined with commit-to-device".into());
        }
        if self.read_reqs_per_sec as u64 + self.write_reqs_per_sec as u64 == 0 {
            return invalid("read-reqs-per-sec", "read-reqs-per-sec and write-reqs-per-sec can't both be zero".into());
        }
        let d = self.derive();
        if d.records_per_large_block == 0 {
            return invalid(
                "large-block-op-kbytes",
                format!("a large block ({lb} bytes) must hold at least one stored record"),
            );
        }
        let total = d.internal_read_reqs_per_sec as u64 + d.internal_write_reqs_per_sec as u64;
        if total != 0 && total / self.service_threads as u64 == 0 {
            return invalid(
                "service-threads",
                "load config too small: fewer than 1 request/s per service thread".into(),
            );
        }
        Ok(())
    }

    pub fn large_block_bytes(&self) -> u32 {
        self.large_block_op_kbytes * 1024
    }

    /// ACT's derive_configuration().
    pub fn derive(&self) -> Derived {
        let round = |b: u32| (b as u64).div_ceil(RBLOCK_BYTES as u64) as u32 * RBLOCK_BYTES;
        let internal_read =
            self.read_reqs_per_sec as u64 + self.write_reqs_per_sec as u64 * self.update_pct as u64 / 100;
        let writes = self.replication_factor as u64 * self.write_reqs_per_sec as u64;
        let stored = round(self.record_bytes);
        let stored_rmx = if self.record_bytes_range_max == 0 { stored } else { round(self.record_bytes_range_max) };
        let avg = (stored as u64 + stored_rmx as u64) / 2;
        let per_block = (self.large_block_bytes() as u64 / avg.max(1)) as u32;
        let original = if per_block == 0 { 0.0 } else { writes as f64 / per_block as f64 };
        let amp = 100.0 / (100 - self.defrag_lwm_pct.min(99)) as f64;
        let mut lbr = original * amp;
        let (lbw, internal_write) =
            if self.commit_to_device { (original * (amp - 1.0), writes as u32) } else { (lbr, 0) };
        if self.no_defrag_reads {
            lbr = 0.0;
        }
        Derived {
            record_stored_bytes: stored,
            record_stored_bytes_rmx: stored_rmx,
            internal_read_reqs_per_sec: internal_read as u32,
            internal_write_reqs_per_sec: internal_write,
            records_per_large_block: per_block,
            defrag_write_amplification: amp,
            large_block_reads_per_sec: lbr,
            large_block_writes_per_sec: lbw,
        }
    }

    /// ACT's echo of the configuration and the derived values, byte for byte (both blocks end
    /// with a blank line).
    pub fn echo(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut s = String::new();
        s.push_str("ACT-STORAGE CONFIGURATION\n");
        s.push_str("device-names:");
        for d in &self.device_names {
            s.push(' ');
            s.push_str(d);
        }
        let _ = writeln!(s, "\nnum-devices: {}", self.device_names.len());
        if self.file_size_mbytes != 0 {
            let _ = writeln!(s, "file-size-mbytes: {}", self.file_size_mbytes);
        }
        let _ = writeln!(s, "service-threads: {}", self.service_threads);
        let _ = writeln!(s, "test-duration-sec: {}", self.test_duration_sec);
        let _ = writeln!(s, "report-interval-sec: {}", self.report_interval_sec);
        let _ = writeln!(s, "microsecond-histograms: {}", yn(self.microsecond_histograms));
        let _ = writeln!(s, "read-reqs-per-sec: {}", self.read_reqs_per_sec);
        let _ = writeln!(s, "write-reqs-per-sec: {}", self.write_reqs_per_sec);
        let _ = writeln!(s, "record-bytes: {}", self.record_bytes);
        let _ = writeln!(s, "record-bytes-range-max: {}", self.record_bytes_range_max);
        let _ = writeln!(s, "large-block-op-kbytes: {}", self.large_block_op_kbytes);
        let _ = writeln!(s, "replication-factor: {}", self.replication_factor);
        let _ = writeln!(s, "update-pct: {}", self.update_pct);
        let _ = writeln!(s, "defrag-lwm-pct: {}", self.defrag_lwm_pct);
        let _ = writeln!(s, "no-defrag-reads: {}", yn(self.no_defrag_reads));
        let _ = writeln!(s, "compress-pct: {}", self.compress_pct);
        let _ = writeln!(s, "disable-odsync: {}", yn(self.disable_odsync));
        let _ = writeln!(s, "commit-to-device: {}", yn(self.commit_to_device));
        let _ = writeln!(s, "tomb-raider: {}", yn(self.tomb_raider));
        let _ = writeln!(s, "tomb-raider-sleep-usec: {}", self.tomb_raider_sleep_usec);
        let _ = writeln!(s, "max-lag-sec: {}", self.max_lag_sec);
        let d = self.derive();
        s.push_str("\nDERIVED CONFIGURATION\n");
        let _ = writeln!(s, "record-stored-bytes: {} ... {}", d.record_stored_bytes, d.record_stored_bytes_rmx);
        let _ = writeln!(s, "internal-read-reqs-per-sec: {}", d.internal_read_reqs_per_sec);
        let _ = writeln!(s, "internal-write-reqs-per-sec: {}", d.internal_write_reqs_per_sec);
        let _ = writeln!(s, "large-block-reads-per-sec: {:.2}", d.large_block_reads_per_sec);
        let _ = writeln!(s, "large-block-writes-per-sec: {:.2}", d.large_block_writes_per_sec);
        s.push('\n');
        s
    }

    /// The intermediate values of the derivation, which ACT does not print (a separate block
    /// after ACT's, so act_latency.py's echo of ACT's blocks is unchanged).
    pub fn explain(&self) -> String {
        let d = self.derive();
        let mut s = String::from("RATE DERIVATION\n");
        let _ = writeln!(
            s,
            "records-per-large-block: {} ({} / {} average stored record bytes, integer division)",
            d.records_per_large_block,
            self.large_block_bytes(),
            (d.record_stored_bytes as u64 + d.record_stored_bytes_rmx as u64) / 2
        );
        let _ = writeln!(
            s,
            "defrag-write-amplification: {:.2} (100 / (100 - defrag-lwm-pct {}))",
            d.defrag_write_amplification, self.defrag_lwm_pct
        );
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acts_worked_example() {
        let mut c = ActConfig::parse(
            "device-names: /dev/sdb\ntest-duration-sec: 60\nread-reqs-per-sec: 2000\nwrite-reqs-per-sec: 1000\n",
        )
        .unwrap();
        c.check().unwrap();
        let d = c.derive();
        assert_eq!(d.records_per_large_block, 85);
        assert_eq!(format!("{:.2}", d.large_block_reads_per_sec), "23.53");
        assert_eq!(format!("{:.2}", d.large_block_writes_per_sec), "23.53");
    }
}
