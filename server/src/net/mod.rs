//! The network front-end.
//!
//! With `front-end = "shards"` (the default) every shard of the first namespace runs a
//! `ShardNet` in its loop (see `shard_net.rs`): it accepts, receives and sends through the
//! shard's io_uring, refusing connections beyond `max-connections` and spreading them so
//! that each shard serves as many. Info requests, which may wait on the whole engine, move
//! their connection to a thread of its own running `conn.rs`.
//!
//! `conn.rs` is the blocking front-end, and with `front-end = "threads"` an acceptor thread
//! gives every connection one: a thread reads whole frames into a buffer that grows only as bytes arrive,
//! decodes every complete frame, submits single-record commands to the owning shard
//! (`Engine::submit`, up to `max-inflight` at once, so pipelined requests overlap) and writes
//! the responses back in request order; batches and scans stream their responses.

mod conn;
mod shard_net;
mod stats;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferrospike_engine::io::open_devices;
use ferrospike_engine::{Engine, EngineError};

use crate::config::{Config, ServiceConfig};
use crate::proto::info::{InfoSource, SetInfo};
pub use stats::NetStats;

/// Stack of a connection thread: decoding and encoding are iterative and small.
pub(crate) const CONN_STACK_BYTES: usize = 256 << 10;
/// How long shutdown waits for connections to finish their requests.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How often `Server::run` looks whether it was asked to stop, while the shards serve.
const STOP_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("namespace {namespace}: {source}")]
    Engine { namespace: String, source: EngineError },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One namespace and its engine.
pub struct Namespace {
    pub name: String,
    pub engine: Engine,
}

/// State every connection thread shares.
pub struct Shared {
    pub cfg: ServiceConfig,
    pub namespaces: Vec<Namespace>,
    pub stats: NetStats,
    pub node_id: String,
    pub stopping: AtomicBool,
    pub started: Instant,
    /// The shards' front-ends, in shard order (empty with `front-end = "threads"`).
    pub(crate) inboxes: Vec<Arc<shard_net::Inbox>>,
    /// The listening socket the shards accept on (None with `front-end = "threads"`). The
    /// `Server` owns it and keeps it open until the engines have stopped.
    pub(crate) listener_fd: Option<std::os::fd::RawFd>,
}

impl Shared {
    pub fn engine(&self, ns: &str) -> Option<&Engine> {
        self.namespaces.iter().find(|n| n.name == ns).map(|n| &n.engine)
    }
}

impl InfoSource for Shared {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn service(&self) -> (&str, u16) {
        (&self.cfg.address, self.cfg.port)
    }

    fn cluster_name(&self) -> Option<&str> {
        self.cfg.cluster_name.as_deref()
    }

    fn namespaces(&self) -> Vec<String> {
        self.namespaces.iter().map(|n| n.name.clone()).collect()
    }

    fn namespace_stats(&self, ns: &str) -> Option<Vec<(String, String)>> {
        let n = self.namespaces.iter().find(|n| n.name == ns)?;
        let s = n.engine.stats();
        let c = n.engine.config();
        let kv = |k: &str, v: String| (k.to_string(), v);
        Some(vec![
            kv("ns_cluster_size", "1".into()),
            kv("effective_replication_factor", "1".into()),
            kv("objects", s.records.to_string()),
            kv("tombstones", s.tombstones.to_string()),
            kv("index_used_bytes", s.index_bytes.to_string()),
            kv("index_bytes_per_record", format!("{:.1}", s.index_bytes_per_record)),
            kv("free_wblocks", s.free_wblocks.to_string()),
            kv("total_wblocks", s.total_wblocks.to_string()),
            kv("device_available_pct", pct(s.free_wblocks, s.total_wblocks)),
            kv("device_reads", s.device_reads.to_string()),
            kv("device_read_bytes", s.device_read_bytes.to_string()),
            kv("device_writes", s.device_writes.to_string()),
            kv("device_write_bytes", s.device_write_bytes.to_string()),
            kv("cache_read_hits", s.cache_hits.to_string()),
            kv("cache_read_misses", s.cache_misses.to_string()),
            kv("update_reads_skipped", s.update_reads_skipped.to_string()),
            kv("writes_held_for_space", s.writes_held_for_space.to_string()),
            kv("read_errors", s.read_errors.to_string()),
            kv("write_errors", s.write_errors.to_string()),
            kv("stop_writes", (s.read_only || s.avail_pct < c.stop_writes_avail_pct as f64).to_string()),
            kv("read_only", s.read_only.to_string()),
            kv("defrag_q", s.defrag_queue.to_string()),
            kv("defrag_reads", s.defrag_reads.to_string()),
            kv("defrag_read_errors", s.defrag_read_errors.to_string()),
            kv("defrag_outputs_sealed_early", s.defrag_outputs_sealed_early.to_string()),
            kv("defrag_writes", s.defrag_writes.to_string()),
            kv("defrag_read_bytes", s.defrag_read_bytes.to_string()),
            kv("defrag_write_bytes", s.defrag_write_bytes.to_string()),
            kv("client_write_bytes", s.client_write_bytes.to_string()),
            kv("write_amplification", format!("{:.2}", s.write_amplification)),
            kv("expired_objects", s.expired.to_string()),
            kv("evicted_objects", s.evicted.to_string()),
            kv("tombstones_dropped", s.tombstones_dropped.to_string()),
            kv("free_wblocks_scrubbed", s.free_wblocks_scrubbed.to_string()),
            kv("wblock_reuses_held", s.wblock_reuses_held.to_string()),
            kv("defrag-lwm-pct", c.defrag_lwm_pct.to_string()),
            kv("stop-writes-avail-pct", c.stop_writes_avail_pct.to_string()),
            kv("nsup-period", c.nsup_period_secs.to_string()),
            kv("default-ttl", c.default_ttl_secs.to_string()),
            kv("write-block-size", c.wblock_bytes.to_string()),
            kv("commit-to-device", c.commit_to_device.to_string()),
            kv("flush-max-ms", c.flush_max_ms.to_string()),
            kv("replication-factor", "1".into()),
            kv("strong-consistency", "false".into()),
            kv("shards", s.shards.to_string()),
        ])
    }

    fn statistics(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("cluster_size".to_string(), "1".to_string()),
            ("uptime".to_string(), self.started.elapsed().as_secs().to_string()),
        ];
        let (mut objects, mut tombstones, mut index_bytes, mut free, mut total) = (0, 0, 0, 0, 0);
        let (mut reads, mut writes, mut hits) = (0, 0, 0);
        for n in &self.namespaces {
            let s = n.engine.stats();
            objects += s.records;
            tombstones += s.tombstones;
            index_bytes += s.index_bytes;
            free += s.free_wblocks;
            total += s.total_wblocks;
            reads += s.device_reads;
            writes += s.device_writes;
            hits += s.cache_hits;
        }
        // Index bytes per record over all namespaces, as each namespace reports it: the
        // index's own bytes (maps included) over the entries it holds, tombstones too.
        let entries = objects + tombstones;
        let per_record = if entries == 0 { 0.0 } else { index_bytes as f64 / entries as f64 };
        v.push(("objects".into(), objects.to_string()));
        v.push(("tombstones".into(), tombstones.to_string()));
        v.push(("index_used_bytes".into(), index_bytes.to_string()));
        v.push(("index_bytes_per_record".into(), format!("{per_record:.1}")));
        v.push(("free_wblocks".into(), free.to_string()));
        v.push(("total_wblocks".into(), total.to_string()));
        v.push(("device_reads".into(), reads.to_string()));
        v.push(("device_writes".into(), writes.to_string()));
        v.push(("cache_read_hits".into(), hits.to_string()));
        v.extend(self.stats.list());
        if !self.inboxes.is_empty() {
            let per_shard: Vec<String> = self.inboxes.iter().map(|i| i.connections().to_string()).collect();
            v.push(("client_connections_per_shard".into(), per_shard.join(",")));
            let cpus: Vec<String> =
                self.inboxes.iter().map(|i| i.cpu().map_or_else(|| "none".into(), |c| c.to_string())).collect();
            v.push(("shard_cpus".into(), cpus.join(",")));
        }
        v
    }

    fn sets(&self) -> Vec<SetInfo> {
        let mut out = Vec::new();
        for n in &self.namespaces {
            for s in n.engine.stats().sets {
                out.push(SetInfo {
                    namespace: n.name.clone(),
                    set: s.name,
                    objects: s.records,
                    truncate_lut_ms: s.truncate_before_ms,
                });
            }
        }
        out
    }

    fn truncate(&self, ns: &str, set: Option<&str>, before_ms: Option<u64>) -> Result<(), String> {
        let engine = self.engine(ns).ok_or_else(|| format!("ERROR:20:namespace {ns} not found"))?;
        match engine.truncate(set, before_ms) {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!("truncate of namespace {ns} set {set:?} refused: {e}");
                Err(format!("ERROR:4:{e}"))
            }
        }
    }
}

fn pct(a: u64, b: u64) -> String {
    (a * 100).checked_div(b).unwrap_or(0).to_string()
}

/// A stable node id: upper-case hex without leading zeros, as the real server prints it.
fn node_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // FNV-1a over the host name: stable across restarts, different across hosts.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.trim().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("BB9{:08X}{:04X}", h as u32, port)
}

/// A running server: engines open, listener bound.
pub struct Server {
    shared: Arc<Shared>,
    /// Taken by `run` once the engines, whose shards accept on it, have stopped; a server
    /// dropped without `run` leaks it (see `Drop`).
    listener: Option<TcpListener>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(l) = self.listener.take() else { return };
        if self.shared.listener_fd.is_some() {
            // The shards may still name the descriptor in an accept (the engines were never
            // shut down): stop them accepting and never close it, so that its number cannot
            // be reused under them.
            self.stop_handle().stop();
            std::mem::forget(l);
        }
    }
}

/// A handle that stops a running server from another thread (the signal thread).
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
    listener_fd: i32,
}

impl StopHandle {
    pub fn stop(&self) {
        if !self.shared.stopping.swap(true, SeqCst) {
            tracing::info!("stopping: no new connections; finishing requests in flight");
            // SAFETY: shutdown(2) involves no memory of ours, whatever the descriptor. It is
            // still the listener's: a server dropped without `run` never closes it, and
            // `Server::run` closes it only after seeing `stopping` (set by the swap just
            // above), waiting for connections to drain and shutting the engines down. It
            // ends the blocked or armed accepts.
            unsafe {
                libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
            }
        }
    }
}

impl Server {
    /// Open every namespace's devices and engine, then bind the listener.
    pub fn start(cfg: Config) -> Result<Server, ServerError> {
        let mut namespaces = Vec::new();
        let late: Arc<OnceLock<Arc<Shared>>> = Arc::new(OnceLock::new());
        let mut inboxes = Vec::new();
        for ns in cfg.namespaces {
            let name = ns.engine.namespace.clone();
            let err = |source: EngineError| ServerError::Engine { namespace: name.clone(), source };
            for d in &ns.devices {
                if d.file_size.is_some() {
                    if let Some(dir) = d.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir)?;
                    }
                }
            }
            let c = &ns.engine;
            tracing::info!(
                "namespace {name}: write-block-size {} KiB, commit-to-device {}, flush-max-ms {}, post-write-cache {} MiB, \
                 defrag-lwm-pct {}, stop-writes-avail-pct {}, nsup-period {} s, default-ttl {} s",
                c.wblock_bytes >> 10,
                c.commit_to_device,
                c.flush_max_ms,
                c.post_write_cache_bytes >> 20,
                c.defrag_lwm_pct,
                c.stop_writes_avail_pct,
                c.nsup_period_secs,
                c.default_ttl_secs
            );
            let devices = open_devices(&ns.devices, ns.engine.ring_entries).map_err(|e| err(e.into()))?;
            tracing::info!("namespace {name}: {}", devices.describe());
            // The first namespace's shards also serve the network.
            let mut hooks: Vec<Box<dyn ferrospike_engine::hook::ShardHook>> = Vec::new();
            if cfg.service.shard_front_end && namespaces.is_empty() {
                for i in 0..ns.engine.shards {
                    let (net, inbox) = shard_net::ShardNet::new(late.clone(), &name, i)?;
                    hooks.push(Box::new(net));
                    inboxes.push(inbox);
                }
            }
            let engine = Engine::open_with_hooks(ns.engine, Arc::new(devices), hooks).map_err(err)?;
            namespaces.push(Namespace { name, engine });
        }
        let addr = format!("{}:{}", cfg.service.address, cfg.service.port);
        let sa: SocketAddr = addr.parse().map_err(|e| ServerError::Bind {
            addr: addr.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")),
        })?;
        let listener = TcpListener::bind(sa).map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
        let port = listener.local_addr()?.port();
        let mut service = cfg.service;
        service.port = port;
        tracing::info!(
            "listening on {}:{port}: front-end {}, max-connections {}, max-msg-size {}, request-deadline-ms {}, idle-timeout-secs {}",
            service.address,
            if service.shard_front_end {
                format!("inside the {} shard loops (accept, receive, send on their io_urings)", inboxes.len())
            } else {
                "one thread per connection".to_string()
            },
            service.max_connections,
            service.max_msg_bytes,
            service.request_deadline_ms,
            service.idle_timeout_secs
        );
        let shared = Arc::new(Shared {
            node_id: node_id(port),
            cfg: service,
            namespaces,
            stats: NetStats::default(),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            listener_fd: (!inboxes.is_empty()).then(|| listener.as_raw_fd()),
            inboxes,
        });
        // From here the shards accept on the listener.
        let _ = late.set(shared.clone());
        // A shard arms its accept on its next turn: wake the sleeping ones.
        for i in &shared.inboxes {
            i.wake();
        }
        Ok(Server { shared, listener: Some(listener) })
    }

    pub fn stop_handle(&self) -> StopHandle {
        let fd = self.listener.as_ref().map_or(-1, |l| l.as_raw_fd());
        StopHandle { shared: self.shared.clone(), listener_fd: fd }
    }

    pub fn local_port(&self) -> u16 {
        self.shared.cfg.port
    }

    /// Serve until stopped (accepting here with `front-end = "threads"`; the shards accept
    /// for themselves otherwise), then let connections finish and shut the engines down
    /// (flush, mark devices clean).
    pub fn run(mut self) -> Result<(), ServerError> {
        let listener = self.listener.take().expect("a server runs once");
        let sh = &self.shared;
        while sh.listener_fd.is_some() && !sh.stopping.load(SeqCst) {
            std::thread::sleep(STOP_POLL);
        }
        while sh.listener_fd.is_none() {
            match listener.accept() {
                Ok((sock, peer)) => {
                    if sh.stopping.load(SeqCst) {
                        break;
                    }
                    self.spawn_connection(sock, peer);
                }
                Err(e) => {
                    if sh.stopping.load(SeqCst) {
                        break;
                    }
                    tracing::warn!("accept failed: {e}");
                    // Out of descriptors or memory: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        while sh.stats.connections_current.load(SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = sh.stats.connections_current.load(SeqCst);
        if left > 0 {
            tracing::warn!("{left} connections still open after {DRAIN_WAIT:?}; shutting down anyway");
        }
        let mut result = Ok(());
        for ns in &sh.namespaces {
            if let Err(e) = ns.engine.shutdown() {
                tracing::error!("namespace {}: shutdown failed: {e}", ns.name);
                result = Err(ServerError::Engine { namespace: ns.name.clone(), source: e });
            }
        }
        // Only now, with the shards stopped, may the listener's descriptor be closed.
        drop(listener);
        tracing::info!("stopped");
        result
    }

    fn spawn_connection(&self, sock: std::net::TcpStream, peer: SocketAddr) {
        let sh = &self.shared;
        let n = sh.stats.connections_current.fetch_add(1, SeqCst);
        if n >= sh.cfg.max_connections {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            NetStats::bump(&sh.stats.connections_refused);
            tracing::debug!("refusing {peer}: {} connections open", n);
            return; // dropping the socket closes it
        }
        NetStats::bump(&sh.stats.connections_opened);
        let shared = sh.clone();
        let spawned = std::thread::Builder::new().name("conn".into()).stack_size(CONN_STACK_BYTES).spawn(move || {
            conn::serve(sock, peer, &shared, Vec::new());
            shared.stats.connections_current.fetch_sub(1, SeqCst);
        });
        if let Err(e) = spawned {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            NetStats::bump(&sh.stats.connections_refused);
            tracing::warn!("cannot start a thread for {peer}: {e}");
        }
    }
}
