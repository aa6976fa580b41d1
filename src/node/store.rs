//! The reference node's data: versioned keys and the log of recent writes.
//!
//! Pure: no I/O, no clock. The primary writes through [`Store::write`]; a
//! replica applies its primary's writes with [`Store::append`] (only in
//! order, only from the place it is at) or replaces everything with
//! [`Store::install`]. Every key keeps the HLC of the write that set it, and
//! a write older than what a key holds never overwrites it, so a later write
//! wins whatever order the wall clocks would suggest.
//!
//! A copy follows one primary *term* (the epoch at which its primary took
//! over). Tail writes are accepted only within the term the copy follows; a
//! new term always starts with a snapshot, so a replica that applied writes
//! a deposed primary never got acknowledged cannot keep them.

use crate::clock::Hlc;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// Bytes a write is counted as beyond its key and value (lag in bytes is
/// counted this way on both sides).
const ENTRY_OVERHEAD: u64 = 16;

/// A place in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// The write's HLC.
    pub hlc: Hlc,
    /// How many writes the log holds up to and including it.
    pub seq: u64,
    /// The log's length in bytes up to and including it.
    pub offset: u64,
}

/// One write: a value, or a deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Write {
    pub at: Position,
    pub key: String,
    pub value: Option<Bytes>,
}

impl Write {
    fn size(key: &str, value: Option<&Bytes>) -> u64 {
        ENTRY_OVERHEAD + key.len() as u64 + value.map_or(0, |v| v.len() as u64)
    }
}

/// What a key holds: its newest value (or a deletion) and that write's HLC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Version {
    pub hlc: Hlc,
    pub value: Option<Bytes>,
}

/// Why a replica cannot apply a batch of tail writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gap {
    /// It follows another term, or none yet.
    OtherTerm,
    /// It is not where the batch starts.
    NotThere,
}

/// A write the store refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Full {
    /// Too many keys.
    #[error("the store holds {0} keys, its limit")]
    Keys(usize),
    /// Too many bytes.
    #[error("the store holds {0} bytes of values, its limit")]
    Bytes(u64),
}

/// A consistent copy of everything, as of one position.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub term: u64,
    pub at: Position,
    pub items: Vec<(String, Version)>,
}

/// Limits of one store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_keys: usize,
    pub max_bytes: u64,
    /// Bytes of recent writes kept for replicas that are behind; one further
    /// behind gets a snapshot.
    pub log_bytes: u64,
}

/// The node's data.
#[derive(Debug)]
pub(crate) struct Store {
    data: HashMap<String, Version>,
    /// Bytes of keys and values held.
    bytes: u64,
    log: VecDeque<Write>,
    log_bytes: u64,
    applied: Position,
    /// The term this copy follows; `None` before its first snapshot (a
    /// replica) or before it first leads (a primary).
    term: Option<u64>,
    limits: Limits,
}

impl Store {
    pub(crate) fn new(limits: Limits) -> Store {
        Store {
            data: HashMap::new(),
            bytes: 0,
            log: VecDeque::new(),
            log_bytes: 0,
            applied: Position::default(),
            term: None,
            limits,
        }
    }

    /// The newest write applied.
    pub(crate) fn applied(&self) -> Position {
        self.applied
    }

    /// The term this copy follows.
    pub(crate) fn term(&self) -> Option<u64> {
        self.term
    }

    /// A key's value and version (a deletion reads as no value).
    pub(crate) fn get(&self, key: &str) -> Option<&Version> {
        self.data.get(key)
    }

    /// Start leading under `term`: this copy's writes now define the log.
    pub(crate) fn lead(&mut self, term: u64) {
        self.term = Some(term);
    }

    /// Forget the term followed: the next primary must send a snapshot.
    pub(crate) fn unfollow(&mut self) {
        self.term = None;
    }

    /// Whether `key = value` fits.
    pub(crate) fn fits(&self, key: &str, value: Option<&Bytes>) -> Result<(), Full> {
        let old = self.data.get(key);
        if old.is_none() && self.data.len() >= self.limits.max_keys {
            return Err(Full::Keys(self.data.len()));
        }
        let old_bytes = old.map_or(0, |v| {
            key.len() as u64 + v.value.as_ref().map_or(0, |b| b.len() as u64)
        });
        let new_bytes = key.len() as u64 + value.map_or(0, |b| b.len() as u64);
        if new_bytes > old_bytes && self.bytes - old_bytes + new_bytes > self.limits.max_bytes {
            return Err(Full::Bytes(self.bytes));
        }
        Ok(())
    }

    /// The primary's write: stamped `hlc` (above every write applied), logged and applied.
    pub(crate) fn write(
        &mut self,
        hlc: Hlc,
        key: String,
        value: Option<Bytes>,
    ) -> Result<Position, Full> {
        self.fits(&key, value.as_ref())?;
        let at = Position {
            hlc,
            seq: self.applied.seq + 1,
            offset: self.applied.offset + Write::size(&key, value.as_ref()),
        };
        self.apply(Write { at, key, value });
        Ok(at)
    }

    fn apply(&mut self, w: Write) {
        let newer = self.data.get(&w.key).is_none_or(|v| w.at.hlc > v.hlc);
        if newer {
            let new_bytes = w.key.len() as u64 + w.value.as_ref().map_or(0, |b| b.len() as u64);
            let old = self.data.insert(
                w.key.clone(),
                Version {
                    hlc: w.at.hlc,
                    value: w.value.clone(),
                },
            );
            let old_bytes = old.map_or(0, |v| {
                w.key.len() as u64 + v.value.map_or(0, |b| b.len() as u64)
            });
            self.bytes = self.bytes - old_bytes + new_bytes;
        }
        self.applied = w.at;
        self.log_bytes += Write::size(&w.key, w.value.as_ref());
        self.log.push_back(w);
        while self.log_bytes > self.limits.log_bytes
            && let Some(old) = self.log.pop_front()
        {
            self.log_bytes -= Write::size(&old.key, old.value.as_ref());
        }
    }

    /// A replica applies its primary's writes that follow `prev`, in term
    /// `term`. Writes it already has (a batch sent again after a lost
    /// answer) are skipped; anything that does not line up is a gap, and
    /// nothing is applied.
    pub(crate) fn append(
        &mut self,
        term: u64,
        prev: Position,
        writes: Vec<Write>,
    ) -> Result<Position, Gap> {
        if self.term != Some(term) {
            return Err(Gap::OtherTerm);
        }
        let skip = if prev == self.applied {
            0
        } else if prev.seq < self.applied.seq {
            // Already applied part of it: the write at our position must be
            // the same one, or the histories differ.
            let have = (self.applied.seq - prev.seq) as usize;
            match writes.get(have - 1) {
                Some(w) if w.at == self.applied => have,
                _ => return Err(Gap::NotThere),
            }
        } else {
            return Err(Gap::NotThere);
        };
        let mut expected = self.applied;
        for w in writes.into_iter().skip(skip) {
            if w.at.seq != expected.seq + 1 {
                return Err(Gap::NotThere);
            }
            expected = w.at;
            self.apply(w);
        }
        Ok(self.applied)
    }

    /// Writes after `from`, at most about `max_bytes` of them; `None` when
    /// `from` is not in the log any more (or never was): the replica needs a
    /// snapshot.
    pub(crate) fn writes_after(&self, from: Position, max_bytes: u64) -> Option<Vec<Write>> {
        if from == self.applied {
            return Some(Vec::new());
        }
        let first = self.log.front()?;
        if from.seq + 1 < first.at.seq || from.seq > self.applied.seq {
            return None;
        }
        let start = (from.seq + 1 - first.at.seq) as usize;
        if start > 0 && self.log.get(start - 1).map(|w| w.at) != Some(from) {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for w in self.log.iter().skip(start) {
            if !out.is_empty() && bytes >= max_bytes {
                break;
            }
            bytes += Write::size(&w.key, w.value.as_ref());
            out.push(w.clone());
        }
        Some(out)
    }

    /// Everything, as of the newest write (a primary's copy for a replica).
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        Some(Snapshot {
            term: self.term?,
            at: self.applied,
            items: self
                .data
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// Replace everything with a primary's snapshot, and follow its term.
    pub(crate) fn install(&mut self, s: Snapshot) {
        self.bytes = s
            .items
            .iter()
            .map(|(k, v)| k.len() as u64 + v.value.as_ref().map_or(0, |b| b.len() as u64))
            .sum();
        self.data = s.items.into_iter().collect();
        self.log.clear();
        self.log_bytes = 0;
        self.applied = s.at;
        self.term = Some(s.term);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_keys: 100,
            max_bytes: 10_000,
            log_bytes: 1_000,
        }
    }

    fn t(ms: u64) -> Hlc {
        Hlc::new(ms, 0)
    }

    fn primary_with(writes: &[(&str, &str)]) -> Store {
        let mut p = Store::new(limits());
        p.lead(5);
        for (i, (k, v)) in writes.iter().enumerate() {
            p.write(
                t(100 + i as u64),
                (*k).into(),
                Some(Bytes::from(v.to_string())),
            )
            .unwrap();
        }
        p
    }

    fn value(s: &Store, key: &str) -> Option<Bytes> {
        s.get(key).and_then(|v| v.value.clone())
    }

    #[test]
    fn a_replica_applies_a_snapshot_then_the_tail_and_matches_its_primary() {
        let mut p = primary_with(&[("a", "1"), ("b", "2")]);
        let mut r = Store::new(limits());
        r.install(p.snapshot().unwrap());
        let from = r.applied();
        p.write(t(200), "a".into(), Some(Bytes::from("3"))).unwrap();
        p.write(t(201), "b".into(), None).unwrap();
        let tail = p.writes_after(from, 1 << 20).unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(r.append(5, from, tail), Ok(p.applied()));
        assert_eq!(value(&r, "a").as_deref(), Some(&b"3"[..]));
        assert_eq!(value(&r, "b"), None);
        assert_eq!(r.applied(), p.applied());
    }

    #[test]
    fn a_batch_sent_again_after_a_lost_answer_is_applied_once() {
        let mut p = primary_with(&[("a", "1")]);
        let mut r = Store::new(limits());
        r.install(p.snapshot().unwrap());
        let from = r.applied();
        p.write(t(200), "a".into(), Some(Bytes::from("2"))).unwrap();
        p.write(t(201), "c".into(), Some(Bytes::from("3"))).unwrap();
        let batch = p.writes_after(from, 1 << 20).unwrap();
        r.append(5, from, batch[..1].to_vec()).unwrap();
        // The primary did not hear that answer and sends both again.
        assert_eq!(r.append(5, from, batch), Ok(p.applied()));
        assert_eq!(r.applied().seq, 3);
    }

    #[test]
    fn writes_that_do_not_line_up_or_come_from_another_term_are_refused_whole() {
        let mut p = primary_with(&[("a", "1")]);
        let mut r = Store::new(limits());
        assert_eq!(
            r.append(5, Position::default(), vec![]),
            Err(Gap::OtherTerm)
        );
        r.install(p.snapshot().unwrap());
        let from = r.applied();
        p.write(t(200), "a".into(), Some(Bytes::from("2"))).unwrap();
        p.write(t(201), "a".into(), Some(Bytes::from("3"))).unwrap();
        let batch = p.writes_after(from, 1 << 20).unwrap();
        // Skipping the first write leaves a hole.
        assert_eq!(
            r.append(5, batch[0].at, batch[1..].to_vec()),
            Err(Gap::NotThere)
        );
        assert_eq!(r.append(6, from, batch.clone()), Err(Gap::OtherTerm));
        assert_eq!(r.applied(), from, "nothing applied");
        // A different history at the same sequence number is a gap too.
        let mut forged = batch.clone();
        forged[0].at.hlc = t(999);
        r.append(5, from, batch[..1].to_vec()).unwrap();
        assert_eq!(r.append(5, from, forged), Err(Gap::NotThere));
    }

    #[test]
    fn a_replica_further_behind_than_the_log_needs_a_snapshot() {
        let mut p = primary_with(&[]);
        let start = p.applied();
        for i in 0..200 {
            p.write(
                t(100 + i),
                format!("k{}", i % 50),
                Some(Bytes::from("xxxxxxxx")),
            )
            .unwrap();
        }
        assert!(p.writes_after(start, 1 << 20).is_none(), "trimmed past it");
        let recent = p.log.back().unwrap().at;
        assert_eq!(p.writes_after(recent, 1 << 20), Some(vec![]));
        // A position the log never held.
        let bogus = Position {
            seq: recent.seq - 1,
            ..recent
        };
        assert!(p.writes_after(bogus, 1 << 20).is_none());
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_never_empty() {
        let p = primary_with(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let one = p.writes_after(Position::default(), 1).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn an_older_write_never_overwrites_a_newer_version() {
        let mut s = Store::new(limits());
        s.lead(1);
        s.write(t(500), "k".into(), Some(Bytes::from("new")))
            .unwrap();
        s.write(t(400), "k".into(), Some(Bytes::from("old")))
            .unwrap();
        assert_eq!(value(&s, "k").as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn the_store_is_bounded_in_keys_and_bytes() {
        let mut s = Store::new(Limits {
            max_keys: 2,
            max_bytes: 20,
            log_bytes: 1_000,
        });
        s.lead(1);
        s.write(t(1), "a".into(), Some(Bytes::from("1"))).unwrap();
        s.write(t(2), "b".into(), Some(Bytes::from("1"))).unwrap();
        assert_eq!(s.write(t(3), "c".into(), None), Err(Full::Keys(2)));
        assert!(
            s.write(t(4), "a".into(), Some(Bytes::from(vec![0; 30])))
                .is_err()
        );
        s.write(t(5), "a".into(), Some(Bytes::from("22"))).unwrap();
    }
}
