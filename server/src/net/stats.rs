//! Front-end counters, reported by the info command `statistics`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct NetStats {
    pub connections_current: AtomicUsize,
    pub connections_opened: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections the shard front-end handed to a thread (for an info request, or a scan
    /// of another namespace).
    pub connections_handed_over: AtomicU64,
    /// Connections moved to the shard on the CPU their packets arrive on.
    pub connections_moved: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub frames_too_large: AtomicU64,
    pub request_deadline_expired: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub info_requests: AtomicU64,
    pub single_requests: AtomicU64,
    pub batch_requests: AtomicU64,
    pub scan_requests: AtomicU64,
    pub error_replies: AtomicU64,
}

impl NetStats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn list(&self) -> Vec<(String, String)> {
        let g = |n: &str, v: u64| (n.to_string(), v.to_string());
        vec![
            g("client_connections", self.connections_current.load(Relaxed) as u64),
            g("client_connections_opened", self.connections_opened.load(Relaxed)),
            g("client_connections_refused", self.connections_refused.load(Relaxed)),
            g("client_connections_handed_over", self.connections_handed_over.load(Relaxed)),
            g("client_connections_moved", self.connections_moved.load(Relaxed)),
            g("proto_malformed", self.frames_malformed.load(Relaxed)),
            g("proto_too_large", self.frames_too_large.load(Relaxed)),
            g("proto_request_deadline_expired", self.request_deadline_expired.load(Relaxed)),
            g("proto_idle_timeouts", self.idle_timeouts.load(Relaxed)),
            g("info_requests", self.info_requests.load(Relaxed)),
            g("single_requests", self.single_requests.load(Relaxed)),
            g("batch_requests", self.batch_requests.load(Relaxed)),
            g("scan_requests", self.scan_requests.load(Relaxed)),
            g("error_replies", self.error_replies.load(Relaxed)),
        ]
    }
}
