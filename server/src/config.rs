//! The TOML configuration, with Aerospike's option names in kebab-case.
//!
//! Every section and key is documented in [`REFERENCE`] (shown by `ferrospike --help`).
//! Unknown keys are refused; a bad value stops start-up with a message naming the key.

use std::path::PathBuf;

use ferrospike_engine::config::parse_size;
use ferrospike_engine::io::DeviceSpec;
use ferrospike_engine::EngineConfig;
use serde::Deserialize;

/// Used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = r#"
[service]
address = "127.0.0.1"
port = 3000

[[namespaces]]
name = "test"

[namespaces.storage]
files = ["data/test.dat"]
file-size = "4G"
"#;

/// The option reference printed by `--help`.
pub const REFERENCE: &str = r#"CONFIGURATION (TOML, Aerospike option names):

  [service]
    address = "127.0.0.1"        address to listen on
    port = 3000                  TCP port (the Aerospike default)
    shards = 2                   network/storage threads, one per core (default: online CPUs)
    max-msg-size = "16M"         largest request accepted; larger ones are refused before
                                 any memory is allocated for them
    max-connections = 1024       client connections; beyond this new ones are closed at once
    request-deadline-ms = 5000   time for a request to arrive in full, from its first byte
    idle-timeout-secs = 0        close connections idle this long (0 = never)
    max-inflight = 64            pipelined requests executed at once per connection
    front-end = "shards"         "shards": connections are served inside the shard threads'
                                 loops (accept, receive and send on each shard's io_uring);
                                 "threads": one thread per connection (the first design,
                                 kept for comparison)
    idle-spin-us = 200           how long an idle shard thread keeps polling before it sleeps,
                                 giving the CPU to any other thread that wants it between
                                 looks; spares the wake-up of a sleeping thread (tens of
                                 microseconds on a virtual machine). 0: sleep at once
    connection-affinity = true   move a connection to the shard pinned to the CPU its
                                 packets arrive on (SO_INCOMING_CPU), so that a request and
                                 its answer wake threads on one CPU; a shard takes at most
                                 half again its even share of connections this way
    cluster-name = "name"        reported by the info command cluster-name (default: null)

  [[namespaces]]                 one table per namespace
    name = "test"
    default-ttl = 0              seconds; 0 = records never expire unless a TTL is sent
    nsup-period = 120            seconds between expiry sweeps (0: none)

  [namespaces.storage]
    devices = ["/dev/nvme0n1"]   raw block devices (their contents are destroyed on first use;
                                 devices holding foreign data are refused), or
    files = ["data/test.dat"]    regular files, created sparse with
    file-size = "4G"             the size of each file
    write-block-size = "1M"      power of two, 128K..8M
    defrag-lwm-pct = 50          defragment write blocks below this fill (percent)
    defrag-sleep = 1000          microseconds between two defragmented write blocks
    flush-max-ms = 1000          write a partial write block after this long
    commit-to-device = false     acknowledge writes only once durable on the device
    post-write-cache = "256M"    recently written blocks kept in memory for reads (the same
                                 default as Aerospike 7.1+, which keeps it per device)
    max-write-cache = "64M"      bytes queued for the device before writes get
                                 DEVICE_OVERLOAD (18)
    stop-writes-avail-pct = 5    client writes get OUT_OF_SPACE below this free space (percent)

Sizes are integers (bytes) or strings with K, M, G, T suffixes (powers of 1024).
With no --config the embedded default serves namespace "test" from a sparse 4 GiB
file data/test.dat on 127.0.0.1:3000.
"#;

/// A bad configuration, naming the key and the reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Toml(String),
    #[error("{key}: {reason}")]
    Value { key: String, reason: String },
}

/// A size: an integer of bytes or a string like "4G".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<u64, ConfigError> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => parse_size(s).ok_or_else(|| ConfigError::Value {
                key: key.into(),
                reason: format!("'{s}' is not a size (use bytes or a number with K, M, G or T)"),
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
struct RawService {
    address: String,
    port: u16,
    shards: Option<usize>,
    max_msg_size: Size,
    max_connections: usize,
    request_deadline_ms: u64,
    idle_timeout_secs: u64,
    max_inflight: usize,
    cluster_name: Option<String>,
    front_end: String,
    connection_affinity: bool,
    idle_spin_us: u64,
}

impl Default for RawService {
    fn default() -> RawService {
        RawService {
            address: "127.0.0.1".into(),
            port: 3000,
            shards: None,
            max_msg_size: Size::Bytes(16 << 20),
            max_connections: 1024,
            request_deadline_ms: 5000,
            idle_timeout_secs: 0,
            max_inflight: 64,
            cluster_name: None,
            front_end: "shards".into(),
            connection_affinity: true,
            idle_spin_us: 200,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNamespace {
    name: String,
    #[serde(default)]
    default_ttl: u32,
    #[serde(default = "default_nsup")]
    nsup_period: u32,
    storage: RawStorage,
}

fn default_nsup() -> u32 {
    120
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStorage {
    #[serde(default)]
    devices: Vec<PathBuf>,
    #[serde(default)]
    files: Vec<PathBuf>,
    file_size: Option<Size>,
    write_block_size: Option<Size>,
    defrag_lwm_pct: Option<u32>,
    flush_max_ms: Option<u64>,
    commit_to_device: Option<bool>,
    post_write_cache: Option<Size>,
    max_write_cache: Option<Size>,
    stop_writes_avail_pct: Option<u32>,
    defrag_sleep: Option<u64>,
}

/// Service (network) options.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub address: String,
    pub port: u16,
    pub shards: usize,
    pub max_msg_bytes: u64,
    pub max_connections: usize,
    pub request_deadline_ms: u64,
    /// 0 = never.
    pub idle_timeout_secs: u64,
    pub max_inflight: usize,
    pub cluster_name: Option<String>,
    /// Serve connections inside the shard loops (true) or one thread per connection.
    pub shard_front_end: bool,
    /// Move connections to the shard on the CPU their packets arrive on.
    pub connection_affinity: bool,
    /// How long an idle shard polls before it sleeps (every namespace's shards).
    pub idle_spin_us: u64,
}

/// One namespace: its engine configuration and devices.
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    pub engine: EngineConfig,
    pub devices: Vec<DeviceSpec>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    pub namespaces: Vec<NamespaceConfig>,
}

fn bad(key: String, reason: impl Into<String>) -> ConfigError {
    ConfigError::Value { key, reason: reason.into() }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let s = raw.service;
        let shards = s.shards.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if shards == 0 || shards > 256 {
            return Err(bad("service.shards".into(), format!("{shards} is out of range 1..256")));
        }
        let max_msg_bytes = s.max_msg_size.bytes("service.max-msg-size")?;
        if !(1024..=128 << 20).contains(&max_msg_bytes) {
            return Err(bad("service.max-msg-size".into(), "must be between 1K and 128M (the clients' limit)"));
        }
        if s.max_connections == 0 || s.max_connections > 100_000 {
            return Err(bad("service.max-connections".into(), "must be between 1 and 100000"));
        }
        if s.request_deadline_ms == 0 {
            return Err(bad("service.request-deadline-ms".into(), "must be at least 1"));
        }
        if s.max_inflight == 0 || s.max_inflight > 4096 {
            return Err(bad("service.max-inflight".into(), "must be between 1 and 4096"));
        }
        let shard_front_end = match s.front_end.as_str() {
            "shards" => true,
            "threads" => false,
            other => return Err(bad("service.front-end".into(), format!("'{other}': use \"shards\" or \"threads\""))),
        };
        if s.idle_spin_us > 100_000 {
            return Err(bad("service.idle-spin-us".into(), "must be at most 100000 (0.1 s)"));
        }
        if s.address.parse::<std::net::IpAddr>().is_err() {
            return Err(bad("service.address".into(), format!("'{}' is not an IP address", s.address)));
        }
        let service = ServiceConfig {
            address: s.address,
            port: s.port,
            shards,
            max_msg_bytes,
            max_connections: s.max_connections,
            request_deadline_ms: s.request_deadline_ms,
            idle_timeout_secs: s.idle_timeout_secs,
            max_inflight: s.max_inflight,
            cluster_name: s.cluster_name,
            shard_front_end,
            connection_affinity: s.connection_affinity,
            idle_spin_us: s.idle_spin_us,
        };
        if raw.namespaces.is_empty() {
            return Err(bad("namespaces".into(), "at least one [[namespaces]] table is required"));
        }
        let mut namespaces: Vec<NamespaceConfig> = Vec::new();
        for (i, ns) in raw.namespaces.into_iter().enumerate() {
            let n = namespace(i, ns, shards, service.idle_spin_us)?;
            if namespaces.iter().any(|o| o.engine.namespace == n.engine.namespace) {
                return Err(bad(format!("namespaces[{i}].name"), format!("'{}' is defined twice", n.engine.namespace)));
            }
            namespaces.push(n);
        }
        Ok(Config { service, namespaces })
    }
}

fn namespace(i: usize, ns: RawNamespace, shards: usize, spin_us: u64) -> Result<NamespaceConfig, ConfigError> {
    let key = |k: &str| format!("namespaces[{i}].{k}");
    let skey = |k: &str| format!("namespaces[{i}].storage.{k}");
    let st = ns.storage;
    let mut e = EngineConfig::new(&ns.name);
    e.shards = shards;
    e.spin_us = spin_us;
    e.default_ttl_secs = ns.default_ttl;
    if ns.default_ttl > ferrospike_engine::types::MAX_TTL_SECS {
        return Err(bad(key("default-ttl"), "more than 10 years"));
    }
    if let Some(w) = &st.write_block_size {
        let w = w.bytes(&skey("write-block-size"))?;
        e.wblock_bytes = u32::try_from(w).map_err(|_| bad(skey("write-block-size"), "too large"))?;
    }
    if let Some(v) = st.flush_max_ms {
        e.flush_max_ms = v;
    }
    if let Some(v) = st.commit_to_device {
        e.commit_to_device = v;
    }
    if let Some(v) = &st.post_write_cache {
        e.post_write_cache_bytes = v.bytes(&skey("post-write-cache"))?;
    }
    if let Some(v) = &st.max_write_cache {
        e.max_write_cache_bytes = v.bytes(&skey("max-write-cache"))?;
    }
    e.nsup_period_secs = ns.nsup_period as u64;
    if let Some(v) = st.defrag_lwm_pct {
        e.defrag_lwm_pct = v;
    }
    if let Some(v) = st.defrag_sleep {
        e.defrag_sleep_us = v;
    }
    if let Some(v) = st.stop_writes_avail_pct {
        e.stop_writes_avail_pct = v;
    }
    e.validate().map_err(|err| match err {
        ferrospike_engine::EngineError::Config { key: k, reason } => {
            let k = if k == "name" { key("name") } else { skey(&k) };
            bad(k, reason)
        }
        other => bad(key("storage"), other.to_string()),
    })?;

    let mut devices = Vec::new();
    match (st.devices.is_empty(), st.files.is_empty()) {
        (true, true) => return Err(bad(skey("devices"), "give devices = [...] or files = [...]")),
        (false, false) => return Err(bad(skey("files"), "give either devices or files, not both")),
        (false, true) => {
            if st.file_size.is_some() {
                return Err(bad(skey("file-size"), "applies to files, not devices"));
            }
            devices.extend(st.devices.into_iter().map(|path| DeviceSpec { path, file_size: None }));
        }
        (true, false) => {
            let size = st
                .file_size
                .as_ref()
                .ok_or_else(|| bad(skey("file-size"), "is required with files"))?
                .bytes(&skey("file-size"))?;
            if size < e.wblock_bytes as u64 * 16 {
                return Err(bad(skey("file-size"), format!("{size} bytes is less than 16 write blocks")));
            }
            devices.extend(st.files.into_iter().map(|path| DeviceSpec { path, file_size: Some(size) }));
        }
    }
    Ok(NamespaceConfig { engine: e, devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.service.port, 3000);
        assert_eq!(c.service.address, "127.0.0.1");
        assert_eq!(c.service.max_msg_bytes, 16 << 20);
        assert_eq!(c.namespaces[0].engine.namespace, "test");
        assert_eq!(c.namespaces[0].devices[0].file_size, Some(4 << 30));
        assert!(c.service.connection_affinity);
        assert_eq!(c.namespaces[0].engine.spin_us, 200);
        assert!(
            !Config::parse(&DEFAULT_CONFIG.replace("[service]\n", "[service]\nconnection-affinity = false\n"))
                .unwrap()
                .service
                .connection_affinity
        );
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../config/ferrospike-raw-devices.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.service.shards, 8);
        assert_eq!(c.namespaces[0].devices.len(), 2);
    }

    #[test]
    fn issue_example_parses() {
        let c = Config::parse(
            r#"
            [service]
            address = "127.0.0.1"
            port = 3100
            shards = 2
            [[namespaces]]
            name = "test"
            default-ttl = 0
            nsup-period = 120
            [namespaces.storage]
            devices = ["/dev/nvme0n1"]
            write-block-size = "1M"
            defrag-lwm-pct = 50
            flush-max-ms = 1000
            commit-to-device = true
            post-write-cache = "64M"
            stop-writes-avail-pct = 5
            "#,
        )
        .unwrap();
        let ns = &c.namespaces[0];
        assert!(ns.engine.commit_to_device);
        assert_eq!(ns.engine.shards, 2);
        assert_eq!(ns.devices[0].file_size, None);
        assert_eq!(ns.engine.defrag_lwm_pct, 50);
        assert_eq!(ns.engine.stop_writes_avail_pct, 5);
        assert_eq!(ns.engine.nsup_period_secs, 120);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_the_key() {
        let base = "[[namespaces]]\nname = \"test\"\n[namespaces.storage]\nfiles = [\"x\"]\n";
        assert!(err(&format!("{base}file-size = \"4X\"")).contains("namespaces[0].storage.file-size"));
        assert!(err(&format!("{base}file-size = \"4G\"\nwrite-block-size = \"3M\"")).contains("write-block-size"));
        assert!(err(&format!("{base}file-size = \"4G\"\nbogus = 1")).contains("bogus"));
        assert!(err(base).contains("file-size: is required"));
        assert!(err("[service]\nport = 70000\n").contains("port"));
        assert!(err(&format!("[service]\nidle-spin-us = 200000\n{base}file-size = \"1G\""))
            .contains("service.idle-spin-us"));
        assert!(err("[service]\nmax-msg-size = \"1T\"\n[[namespaces]]\nname=\"t\"\n[namespaces.storage]\nfiles=[\"x\"]\nfile-size=\"1G\"")
            .contains("service.max-msg-size"));
    }
}
