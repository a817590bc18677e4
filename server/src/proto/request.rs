//! Translation of a single-record AS_MSG (or a batch row) into an engine [`Command`]
//! (PROTOCOL.md §1.3, §1.9, §1.10). Failures are the result code to answer with.

use ferrospike_engine::types::{compute_digest, MAX_BIN_NAME_BYTES, MAX_SET_NAME_BYTES};
use ferrospike_engine::{Command, Digest, ExistsAction, GenPolicy, Op, ResultCode, Ttl, Value};

use super::codes::*;
use super::msg::{field, Field, Msg, MsgHeader, OpRef};

/// The per-command flags and numbers, from the AS_MSG header or a batch row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub info1: u8,
    pub info2: u8,
    pub info3: u8,
    pub info4: u8,
    pub generation: u32,
    pub record_ttl: u32,
}

impl From<&MsgHeader> for Flags {
    fn from(h: &MsgHeader) -> Flags {
        Flags {
            info1: h.info1,
            info2: h.info2,
            info3: h.info3,
            info4: h.info4,
            generation: h.generation,
            record_ttl: h.record_ttl,
        }
    }
}

/// What kind of request an AS_MSG is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Single,
    Batch,
    Scan,
}

pub fn classify(m: &Msg<'_>) -> Kind {
    let has = |t| m.fields.iter().any(|f| f.ftype == t);
    if m.header.info1 & INFO1_BATCH != 0 || has(FIELD_BATCH_INDEX) || has(FIELD_BATCH_WITH_SET) {
        Kind::Batch
    } else if has(FIELD_DIGEST) || has(FIELD_KEY) {
        Kind::Single
    } else {
        Kind::Scan
    }
}

/// A decoded single-record command.
#[derive(Clone, Debug, PartialEq)]
pub struct SingleRequest<'a> {
    pub namespace: &'a str,
    pub cmd: Command,
    /// The request's op codes, kept when every op gets an answer (RESPOND_ALL_OPS) so the
    /// response can echo them.
    pub op_codes: Option<Vec<u8>>,
}

fn utf8(b: &[u8], rc: ResultCode) -> Result<&str, ResultCode> {
    std::str::from_utf8(b).map_err(|_| rc)
}

/// The namespace field, which every data command must carry.
pub fn namespace<'a>(fields: &[Field<'a>]) -> Result<&'a str, ResultCode> {
    let ns = field(fields, FIELD_NAMESPACE).ok_or(ResultCode::Parameter)?;
    utf8(ns, ResultCode::Namespace)
}

/// The set field; absent and empty are the same.
pub fn set_name<'a>(fields: &[Field<'a>]) -> Result<&'a str, ResultCode> {
    let set = utf8(field(fields, FIELD_SET).unwrap_or(&[]), ResultCode::Parameter)?;
    if set.len() > MAX_SET_NAME_BYTES {
        return Err(ResultCode::Parameter);
    }
    Ok(set)
}

/// Refuse fields of features we do not implement (UDFs, secondary indexes, filter
/// expressions, transactions).
pub fn check_fields(fields: &[Field<'_>]) -> Result<(), ResultCode> {
    for f in fields {
        if field_unsupported(f.ftype) || matches!(f.ftype, FIELD_MRT_ID | FIELD_MRT_DEADLINE | FIELD_RECORD_VERSION) {
            return Err(ResultCode::UnsupportedFeature);
        }
    }
    Ok(())
}

/// Translate one command. `digest` is given by batch rows; single commands take it from
/// the DIGEST field (or compute it from SET and KEY when only those are sent).
pub fn single<'a>(
    flags: &Flags,
    fields: &[Field<'a>],
    ops: &[OpRef<'_>],
    digest: Option<Digest>,
) -> Result<SingleRequest<'a>, ResultCode> {
    let namespace = namespace(fields)?;
    check_fields(fields)?;
    if flags.info4 & INFO4_TXN_MASK != 0 {
        return Err(ResultCode::UnsupportedFeature);
    }
    let set = set_name(fields)?;
    let key = field(fields, FIELD_KEY).map(<[u8]>::to_vec);
    if key.as_ref().is_some_and(|k| k.is_empty()) {
        return Err(ResultCode::Parameter);
    }
    let digest = match (digest, field(fields, FIELD_DIGEST), &key) {
        (Some(d), _, _) => d,
        (None, Some(d), _) => Digest(d.try_into().map_err(|_| ResultCode::Parameter)?),
        (None, None, Some(k)) => compute_digest(set, k[0], &k[1..]),
        (None, None, None) => return Err(ResultCode::Parameter),
    };

    let write = flags.info2 & INFO2_WRITE != 0;
    let delete = flags.info2 & INFO2_DELETE != 0;
    let header_only = flags.info1 & INFO1_GET_NO_BINS != 0 && !write && !delete;
    let mut read_all = flags.info1 & INFO1_GET_ALL != 0;
    let respond_all_ops = flags.info2 & INFO2_RESPOND_ALL_OPS != 0;
    if read_all && respond_all_ops {
        return Err(ResultCode::Parameter);
    }
    if ops.len() > MAX_N_OPS {
        return Err(ResultCode::Parameter);
    }

    let mut cmd_ops = Vec::with_capacity(ops.len());
    if !header_only && !delete {
        for op in ops {
            match decode_op(op)? {
                // An empty-name read means "all bins".
                Op::Read(n) if n.is_empty() => read_all = true,
                o => cmd_ops.push(o),
            }
        }
    }
    let is_write = delete || cmd_ops.iter().any(Op::is_write);
    if !is_write && !read_all && !header_only && cmd_ops.is_empty() {
        return Err(ResultCode::Parameter);
    }
    if write && !delete && cmd_ops.iter().all(|o| !o.is_write()) {
        return Err(ResultCode::Parameter);
    }

    let generation = if flags.info2 & INFO2_GENERATION != 0 {
        GenPolicy::Eq(flags.generation)
    } else if flags.info2 & INFO2_GENERATION_GT != 0 {
        GenPolicy::Gt(flags.generation)
    } else {
        GenPolicy::None
    };
    let exists = if flags.info2 & INFO2_CREATE_ONLY != 0 {
        ExistsAction::CreateOnly
    } else if flags.info3 & INFO3_REPLACE_ONLY != 0 {
        ExistsAction::ReplaceOnly
    } else if flags.info3 & INFO3_CREATE_OR_REPLACE != 0 {
        ExistsAction::CreateOrReplace
    } else if flags.info3 & INFO3_UPDATE_ONLY != 0 {
        ExistsAction::UpdateOnly
    } else {
        ExistsAction::Update
    };
    // In reads record_ttl is the read-touch percent, which we ignore.
    let ttl = if is_write { Ttl::from_wire(flags.record_ttl)? } else { Ttl::NamespaceDefault };
    let op_codes = (respond_all_ops && !delete).then(|| ops.iter().map(|o| o.code).collect());

    Ok(SingleRequest {
        namespace,
        op_codes,
        cmd: Command {
            digest,
            set: set.to_string(),
            key,
            ops: cmd_ops,
            read_all,
            header_only,
            delete,
            generation,
            exists,
            ttl,
            respond_all_ops,
        },
    })
}

fn bin_name(op: &OpRef<'_>) -> Result<String, ResultCode> {
    if op.name.len() > MAX_BIN_NAME_BYTES {
        return Err(ResultCode::BinName);
    }
    Ok(utf8(op.name, ResultCode::BinName)?.to_string())
}

fn value(op: &OpRef<'_>) -> Result<Value, ResultCode> {
    Value::decode(op.ptype, op.value).ok_or(ResultCode::Parameter)
}

/// One wire op as an engine op.
pub fn decode_op(op: &OpRef<'_>) -> Result<Op, ResultCode> {
    let named = |op: &OpRef<'_>| -> Result<String, ResultCode> {
        let n = bin_name(op)?;
        if n.is_empty() {
            return Err(ResultCode::BinName);
        }
        Ok(n)
    };
    Ok(match op.code {
        OP_READ => Op::Read(bin_name(op)?),
        OP_WRITE => Op::Write(named(op)?, value(op)?),
        OP_INCR => match value(op)? {
            v @ (Value::Int(_) | Value::Float(_)) => Op::Incr(named(op)?, v),
            _ => return Err(ResultCode::Parameter),
        },
        OP_APPEND | OP_PREPEND => {
            let v = value(op)?;
            if !matches!(v, Value::Str(_) | Value::Blob(_)) {
                return Err(ResultCode::Parameter);
            }
            if op.code == OP_APPEND {
                Op::Append(named(op)?, v)
            } else {
                Op::Prepend(named(op)?, v)
            }
        }
        OP_TOUCH => Op::Touch,
        OP_DELETE_ALL => Op::DeleteAll,
        c if op_unsupported(c) => return Err(ResultCode::UnsupportedFeature),
        _ => return Err(ResultCode::Parameter),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::tests::get_body;

    fn flags(info1: u8, info2: u8, info3: u8) -> Flags {
        Flags { info1, info2, info3, ..Default::default() }
    }

    fn fields() -> Vec<Field<'static>> {
        vec![
            Field { ftype: FIELD_NAMESPACE, data: b"test" },
            Field { ftype: FIELD_SET, data: b"" },
            Field { ftype: FIELD_DIGEST, data: &[7; 20] },
        ]
    }

    fn op(code: u8, ptype: u8, name: &'static [u8], value: &'static [u8]) -> OpRef<'static> {
        OpRef { code, ptype, name, value }
    }

    #[test]
    fn a_captured_get_is_a_read_all() {
        let body = get_body();
        let m = Msg::parse(&body).unwrap();
        assert_eq!(classify(&m), Kind::Single);
        let r = single(&Flags::from(&m.header), &m.fields, &m.ops, None).unwrap();
        assert_eq!(r.namespace, "test");
        assert_eq!(r.cmd.set, "demo");
        assert!(r.cmd.read_all && !r.cmd.is_write());
        assert_eq!(r.cmd.digest.partition(), 492);
    }

    #[test]
    fn flags_map_to_policies() {
        let w = [op(OP_WRITE, 1, b"i", &[0, 0, 0, 0, 0, 0, 0, 1])];
        let r = single(&Flags { generation: 7, ..flags(0, INFO2_WRITE | INFO2_GENERATION, 0) }, &fields(), &w, None)
            .unwrap();
        assert_eq!(r.cmd.generation, GenPolicy::Eq(7));
        assert_eq!(r.cmd.set, "");
        let r = single(&flags(0, INFO2_WRITE | INFO2_CREATE_ONLY, 0), &fields(), &w, None).unwrap();
        assert_eq!(r.cmd.exists, ExistsAction::CreateOnly);
        let r = single(&flags(0, INFO2_WRITE, INFO3_UPDATE_ONLY), &fields(), &w, None).unwrap();
        assert_eq!(r.cmd.exists, ExistsAction::UpdateOnly);
        let r = single(&flags(0, INFO2_WRITE, INFO3_REPLACE_ONLY), &fields(), &w, None).unwrap();
        assert_eq!(r.cmd.exists, ExistsAction::ReplaceOnly);
        let r = single(&flags(0, INFO2_WRITE, INFO3_CREATE_OR_REPLACE), &fields(), &w, None).unwrap();
        assert_eq!(r.cmd.exists, ExistsAction::CreateOrReplace);
        let r = single(&Flags { record_ttl: u32::MAX, ..flags(0, INFO2_WRITE, 0) }, &fields(), &w, None).unwrap();
        assert_eq!(r.cmd.ttl, Ttl::Never);
        let r = single(&Flags { record_ttl: 0xFFFF_FFF0, ..flags(0, INFO2_WRITE, 0) }, &fields(), &w, None);
        assert_eq!(r.unwrap_err(), ResultCode::Parameter);
        let r = single(&flags(0, INFO2_WRITE | INFO2_DELETE, 0), &fields(), &[], None).unwrap();
        assert!(r.cmd.delete);
    }

    #[test]
    fn respond_all_ops_keeps_op_codes() {
        let ops = [
            op(OP_INCR, 1, b"i", &[0, 0, 0, 0, 0, 0, 0, 10]),
            op(OP_READ, 0, b"i", b""),
            op(OP_APPEND, 3, b"s", b"!"),
            op(OP_READ, 0, b"s", b""),
        ];
        let r = single(&flags(INFO1_READ, INFO2_WRITE | INFO2_RESPOND_ALL_OPS, 0), &fields(), &ops, None).unwrap();
        assert!(r.cmd.respond_all_ops);
        assert_eq!(r.op_codes, Some(vec![5, 1, 9, 1]));
        assert_eq!(r.cmd.ops[2], Op::Append("s".into(), Value::Str(b"!".to_vec())));
        let r =
            single(&flags(INFO1_READ | INFO1_GET_ALL, INFO2_WRITE | INFO2_RESPOND_ALL_OPS, 0), &fields(), &ops, None);
        assert_eq!(r.unwrap_err(), ResultCode::Parameter);
    }

    #[test]
    fn header_reads_and_bad_requests() {
        let r = single(&flags(INFO1_READ | INFO1_GET_NO_BINS, 0, 0), &fields(), &[op(1, 0, b"", b"")], None).unwrap();
        assert!(r.cmd.header_only && r.cmd.ops.is_empty());
        assert_eq!(single(&flags(INFO1_READ, 0, 0), &fields(), &[], None).unwrap_err(), ResultCode::Parameter);
        assert_eq!(single(&flags(0, INFO2_WRITE, 0), &fields(), &[], None).unwrap_err(), ResultCode::Parameter);
        let cdt = [op(4, 20, b"l", b"\x93")];
        assert_eq!(
            single(&flags(0, INFO2_WRITE, 0), &fields(), &cdt, None).unwrap_err(),
            ResultCode::UnsupportedFeature
        );
        let mut f = fields();
        f.push(Field { ftype: 30, data: b"mod" });
        assert_eq!(
            single(&flags(INFO1_READ | INFO1_GET_ALL, 0, 0), &f, &[], None).unwrap_err(),
            ResultCode::UnsupportedFeature
        );
        let long = [op(OP_WRITE, 1, b"sixteen-bytes-xx", &[0; 8])];
        assert_eq!(single(&flags(0, INFO2_WRITE, 0), &fields(), &long, None).unwrap_err(), ResultCode::BinName);
        let bad_int = [op(OP_WRITE, 1, b"i", &[0; 3])];
        assert_eq!(single(&flags(0, INFO2_WRITE, 0), &fields(), &bad_int, None).unwrap_err(), ResultCode::Parameter);
        let del_bin = [op(OP_WRITE, 0, b"i", b"")];
        let r = single(&flags(0, INFO2_WRITE, 0), &fields(), &del_bin, None).unwrap();
        assert_eq!(r.cmd.ops, vec![Op::Write("i".into(), Value::Nil)]);
    }

    #[test]
    fn digest_from_key_when_missing() {
        let f = [
            Field { ftype: FIELD_NAMESPACE, data: b"test" },
            Field { ftype: FIELD_SET, data: b"demo" },
            Field { ftype: FIELD_KEY, data: b"\x03key1" },
        ];
        let r = single(&flags(INFO1_READ | INFO1_GET_ALL, 0, 0), &f, &[], None).unwrap();
        assert_eq!(r.cmd.digest.to_hex(), "ec91192d4b7f8ce35d5d78d34bca65cbaaaac960");
        assert_eq!(r.cmd.key.as_deref(), Some(&b"\x03key1"[..]));
    }
}
