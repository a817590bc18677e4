//! Code that runs inside a shard's loop: the server's network front-end.
//!
//! A [`ShardHook`] is handed to the engine at start-up, one per shard, and from then on runs
//! on that shard's thread: the shard calls [`ShardHook::turn`] once per loop turn. Sockets go
//! through the shard's own io_uring: [`HookCtx::push_sock`] queues a receive, send or accept,
//! which reaches the kernel with the shard's next ring submission (one `io_uring_enter` per
//! turn carries the device I/O and every socket operation of the turn, unless they overflow
//! the submission queue), and its completion wakes a sleeping shard and is handed to the next
//! turn ([`HookCtx::take_sock_completions`]).
//!
//! Commands a hook submits through [`HookCtx::submit`] run in the same turn when the shard
//! owns the digest's partition (together, at [`HookCtx::run_submitted`] or the turn's end);
//! the others are collected per destination shard and handed over in one message per
//! destination, at [`HookCtx::run_submitted`] (before the shard runs its own) and at the
//! turn's end, without ever blocking (a full destination channel keeps the batch for the
//! next turn). Callbacks run on the shard that executes the command;
//! a hook gets its answers back through a channel of its own and the [`Doorbell`] it is
//! given at start, which wakes its shard when it sleeps.

use std::sync::Arc;

use crate::api::{Command, Reply, ScanPage};
use crate::io::{Doorbell, SockCompletion, SockId, SockRequest};
use crate::shard::{ScanReq, Shard};
use crate::types::{Digest, ResultCode};

/// Code run by one shard's loop. Everything here runs on the shard thread and must never
/// block: no waiting on the engine (`Engine::execute`, `stats`, `scan_partition`, ...).
pub trait ShardHook: Send {
    /// Called once on the shard thread before the first turn, with the shard's doorbell.
    fn start(&mut self, doorbell: Arc<Doorbell>);

    /// One turn of work. Returns true when it did something (the shard then does not sleep
    /// before the next turn).
    fn turn(&mut self, ctx: &mut HookCtx<'_>) -> bool;

    /// Whether something is queued for the hook that its ring does not report (replies
    /// from other threads, say). Checked after the shard announces it will sleep,
    /// so whoever queued it before the announcement, and therefore did not ring the
    /// doorbell, is not missed.
    fn pending(&self) -> bool {
        false
    }
}

/// What a hook can do with its shard during a turn.
pub struct HookCtx<'a> {
    pub(crate) shard: &'a mut Shard,
}

impl HookCtx<'_> {
    /// This shard's number.
    pub fn shard_id(&self) -> usize {
        self.shard.id()
    }

    /// The shard that owns a digest's partition (commands for it submitted here run in this
    /// turn when that is this shard; see [`HookCtx::run_submitted`]).
    pub fn shard_of(&self, d: &Digest) -> usize {
        self.shard.owner_of(d)
    }

    /// Run a command on the shard that owns its digest; `cb` gets the reply on that shard's
    /// thread. A command this shard owns runs at [`HookCtx::run_submitted`] or the end of
    /// the turn, in the order submitted; its callback may run then, or later when the
    /// record has to be read from the device.
    pub fn submit(&mut self, cmd: Command, cb: impl FnOnce(Reply) + Send + 'static) {
        self.shard.submit_from_hook(cmd, Box::new(cb));
    }

    /// Run the commands submitted so far that this shard owns. [`HookCtx::submit`] queues
    /// them (looking their memory up together is cheaper than one at a time); a hook calls
    /// this once it has submitted what it has, before it looks for their answers. Whatever
    /// is left runs when the turn ends.
    ///
    /// The commands other shards own are handed to them first, so that they run there
    /// while this shard runs its own: their answers can then come back in time for the
    /// hook to send them in this turn, rather than a turn later.
    pub fn run_submitted(&mut self) {
        self.shard.hand_over_forwards();
        self.shard.run_local();
    }

    /// Up to `max` live records of partition `pid` after `after` (only of `set` when
    /// given), from the shard that owns the partition; `cb` gets the page on that shard's
    /// thread. Like [`crate::Engine::scan_partition`], without waiting.
    pub fn scan(
        &mut self,
        pid: u16,
        set: Option<&str>,
        after: Option<Digest>,
        max: usize,
        with_bins: bool,
        cb: impl FnOnce(ScanPage) + Send + 'static,
    ) {
        // A scan starts at once: what was submitted before it runs first, so that the page
        // reflects it (and a set only a queued write introduces is known).
        self.shard.run_local();
        let set = match set {
            None => None,
            Some(name) => match self.shard.set_id_of(name) {
                Some(id) => Some(id),
                // No record of this set was ever seen: nothing to scan.
                None => return cb(ScanPage { result: ResultCode::Ok, records: Vec::new(), done: true }),
            },
        };
        self.shard.scan_from_hook(ScanReq { pid, set, after, max, with_bins }, Box::new(cb));
    }

    /// Whether socket operations run on this shard's ring (always with the io_uring
    /// backend; with the simulated one they complete at once with `Unsupported`).
    pub fn sockets(&self) -> bool {
        self.shard.io.sockets()
    }

    /// Queue a socket operation on this shard's ring; it reaches the kernel with the
    /// shard's next submission, and its completion comes back through
    /// [`HookCtx::take_sock_completions`] in a later turn. The descriptor must stay open
    /// until then.
    pub fn push_sock(&mut self, req: SockRequest) -> SockId {
        self.shard.io.push_sock(req)
    }

    /// End a socket operation early (see [`crate::io::IoBackend::cancel_sock`]).
    pub fn cancel_sock(&mut self, id: SockId) {
        self.shard.io.cancel_sock(id)
    }

    /// Move the socket operations completed since the previous turn into `out`.
    pub fn take_sock_completions(&mut self, out: &mut Vec<SockCompletion>) {
        out.append(&mut self.shard.sock_done);
    }

    /// Commands waiting for room in another shard's channel. A hook should stop taking new
    /// requests while this is large.
    pub fn forward_backlog(&self) -> usize {
        self.shard.forward_backlog()
    }
}
