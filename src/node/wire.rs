//! Conversions between the replication messages and the store's types.

use super::store::{Position, Write};
use crate::clock::Hlc;
use crate::proto::node as pb;

pub(super) fn position(p: pb::Position) -> Position {
    Position {
        hlc: Hlc::from_u64(p.hlc),
        seq: p.seq,
        offset: p.offset,
    }
}

pub(super) fn to_position(p: Position) -> pb::Position {
    pb::Position {
        hlc: p.hlc.as_u64(),
        seq: p.seq,
        offset: p.offset,
    }
}

pub(super) fn write(w: pb::Write) -> Write {
    Write {
        at: w.at.map(position).unwrap_or_default(),
        key: w.key,
        value: (!w.deleted).then_some(w.value),
    }
}

pub(super) fn to_write(w: Write) -> pb::Write {
    pb::Write {
        at: Some(to_position(w.at)),
        key: w.key,
        deleted: w.value.is_none(),
        value: w.value.unwrap_or_default(),
    }
}
