//! Constraint classes: jobs whose placement constraints are equal fit the same slots, so a
//! tick works out the candidate cells once per class, not once per job.
//!
//! [`Classes`] interns them for the [`Book`](super::book::Book): a job's class is found once,
//! when the book first sees the job (its spec never changes), by a 64-bit print of the
//! canonical constraints and one comparison with the class the print points at.

use std::collections::BTreeMap;

use super::home::{fnv1a64, fnv1a64_extend};
use crate::pipeline::Placement as Constraints;
use crate::state::DEFAULT_POOL;

/// Constraints in a canonical, ordered form (labels sorted), so equal constraints written in
/// different orders share a class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClassKey<'a> {
    pub(super) region: Option<&'a str>,
    pub(super) pool: &'a str,
    pub(super) labels: Vec<(&'a str, &'a str)>,
}

impl<'a> ClassKey<'a> {
    pub(super) fn of(c: &'a Constraints) -> Self {
        let mut labels: Vec<(&str, &str)> = c
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        labels.sort_unstable();
        ClassKey {
            region: c.region.as_deref(),
            pool: c.pool.as_ref().map_or(DEFAULT_POOL, |p| p.as_str()),
            labels,
        }
    }

    /// A print of the key: FNV-1a over its fields, each ended by a byte that no UTF-8 string
    /// contains, so values that concatenate alike print apart.
    fn print(&self) -> u64 {
        let mut h = fnv1a64(&[u8::from(self.region.is_some())]);
        let mut feed = |s: &str| {
            h = fnv1a64_extend(h, s.as_bytes());
            h = fnv1a64_extend(h, &[0xff]);
        };
        feed(self.region.unwrap_or(""));
        feed(self.pool);
        for (k, v) in &self.labels {
            feed(k);
            feed(v);
        }
        h
    }
}

/// A [`ClassKey`] that owns its strings, to outlive one tick's snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OwnedKey {
    pub(super) region: Option<String>,
    pub(super) pool: String,
    pub(super) labels: Vec<(String, String)>,
}

impl OwnedKey {
    fn of(k: &ClassKey<'_>) -> Self {
        OwnedKey {
            region: k.region.map(str::to_owned),
            pool: k.pool.to_owned(),
            labels: k
                .labels
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        }
    }

    fn matches(&self, k: &ClassKey<'_>) -> bool {
        self.region.as_deref() == k.region
            && self.pool == k.pool
            && self.labels.len() == k.labels.len()
            && self
                .labels
                .iter()
                .zip(&k.labels)
                .all(|((a, b), (x, y))| a == x && b == y)
    }
}

/// The interned classes, with how many tracked jobs use each.
#[derive(Debug, Default)]
pub(super) struct Classes {
    keys: Vec<OwnedKey>,
    /// Classes by the print of their key (a print may, rarely, stand for several).
    by_print: BTreeMap<u64, Vec<u32>>,
    /// The class of constraints with no region, labels or pool.
    plain: Option<u32>,
    /// Tracked jobs per class.
    uses: Vec<u32>,
    /// Classes with a use.
    in_use: usize,
}

impl Classes {
    /// The class of `c`, interning it if new.
    pub(super) fn of(&mut self, c: &Constraints) -> u32 {
        let plain = is_plain(c);
        if plain && let Some(k) = self.plain {
            return k;
        }
        let key = ClassKey::of(c);
        let print = key.print();
        let known = self.by_print.get(&print).and_then(|v| {
            v.iter()
                .copied()
                .find(|k| self.keys[*k as usize].matches(&key))
        });
        let k = known.unwrap_or_else(|| {
            let k = self.keys.len() as u32;
            self.keys.push(OwnedKey::of(&key));
            self.uses.push(0);
            self.by_print.entry(print).or_default().push(k);
            k
        });
        if plain {
            self.plain = Some(k);
        }
        k
    }

    /// A tracked job started using class `k`.
    pub(super) fn hold(&mut self, k: u32) {
        let n = &mut self.uses[k as usize];
        if *n == 0 {
            self.in_use += 1;
        }
        *n += 1;
    }

    /// A tracked job stopped using class `k`.
    pub(super) fn release(&mut self, k: u32) {
        let n = &mut self.uses[k as usize];
        *n -= 1;
        if *n == 0 {
            self.in_use -= 1;
        }
    }

    /// Forgets every use (the classes stay interned).
    pub(super) fn release_all(&mut self) {
        self.uses.iter_mut().for_each(|n| *n = 0);
        self.in_use = 0;
    }

    /// How many classes are interned.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// How many classes some tracked job uses.
    pub(super) fn in_use(&self) -> usize {
        self.in_use
    }

    /// An interned class.
    pub(super) fn key(&self, k: u32) -> &OwnedKey {
        &self.keys[k as usize]
    }
}

/// Whether constraints have none of region, labels and pool.
fn is_plain(c: &Constraints) -> bool {
    c.region.is_none() && c.labels.is_empty() && c.pool.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PoolName;

    fn c(region: Option<&str>, labels: &[(&str, &str)], pool: Option<&str>) -> Constraints {
        let mut c = Constraints {
            region: region.map(str::to_owned),
            pool: pool.map(|p| PoolName::new(p).unwrap()),
            ..Constraints::default()
        };
        for (k, v) in labels {
            c.labels.insert((*k).to_owned(), (*v).to_owned());
        }
        c
    }

    #[test]
    fn equal_constraints_share_a_class_whatever_the_label_order_and_default_pool_spelling() {
        let mut classes = Classes::default();
        let k_plain = classes.of(&c(None, &[], None));
        assert_eq!(classes.of(&c(None, &[], Some("default"))), k_plain);
        let k_ab = classes.of(&c(Some("eu"), &[("a", "1"), ("b", "2")], None));
        assert_eq!(
            classes.of(&c(Some("eu"), &[("b", "2"), ("a", "1")], None)),
            k_ab
        );
        assert_ne!(
            classes.of(&c(Some("us"), &[("a", "1"), ("b", "2")], None)),
            k_ab
        );
        assert_ne!(k_ab, k_plain);
        assert_eq!(classes.len(), 3);
        assert_eq!(
            classes.key(k_ab),
            &OwnedKey {
                region: Some("eu".into()),
                pool: "default".into(),
                labels: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            }
        );
    }

    #[test]
    fn prints_tell_apart_values_that_concatenate_alike() {
        let print = |x: &Constraints| ClassKey::of(x).print();
        assert_ne!(
            print(&c(None, &[("ab", "c")], None)),
            print(&c(None, &[("a", "bc")], None))
        );
        assert_ne!(print(&c(Some(""), &[], None)), print(&c(None, &[], None)));
    }

    #[test]
    fn uses_are_counted_per_class() {
        let mut classes = Classes::default();
        let a = classes.of(&c(Some("eu"), &[], None));
        let b = classes.of(&c(Some("us"), &[], None));
        classes.hold(a);
        classes.hold(a);
        classes.hold(b);
        assert_eq!(classes.in_use(), 2);
        classes.release(a);
        classes.release(b);
        assert_eq!(classes.in_use(), 1);
        classes.release_all();
        assert_eq!(classes.in_use(), 0);
    }
}
