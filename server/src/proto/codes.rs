//! Numeric constants of the protocol: message types, flag bits, field and op codes.

pub const MSG_TYPE_INFO: u8 = 1;
pub const MSG_TYPE_ADMIN: u8 = 2;
pub const MSG_TYPE_AS_MSG: u8 = 3;
pub const MSG_TYPE_COMPRESSED: u8 = 4;

// info1
pub const INFO1_READ: u8 = 0x01;
pub const INFO1_GET_ALL: u8 = 0x02;
pub const INFO1_BATCH: u8 = 0x08;
pub const INFO1_GET_NO_BINS: u8 = 0x20;

// info2
pub const INFO2_WRITE: u8 = 0x01;
pub const INFO2_DELETE: u8 = 0x02;
pub const INFO2_GENERATION: u8 = 0x04;
pub const INFO2_GENERATION_GT: u8 = 0x08;
pub const INFO2_CREATE_ONLY: u8 = 0x20;
pub const INFO2_RESPOND_ALL_OPS: u8 = 0x80;

// info3
pub const INFO3_LAST: u8 = 0x01;
pub const INFO3_PARTITION_DONE: u8 = 0x04;
pub const INFO3_UPDATE_ONLY: u8 = 0x08;
pub const INFO3_CREATE_OR_REPLACE: u8 = 0x10;
pub const INFO3_REPLACE_ONLY: u8 = 0x20;

/// info4 bits that ask for multi-record transactions (MRT), which we do not support.
pub const INFO4_TXN_MASK: u8 = 0x1f;

// Field types.
pub const FIELD_NAMESPACE: u8 = 0;
pub const FIELD_SET: u8 = 1;
pub const FIELD_KEY: u8 = 2;
pub const FIELD_RECORD_VERSION: u8 = 3;
pub const FIELD_DIGEST: u8 = 4;
pub const FIELD_MRT_ID: u8 = 5;
pub const FIELD_MRT_DEADLINE: u8 = 6;
pub const FIELD_PID_ARRAY: u8 = 11;
pub const FIELD_DIGEST_ARRAY: u8 = 12;
pub const FIELD_MAX_RECORDS: u8 = 13;
pub const FIELD_BATCH_INDEX: u8 = 41;
pub const FIELD_BATCH_WITH_SET: u8 = 42;

/// Field types that ask for features we do not implement: secondary indexes (21–26),
/// UDFs (30–33), the deprecated query bin list (40), filter expressions (43), query
/// selection (44).
pub fn field_unsupported(t: u8) -> bool {
    matches!(t, 21..=26 | 30..=33 | 40 | 43 | 44)
}

// Op codes.
pub const OP_READ: u8 = 1;
pub const OP_WRITE: u8 = 2;
pub const OP_INCR: u8 = 5;
pub const OP_APPEND: u8 = 9;
pub const OP_PREPEND: u8 = 10;
pub const OP_TOUCH: u8 = 11;
pub const OP_DELETE_ALL: u8 = 14;

/// Op codes of CDT, expression, bit, HLL and string operations.
pub fn op_unsupported(code: u8) -> bool {
    matches!(code, 3 | 4 | 7 | 8 | 12 | 13 | 15..=19)
}

/// A real server refuses more ops than this in one message (`MAX_N_OPS`).
pub const MAX_N_OPS: usize = 32_768;
