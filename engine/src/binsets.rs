//! Which bins a record has, known without reading it: a shard numbers the lists of bin
//! names it stores (in record order) and keeps the number in each record's index entry.
//!
//! An update that merges bins (the default write policy) needs the old record's bins only
//! for the ones it does not overwrite. When every bin of the old version is written again,
//! the merged record is the old bin names, in their order, with the new values, followed by
//! the write's other bins; the old values do not matter. With the old version's names known
//! exactly from its index entry, such an update skips reading the old record from the device
//! (see `Shard::start_cmd`). Numbers are per shard and in memory only: after a cold start
//! every entry has 0 ("not known") until its record is written again, and a list of names
//! that does not fit (too many bins, too many lists, a hash shared with another list) is
//! simply not numbered, which costs the read, never a wrong merge.

use std::collections::HashMap;

use crate::types::Bin;

/// Lists of more bins than this are not numbered.
pub const MAX_BINS: usize = 8;
/// Lists numbered at most per shard (ids 1..=MAX_LISTS: eight bits of the index entry).
pub const MAX_LISTS: usize = 255;

#[derive(Default)]
pub struct BinSets {
    /// Hash of a list of names → its id. A second list with the same hash gets no id.
    by_hash: HashMap<u64, u8>,
    /// `lists[id - 1]`: the names, in record order.
    lists: Vec<Box<[String]>>,
}

fn hash_names<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for n in names {
        n.hash(&mut h);
    }
    h.finish()
}

impl BinSets {
    /// The id of the list of `bins`' names (numbering it when new), or 0 when it gets none.
    pub fn id_of(&mut self, bins: &[Bin]) -> u8 {
        if bins.is_empty() || bins.len() > MAX_BINS {
            return 0;
        }
        let h = hash_names(bins.iter().map(|b| b.name.as_str()));
        if let Some(&id) = self.by_hash.get(&h) {
            let same = self.lists[id as usize - 1].iter().map(String::as_str).eq(bins.iter().map(|b| b.name.as_str()));
            return if same { id } else { 0 };
        }
        if self.lists.len() >= MAX_LISTS {
            return 0;
        }
        self.lists.push(bins.iter().map(|b| b.name.clone()).collect());
        let id = self.lists.len() as u8;
        self.by_hash.insert(h, id);
        id
    }

    /// The names numbered `id`, in record order (None for 0 or an unknown id).
    pub fn names(&self, id: u8) -> Option<&[String]> {
        (id as usize).checked_sub(1).and_then(|i| self.lists.get(i)).map(|l| &l[..])
    }

    /// Lists numbered so far.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Value;

    fn bins(names: &[&str]) -> Vec<Bin> {
        names.iter().map(|n| Bin { name: n.to_string(), value: Value::Int(1) }).collect()
    }

    #[test]
    fn lists_are_numbered_exactly_and_in_order() {
        let mut s = BinSets::default();
        let a = s.id_of(&bins(&["a", "b"]));
        assert_eq!(a, 1);
        assert_eq!(s.id_of(&bins(&["a", "b"])), a, "same list, same id");
        let ba = s.id_of(&bins(&["b", "a"]));
        assert!(ba != 0 && ba != a, "order matters");
        assert_eq!(s.names(a).unwrap(), ["a", "b"]);
        assert_eq!(s.names(ba).unwrap(), ["b", "a"]);
        assert_eq!(s.names(0), None);
        assert_eq!(s.names(99), None);
        assert_eq!(s.id_of(&[]), 0);
        let many: Vec<String> = (0..=MAX_BINS).map(|i| format!("b{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(s.id_of(&bins(&many)), 0, "too many bins");
    }

    #[test]
    fn numbering_stops_at_the_limit() {
        let mut s = BinSets::default();
        for i in 0..MAX_LISTS {
            assert_eq!(s.id_of(&bins(&[&format!("n{i}")])) as usize, i + 1);
        }
        assert_eq!(s.id_of(&bins(&["one more"])), 0);
        assert_eq!(s.id_of(&bins(&["n7"])), 8, "known lists keep their id");
        assert_eq!(s.len(), MAX_LISTS);
    }

    #[test]
    fn a_hash_shared_by_two_lists_numbers_only_the_first() {
        let mut s = BinSets::default();
        let id = s.id_of(&bins(&["x"]));
        // Pretend another list hashed the same: it must not get the first one's id.
        let h = hash_names(["y"].into_iter());
        s.by_hash.insert(h, id);
        assert_eq!(s.id_of(&bins(&["y"])), 0);
        assert_eq!(s.id_of(&bins(&["x"])), id);
    }
}
