//! Engine configuration for one namespace, with Aerospike's option names where one exists.

use crate::error::EngineError;
use crate::format::{max_namespace_bytes, MAX_WBLOCK_BYTES, MIN_WBLOCK_BYTES};

/// Storage options of one namespace.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Namespace name (at most 31 bytes).
    pub namespace: String,
    /// Shard threads; default: the number of online CPUs.
    pub shards: usize,
    /// Pin each shard thread to a core.
    pub pin_threads: bool,
    /// `write-block-size`: power of two, 128 KiB – 8 MiB.
    pub wblock_bytes: u32,
    /// `flush-max-ms`: a partially filled wblock is written after this long.
    pub flush_max_ms: u64,
    /// `commit-to-device`: acknowledge a write only once it is durable.
    pub commit_to_device: bool,
    /// `post-write-cache`: bytes of recently written wblocks kept in memory per namespace.
    pub post_write_cache_bytes: u64,
    /// `max-write-cache`: bytes queued for the device per namespace before writes get
    /// DEVICE_OVERLOAD.
    pub max_write_cache_bytes: u64,
    /// `default-ttl` in seconds; 0 = never expire.
    pub default_ttl_secs: u32,
    /// `defrag-lwm-pct`: wblocks whose live bytes fall below this share are defragmented.
    pub defrag_lwm_pct: u32,
    /// `defrag-sleep`: pause between two defragmented wblocks, in microseconds (bounds the
    /// share of the device defrag takes).
    pub defrag_sleep_us: u64,
    /// How long nothing must have qualified for defrag, or a defrag output wblock must have
    /// been open, before the defrag streams' partly filled outputs are sealed, in
    /// milliseconds (until then the next candidates fill them).
    pub defrag_idle_seal_ms: u64,
    /// Wblocks an idle defrag examines per look for candidates (every 20 ms at most): a
    /// pass over a larger device is spread over several looks.
    pub defrag_look_wblocks: usize,
    /// Free wblocks per device and shard that only defrag may use.
    pub defrag_reserve_wblocks: usize,
    /// How long defrag leaves a wblock whose read failed before reading it again, in
    /// milliseconds (a bad sector would otherwise be read, and logged, at every defrag
    /// pause); freeing the wblock ends the wait too. Not a server option: tests shorten it.
    pub defrag_retry_unreadable_ms: u64,
    /// Give free wblocks whose old records hold tombstones back an empty header (see the
    /// expiry sweep). Not a server option: tests turn it off to check the floor's other
    /// rules on their own.
    pub scrub_free_wblocks: bool,
    /// `stop-writes-avail-pct`: below this share of free wblocks client writes get
    /// OUT_OF_SPACE (8); reads and deletes go on.
    pub stop_writes_avail_pct: u32,
    /// `nsup-period`: seconds between expiry sweeps; 0 disables them.
    pub nsup_period_secs: u64,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Bounded capacity of each shard's request channel.
    pub channel_capacity: usize,
    /// Reads in flight per shard during cold start.
    pub cold_start_queue_depth: usize,
    /// How long an idle shard keeps looking at its queues and ring before it sleeps, in
    /// microseconds, yielding the CPU to any other runnable thread between looks.
    pub spin_us: u64,
}

impl EngineConfig {
    pub fn new(namespace: &str) -> EngineConfig {
        EngineConfig {
            namespace: namespace.to_string(),
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            pin_threads: true,
            wblock_bytes: 1 << 20,
            flush_max_ms: 1000,
            commit_to_device: false,
            post_write_cache_bytes: 256 << 20,
            max_write_cache_bytes: 64 << 20,
            default_ttl_secs: 0,
            defrag_lwm_pct: 50,
            defrag_sleep_us: 1000,
            defrag_idle_seal_ms: 30_000,
            defrag_look_wblocks: 1 << 16,
            defrag_reserve_wblocks: 2,
            defrag_retry_unreadable_ms: 30_000,
            scrub_free_wblocks: true,
            stop_writes_avail_pct: 5,
            nsup_period_secs: 120,
            ring_entries: 256,
            channel_capacity: 4096,
            cold_start_queue_depth: 8,
            spin_us: 200,
        }
    }

    /// Check every value; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |key: &str, reason: String| Err(EngineError::Config { key: key.into(), reason });
        if self.namespace.is_empty() || self.namespace.len() >= max_namespace_bytes() {
            return bad("name", format!("namespace name must be 1..{} bytes", max_namespace_bytes() - 1));
        }
        let w = self.wblock_bytes;
        if !w.is_power_of_two() || !(MIN_WBLOCK_BYTES..=MAX_WBLOCK_BYTES).contains(&w) {
            return bad(
                "write-block-size",
                format!("{w} is not a power of two between {MIN_WBLOCK_BYTES} (128K) and {MAX_WBLOCK_BYTES} (8M)"),
            );
        }
        if self.shards == 0 || self.shards > 256 {
            return bad("shards", format!("{} is out of range 1..256", self.shards));
        }
        if self.flush_max_ms == 0 {
            return bad("flush-max-ms", "must be at least 1".into());
        }
        if self.max_write_cache_bytes < w as u64 {
            return bad("max-write-cache", format!("must be at least one write block ({w} bytes)"));
        }
        if self.defrag_lwm_pct == 0 || self.defrag_lwm_pct > 99 {
            return bad("defrag-lwm-pct", format!("{} is out of range 1..99", self.defrag_lwm_pct));
        }
        if self.stop_writes_avail_pct > 50 {
            return bad("stop-writes-avail-pct", format!("{} is out of range 0..50", self.stop_writes_avail_pct));
        }
        if self.ring_entries < 8 || !self.ring_entries.is_power_of_two() {
            return bad("ring-entries", "must be a power of two, at least 8".into());
        }
        Ok(())
    }
}

/// Parse a size such as `4G`, `64M`, `128K`, `512` (bytes). Suffixes are powers of 1024.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("128K"), Some(128 << 10));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = EngineConfig::new("test");
        assert!(c.validate().is_ok());
        c.wblock_bytes = 3 << 20;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("write-block-size"), "{e}");
    }
}
