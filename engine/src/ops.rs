//! Aerospike's single-record semantics as a pure function: given a command and the current
//! record (if any), decide the reply and the record to store. No I/O here, so it is tested
//! directly against a model.

use crate::api::{Command, ExistsAction, GenPolicy, Op, OpResult, Reply, Ttl};
use crate::types::{Bin, ResultCode, Value, MAX_BIN_NAME_BYTES};

/// The record as it stands before the command.
#[derive(Clone, Debug, PartialEq)]
pub struct Current {
    pub generation: u16,
    pub void_time: u32,
    pub key: Option<Vec<u8>>,
    pub bins: Vec<Bin>,
}

/// What the shard must do.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Nothing to store; send the reply.
    Reply(Reply),
    /// Store this new version of the record, then send the reply.
    Store { generation: u16, void_time: u32, key: Option<Vec<u8>>, bins: Vec<Bin>, reply: Reply },
    /// Write a tombstone, then send the reply.
    Delete { reply: Reply },
}

/// Does applying `cmd` need the current record's bins (not only its metadata)?
pub fn needs_bins(cmd: &Command) -> bool {
    if cmd.header_only && !cmd.is_write() {
        return false;
    }
    if cmd.delete {
        return false;
    }
    if cmd.read_all || cmd.ops.iter().any(|o| matches!(o, Op::Read(_))) {
        return true;
    }
    // A write that replaces the whole record does not need the old bins.
    let replaces = matches!(cmd.exists, ExistsAction::CreateOrReplace | ExistsAction::ReplaceOnly);
    cmd.is_write() && !replaces
}

/// Whether a write to an existing record of `generation` fails whatever the record's bins
/// are: its generation check does not hold, or it may only create. [`apply`] then fails
/// before it looks at a bin, provided the stored key need not be compared with a sent one
/// first (the caller rules that out), so the record need not be read.
pub fn fails_on_meta(cmd: &Command, generation: u16) -> bool {
    if !cmd.is_write() {
        return false;
    }
    // A delete fails only on its generation (`apply` answers it before the exists policy);
    // the shard never asks for one, as a delete reads no bins.
    !generation_holds(cmd.generation, generation as u32)
        || (!cmd.delete && matches!(cmd.exists, ExistsAction::CreateOnly))
}

/// Whether a write with generation policy `policy` may apply to a record of generation
/// `current` (0 for a missing record).
fn generation_holds(policy: GenPolicy, current: u32) -> bool {
    match policy {
        GenPolicy::None => true,
        GenPolicy::Eq(want) => want == current,
        GenPolicy::Gt(above) => above > current,
    }
}

/// Seconds since the Citrusleaf epoch plus `ttl`, saturating.
fn void_after(now: u32, secs: u32) -> u32 {
    now.saturating_add(secs)
}

fn next_generation(g: u16) -> u16 {
    if g == u16::MAX {
        1
    } else {
        g + 1
    }
}

/// Apply `cmd` to `cur` (None = no live record) at time `now` (Citrusleaf seconds).
pub fn apply(cmd: &Command, cur: Option<&Current>, now: u32, default_ttl: u32) -> Outcome {
    let fail = |rc| Outcome::Reply(Reply::error(rc));
    if !cmd.is_write() {
        return Outcome::Reply(read(cmd, cur.cloned()));
    }
    if bin_name_too_long(cmd) {
        return fail(ResultCode::BinName);
    }

    // Writes.
    let replaces = matches!(cmd.exists, ExistsAction::CreateOrReplace | ExistsAction::ReplaceOnly);
    if !cmd.delete && cmd.ops.is_empty() {
        return fail(ResultCode::Parameter);
    }
    if replaces
        && cmd.ops.iter().any(|o| {
            matches!(o, Op::Incr(..) | Op::Append(..) | Op::Prepend(..) | Op::Touch | Op::DeleteAll)
                || matches!(o, Op::Write(_, Value::Nil))
        })
    {
        return fail(ResultCode::Parameter);
    }
    if let (Some(sent), Some(c)) = (&cmd.key, cur) {
        if let Some(stored) = &c.key {
            if stored != sent {
                return fail(ResultCode::KeyMismatch);
            }
        }
    }
    if !generation_holds(cmd.generation, cur.map_or(0, |c| c.generation as u32)) {
        return fail(ResultCode::Generation);
    }
    if cmd.delete {
        return match cur {
            None => fail(ResultCode::NotFound),
            Some(_) => Outcome::Delete { reply: Reply::error(ResultCode::Ok) },
        };
    }
    match (cmd.exists, cur) {
        (ExistsAction::CreateOnly, Some(_)) => return fail(ResultCode::RecordExists),
        (ExistsAction::UpdateOnly | ExistsAction::ReplaceOnly, None) => return fail(ResultCode::NotFound),
        _ => {}
    }
    if cur.is_none() && cmd.ops.iter().any(|o| matches!(o, Op::Touch)) {
        return fail(ResultCode::NotFound);
    }

    let mut bins: Vec<Bin> = match cur {
        Some(c) if !replaces => c.bins.clone(),
        _ => Vec::new(),
    };
    let mut results = Vec::new();
    for op in &cmd.ops {
        match op {
            Op::Read(name) => {
                if name.is_empty() {
                    // An empty-name read is "all bins"; handled by read_all below.
                    continue;
                }
                match bins.iter().find(|b| &b.name == name) {
                    Some(b) => results.push(OpResult { name: name.clone(), value: b.value.clone() }),
                    None if cmd.respond_all_ops => results.push(OpResult { name: name.clone(), value: Value::Nil }),
                    None => {}
                }
                continue;
            }
            Op::Write(name, Value::Nil) => bins.retain(|b| &b.name != name),
            Op::Write(name, v) => set_bin(&mut bins, name, v.clone()),
            Op::Incr(name, v) => {
                let new = match (bins.iter().find(|b| &b.name == name).map(|b| &b.value), v) {
                    (None, Value::Int(_) | Value::Float(_)) => v.clone(),
                    (Some(Value::Int(a)), Value::Int(b)) => Value::Int(a.wrapping_add(*b)),
                    (Some(Value::Float(a)), Value::Float(b)) => Value::Float(a + b),
                    _ => return fail(ResultCode::IncompatibleType),
                };
                set_bin(&mut bins, name, new);
            }
            Op::Append(name, v) | Op::Prepend(name, v) => {
                let append = matches!(op, Op::Append(..));
                let new = match (bins.iter().find(|b| &b.name == name).map(|b| &b.value), v) {
                    (None, Value::Str(_) | Value::Blob(_)) => v.clone(),
                    (Some(Value::Str(a)), Value::Str(b)) => Value::Str(concat(a, b, append)),
                    (Some(Value::Blob(a)), Value::Blob(b)) => Value::Blob(concat(a, b, append)),
                    _ => return fail(ResultCode::IncompatibleType),
                };
                set_bin(&mut bins, name, new);
            }
            Op::Touch => {}
            Op::DeleteAll => bins.clear(),
        }
        if cmd.respond_all_ops {
            results.push(OpResult { name: op.bin_name().to_string(), value: Value::Nil });
        }
    }

    if bins.is_empty() {
        // A write that leaves no bins deletes the record.
        return match cur {
            Some(_) => {
                Outcome::Delete { reply: Reply { result: ResultCode::Ok, generation: 0, void_time: 0, bins: results } }
            }
            None => Outcome::Reply(Reply { result: ResultCode::Ok, generation: 0, void_time: 0, bins: results }),
        };
    }

    let generation = cur.map_or(1, |c| next_generation(c.generation));
    let void_time = match cmd.ttl {
        Ttl::NamespaceDefault if default_ttl == 0 => 0,
        Ttl::NamespaceDefault => void_after(now, default_ttl),
        Ttl::Never => 0,
        Ttl::Keep => cur.map_or(0, |c| c.void_time),
        Ttl::Secs(n) => void_after(now, n),
    };
    if cmd.read_all {
        results.extend(bins.iter().map(|b| OpResult { name: b.name.clone(), value: b.value.clone() }));
    }
    let key = cmd.key.clone().or_else(|| cur.and_then(|c| c.key.clone()));
    Outcome::Store {
        generation,
        void_time,
        key,
        bins,
        reply: Reply { result: ResultCode::Ok, generation, void_time, bins: results },
    }
}

/// The reply of a command that does not write ([`Command::is_write`] false), taking what it
/// returns from `cur` (no copy of the values when it returns every bin). The same answer
/// as [`apply`] gives.
pub fn read(cmd: &Command, cur: Option<Current>) -> Reply {
    if bin_name_too_long(cmd) {
        return Reply::error(ResultCode::BinName);
    }
    let Some(c) = cur else {
        return Reply::error(ResultCode::NotFound);
    };
    let mut reply =
        Reply { result: ResultCode::Ok, generation: c.generation, void_time: c.void_time, bins: Vec::new() };
    if cmd.header_only {
        return reply;
    }
    let named: Vec<&str> =
        cmd.ops.iter().filter_map(|o| if let Op::Read(n) = o { Some(n.as_str()) } else { None }).collect();
    if cmd.read_all || named.iter().any(|n| n.is_empty()) {
        reply.bins = c.bins.into_iter().map(|b| OpResult { name: b.name, value: b.value }).collect();
    } else if named.is_empty() {
        return Reply::error(ResultCode::Parameter);
    } else {
        for n in named {
            match c.bins.iter().find(|b| b.name == n) {
                Some(b) => reply.bins.push(OpResult { name: n.to_string(), value: b.value.clone() }),
                None if cmd.respond_all_ops => reply.bins.push(OpResult { name: n.to_string(), value: Value::Nil }),
                None => {}
            }
        }
    }
    reply
}

fn bin_name_too_long(cmd: &Command) -> bool {
    cmd.ops.iter().any(|op| op.bin_name().len() > MAX_BIN_NAME_BYTES)
}

fn set_bin(bins: &mut Vec<Bin>, name: &str, v: Value) {
    match bins.iter_mut().find(|b| b.name == name) {
        Some(b) => b.value = v,
        None => bins.push(Bin { name: name.to_string(), value: v }),
    }
}

fn concat(a: &[u8], b: &[u8], append: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    if append {
        out.extend_from_slice(a);
        out.extend_from_slice(b);
    } else {
        out.extend_from_slice(b);
        out.extend_from_slice(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Command;
    use crate::types::Digest;

    const NOW: u32 = 1000;

    fn rec(gen: u16, bins: &[(&str, Value)]) -> Current {
        Current {
            generation: gen,
            void_time: 0,
            key: None,
            bins: bins.iter().map(|(n, v)| Bin::new(n, v.clone())).collect(),
        }
    }

    fn stored(o: &Outcome) -> (u16, u32, Vec<Bin>) {
        match o {
            Outcome::Store { generation, void_time, bins, .. } => (*generation, *void_time, bins.clone()),
            other => panic!("expected a store, got {other:?}"),
        }
    }

    fn rc(o: &Outcome) -> ResultCode {
        match o {
            Outcome::Reply(r) => r.result,
            Outcome::Store { reply, .. } | Outcome::Delete { reply } => reply.result,
        }
    }

    #[test]
    fn read_answers_as_apply_does() {
        let d = Digest::default();
        let cur = rec(3, &[("a", Value::Int(1)), ("b", Value::Blob(vec![7; 1536])), ("c", Value::Str(b"x".to_vec()))]);
        let long = "n".repeat(MAX_BIN_NAME_BYTES + 1);
        let cmds = [
            Command::get(d),
            Command::get_bins(d, &["c", "a", "c"]),
            Command::get_bins(d, &["a", "zz"]),
            Command { respond_all_ops: true, ..Command::get_bins(d, &["zz", "b"]) },
            Command::get_bins(d, &[""]),
            Command::get_bins(d, &[long.as_str()]),
            Command::exists(d),
            Command { ops: Vec::new(), ..Default::default() },
        ];
        for cmd in &cmds {
            for c in [Some(&cur), None] {
                let Outcome::Reply(want) = apply(cmd, c, NOW, 0) else { panic!("a read stores nothing") };
                assert_eq!(read(cmd, c.cloned()), want, "{cmd:?} on {c:?}");
            }
        }
    }

    #[test]
    fn put_merges_bins_and_bumps_generation() {
        let d = Digest::default();
        let cur = rec(1, &[("a", Value::Int(1)), ("b", Value::Int(2))]);
        let cmd = Command::put(d, "s", vec![Bin::new("b", Value::Int(3)), Bin::new("c", Value::Int(4))]);
        let (g, _, bins) = stored(&apply(&cmd, Some(&cur), NOW, 0));
        assert_eq!(g, 2);
        assert_eq!(
            bins,
            vec![Bin::new("a", Value::Int(1)), Bin::new("b", Value::Int(3)), Bin::new("c", Value::Int(4))]
        );
        let (g, _, _) = stored(&apply(&cmd, None, NOW, 0));
        assert_eq!(g, 1);
        let (g, _, _) = stored(&apply(&cmd, Some(&rec(u16::MAX, &[])), NOW, 0));
        assert_eq!(g, 1, "generation wraps to 1, never 0");
    }

    #[test]
    fn exists_actions() {
        let d = Digest::default();
        let cur = rec(1, &[("a", Value::Int(1))]);
        let put = |e| Command::put(d, "", vec![Bin::new("b", Value::Int(2))]).with_exists(e);
        assert_eq!(rc(&apply(&put(ExistsAction::CreateOnly), Some(&cur), NOW, 0)), ResultCode::RecordExists);
        assert_eq!(rc(&apply(&put(ExistsAction::CreateOnly), None, NOW, 0)), ResultCode::Ok);
        assert_eq!(rc(&apply(&put(ExistsAction::UpdateOnly), None, NOW, 0)), ResultCode::NotFound);
        assert_eq!(rc(&apply(&put(ExistsAction::ReplaceOnly), None, NOW, 0)), ResultCode::NotFound);
        let (_, _, bins) = stored(&apply(&put(ExistsAction::ReplaceOnly), Some(&cur), NOW, 0));
        assert_eq!(bins, vec![Bin::new("b", Value::Int(2))]);
        let (_, _, bins) = stored(&apply(&put(ExistsAction::CreateOrReplace), Some(&cur), NOW, 0));
        assert_eq!(bins, vec![Bin::new("b", Value::Int(2))]);
        let (_, _, bins) = stored(&apply(&put(ExistsAction::UpdateOnly), Some(&cur), NOW, 0));
        assert_eq!(bins.len(), 2);
        let bad =
            Command::operate(d, "", vec![Op::Incr("a".into(), Value::Int(1))]).with_exists(ExistsAction::ReplaceOnly);
        assert_eq!(rc(&apply(&bad, Some(&cur), NOW, 0)), ResultCode::Parameter);
    }

    #[test]
    fn generation_policies() {
        let d = Digest::default();
        let cur = rec(5, &[("a", Value::Int(1))]);
        let put = |g| Command::put(d, "", vec![Bin::new("a", Value::Int(2))]).with_generation(g);
        assert_eq!(rc(&apply(&put(GenPolicy::Eq(5)), Some(&cur), NOW, 0)), ResultCode::Ok);
        assert_eq!(rc(&apply(&put(GenPolicy::Eq(4)), Some(&cur), NOW, 0)), ResultCode::Generation);
        assert_eq!(rc(&apply(&put(GenPolicy::Gt(5)), Some(&cur), NOW, 0)), ResultCode::Generation);
        assert_eq!(rc(&apply(&put(GenPolicy::Gt(6)), Some(&cur), NOW, 0)), ResultCode::Ok);
        assert_eq!(rc(&apply(&put(GenPolicy::Eq(1)), None, NOW, 0)), ResultCode::Generation);
        assert_eq!(rc(&apply(&put(GenPolicy::Eq(0)), None, NOW, 0)), ResultCode::Ok);
    }

    #[test]
    fn ttl_rules() {
        let d = Digest::default();
        let mut cur = rec(1, &[("a", Value::Int(1))]);
        cur.void_time = 5000;
        let put = |t| Command::put(d, "", vec![Bin::new("a", Value::Int(2))]).with_ttl(t);
        assert_eq!(stored(&apply(&put(Ttl::NamespaceDefault), Some(&cur), NOW, 0)).1, 0);
        assert_eq!(stored(&apply(&put(Ttl::NamespaceDefault), Some(&cur), NOW, 60)).1, NOW + 60);
        assert_eq!(stored(&apply(&put(Ttl::Never), Some(&cur), NOW, 60)).1, 0);
        assert_eq!(stored(&apply(&put(Ttl::Keep), Some(&cur), NOW, 60)).1, 5000);
        assert_eq!(stored(&apply(&put(Ttl::Keep), None, NOW, 60)).1, 0);
        assert_eq!(stored(&apply(&put(Ttl::Secs(10)), Some(&cur), NOW, 60)).1, NOW + 10);
        assert_eq!(Ttl::from_wire(0xFFFF_FFFF), Ok(Ttl::Never));
        assert_eq!(Ttl::from_wire(0xFFFF_FFFE), Ok(Ttl::Keep));
        assert_eq!(Ttl::from_wire(0xFFFF_FFFD), Err(ResultCode::Parameter));
    }

    #[test]
    fn operate_results_in_order() {
        let d = Digest::default();
        let cur = rec(1, &[("i", Value::Int(6)), ("s", Value::Str(b"ab".to_vec()))]);
        let ops = vec![
            Op::Incr("i".into(), Value::Int(10)),
            Op::Read("i".into()),
            Op::Append("s".into(), Value::Str(b"!".to_vec())),
            Op::Prepend("s".into(), Value::Str(b"_".to_vec())),
            Op::Read("s".into()),
        ];
        let mut cmd = Command::operate(d, "", ops);
        let o = apply(&cmd, Some(&cur), NOW, 0);
        let Outcome::Store { reply, .. } = &o else { panic!() };
        assert_eq!(reply.bins.len(), 2);
        assert_eq!(reply.bins[0].value, Value::Int(16));
        assert_eq!(reply.bins[1].value, Value::Str(b"_ab!".to_vec()));
        cmd.respond_all_ops = true;
        let Outcome::Store { reply, .. } = apply(&cmd, Some(&cur), NOW, 0) else { panic!() };
        let vals: Vec<Value> = reply.bins.into_iter().map(|b| b.value).collect();
        assert_eq!(vals, vec![Value::Nil, Value::Int(16), Value::Nil, Value::Nil, Value::Str(b"_ab!".to_vec())]);
        let bad = Command::operate(d, "", vec![Op::Incr("s".into(), Value::Int(1))]);
        assert_eq!(rc(&apply(&bad, Some(&cur), NOW, 0)), ResultCode::IncompatibleType);
        let bad = Command::operate(d, "", vec![Op::Append("i".into(), Value::Str(b"x".to_vec()))]);
        assert_eq!(rc(&apply(&bad, Some(&cur), NOW, 0)), ResultCode::IncompatibleType);
    }

    #[test]
    fn deletes_and_touch() {
        let d = Digest::default();
        let cur = rec(3, &[("a", Value::Int(1))]);
        assert!(matches!(apply(&Command::delete(d), Some(&cur), NOW, 0), Outcome::Delete { .. }));
        assert_eq!(rc(&apply(&Command::delete(d), None, NOW, 0)), ResultCode::NotFound);
        assert_eq!(rc(&apply(&Command::touch(d, Ttl::Secs(5)), None, NOW, 0)), ResultCode::NotFound);
        let (g, v, _) = stored(&apply(&Command::touch(d, Ttl::Secs(5)), Some(&cur), NOW, 0));
        assert_eq!((g, v), (4, NOW + 5));
        let all_gone = Command::operate(d, "", vec![Op::Write("a".into(), Value::Nil)]);
        assert!(matches!(apply(&all_gone, Some(&cur), NOW, 0), Outcome::Delete { .. }));
        let cleared = Command::operate(d, "", vec![Op::DeleteAll]);
        assert!(matches!(apply(&cleared, Some(&cur), NOW, 0), Outcome::Delete { .. }));
    }

    #[test]
    fn reads() {
        let d = Digest::default();
        let cur = rec(2, &[("a", Value::Int(1)), ("b", Value::Bool(true))]);
        let Outcome::Reply(r) = apply(&Command::get(d), Some(&cur), NOW, 0) else { panic!() };
        assert_eq!((r.generation, r.bins.len()), (2, 2));
        let Outcome::Reply(r) = apply(&Command::get_bins(d, &["b", "zz"]), Some(&cur), NOW, 0) else { panic!() };
        assert_eq!(r.bins, vec![OpResult { name: "b".into(), value: Value::Bool(true) }]);
        let Outcome::Reply(r) = apply(&Command::exists(d), Some(&cur), NOW, 0) else { panic!() };
        assert!(r.bins.is_empty() && r.generation == 2);
        assert_eq!(rc(&apply(&Command::get(d), None, NOW, 0)), ResultCode::NotFound);
        let key_cur = Current { key: Some(vec![3, b'a']), ..cur.clone() };
        let put = Command::put(d, "", vec![Bin::new("a", Value::Int(1))]).with_key(vec![3, b'b']);
        assert_eq!(rc(&apply(&put, Some(&key_cur), NOW, 0)), ResultCode::KeyMismatch);
    }
}
