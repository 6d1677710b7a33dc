//! Tokens that verified recently, so that a client's next request with the same token skips the
//! signature check, which is most of what verification costs.
//!
//! An entry is found only by the exact token text, so a hit admits nothing that a full
//! verification would not; `exp` and `nbf` are checked again on every hit, with the same leeway.
//! Failures are never remembered. The table is 4-way set-associative: a token's set comes from
//! a keyed hash, so a caller cannot aim at another's set, and a newcomer to a full set replaces
//! its least recently used token, which bounds memory at the capacity. Four ways rather than
//! one keep tokens that happen to share a set from evicting each other on every request: with
//! live tokens at a third of the capacity, about 5% of them are in a set holding more than
//! four, where a direct-mapped table would have 28% sharing a slot with another.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use foldhash::quality::RandomState;

use crate::error::Rejection;

/// Tokens per set.
const WAYS: usize = 4;

/// A verified token's identity and validity window.
#[derive(Clone, Debug)]
pub struct Verified {
    pub user_id: Arc<str>,
    pub sid: Option<Arc<str>>,
    pub exp: u64,
    pub nbf: Option<u64>,
    /// The `iat` claim, when the token has one.
    pub iat: Option<u64>,
}

impl Verified {
    /// `Ok` while the token is inside its validity window at `now` (Unix seconds).
    pub fn check_time(&self, now: u64, leeway: u64) -> Result<(), Rejection> {
        if self.exp < now.saturating_sub(leeway) {
            return Err(Rejection::TokenExpired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Rejection::TokenInvalid);
        }
        Ok(())
    }
}

struct Entry {
    /// The token's keyed hash: a cheap first test before the full comparison.
    hash: u64,
    token: Box<str>,
    verified: Verified,
    /// The set's clock when this entry was last found or stored.
    used: u64,
}

#[derive(Default)]
struct Set {
    ways: [Option<Entry>; WAYS],
    clock: u64,
}

impl Set {
    /// The way holding exactly `token`.
    fn way_of(&mut self, hash: u64, token: &str) -> Option<&mut Option<Entry>> {
        self.ways.iter_mut().find(|way| {
            way.as_ref()
                .is_some_and(|e| e.hash == hash && same_bytes(e.token.as_bytes(), token.as_bytes()))
        })
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

pub struct VerifiedTokens {
    sets: Box<[Mutex<Set>]>,
    hasher: RandomState,
}

impl VerifiedTokens {
    /// Room for `capacity` tokens, rounded up to a power of two and to at least one set of
    /// four; 0 remembers none.
    pub fn new(capacity: usize) -> VerifiedTokens {
        let sets = if capacity == 0 {
            0
        } else {
            capacity.next_power_of_two().div_ceil(WAYS)
        };
        VerifiedTokens {
            sets: (0..sets).map(|_| Mutex::new(Set::default())).collect(),
            hasher: RandomState::default(),
        }
    }

    /// Which set a token with this hash belongs to (the set count is a power of two).
    fn set_index(&self, hash: u64) -> usize {
        hash as usize & self.sets.len().saturating_sub(1)
    }

    /// The token's hash and its set (locked).
    fn set(&self, token: &str) -> Option<(u64, std::sync::MutexGuard<'_, Set>)> {
        if self.sets.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(token);
        let set = self.sets.get(self.set_index(hash))?;
        Some((hash, set.lock().ok()?))
    }

    /// What `token` verified as, if it is remembered.
    pub fn get(&self, token: &str) -> Option<Verified> {
        let (hash, mut set) = self.set(token)?;
        let now = set.tick();
        let entry = set.way_of(hash, token)?.as_mut()?;
        entry.used = now;
        Some(entry.verified.clone())
    }

    pub fn insert(&self, token: &str, verified: Verified) {
        let Some((hash, mut set)) = self.set(token) else {
            return;
        };
        let used = set.tick();
        let entry = Entry {
            hash,
            token: token.into(),
            verified,
            used,
        };
        if let Some(same) = set.way_of(hash, token) {
            *same = Some(entry);
            return;
        }
        // An empty way, else the least recently used one.
        let victim = set
            .ways
            .iter_mut()
            .min_by_key(|way| way.as_ref().map_or(0, |e| e.used));
        if let Some(way) = victim {
            *way = Some(entry);
        }
    }

    /// Forgets `token` (it has expired).
    pub fn remove(&self, token: &str) {
        if let Some((hash, mut set)) = self.set(token) {
            if let Some(way) = set.way_of(hash, token) {
                *way = None;
            }
        }
    }
}

/// Equality that takes as long wherever the first difference is, so that the time a lookup
/// takes says nothing about a remembered token's bytes.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(user: &str, exp: u64, nbf: Option<u64>) -> Verified {
        Verified {
            user_id: user.into(),
            sid: None,
            exp,
            nbf,
            iat: None,
        }
    }

    #[test]
    fn finds_only_the_exact_token() {
        let cache = VerifiedTokens::new(16);
        cache.insert("aaa.bbb.ccc", verified("alice", 100, None));
        assert_eq!(&*cache.get("aaa.bbb.ccc").unwrap().user_id, "alice");
        assert!(cache.get("aaa.bbb.ccd").is_none());
        assert!(cache.get("aaa.bbb.cc").is_none());
        cache.remove("aaa.bbb.ccc");
        assert!(cache.get("aaa.bbb.ccc").is_none());
    }

    #[test]
    fn equality_looks_at_every_byte() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        assert!(same_bytes(token.as_bytes(), token.as_bytes()));
        for i in 0..token.len() {
            let mut other = token.as_bytes().to_vec();
            other[i] ^= 1;
            assert!(!same_bytes(token.as_bytes(), &other), "byte {i}");
        }
        assert!(!same_bytes(b"abc", b"abcd"));
        assert!(same_bytes(b"", b""));
    }

    #[test]
    fn holds_at_most_its_capacity() {
        let cache = VerifiedTokens::new(8);
        for i in 0..100 {
            cache.insert(&format!("token-{i}"), verified("u", 100, None));
        }
        let kept = (0..100)
            .filter(|i| cache.get(&format!("token-{i}")).is_some())
            .count();
        assert!((4..=8).contains(&kept), "{kept} tokens kept");
        assert!(cache.get("token-99").is_some(), "the newest is kept");
    }

    /// Tokens that land in set 0 of `cache`.
    fn same_set(cache: &VerifiedTokens, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("tok-{i}"))
            .filter(|t| cache.set_index(cache.hasher.hash_one(t.as_str())) == 0)
            .take(n)
            .collect()
    }

    #[test]
    fn four_tokens_sharing_a_set_are_all_kept() {
        let cache = VerifiedTokens::new(64);
        let tokens = same_set(&cache, 4);
        for t in &tokens {
            cache.insert(t, verified(t, 100, None));
        }
        for _ in 0..3 {
            for t in &tokens {
                assert_eq!(&*cache.get(t).expect("kept").user_id, t.as_str());
            }
        }
    }

    #[test]
    fn a_fifth_token_in_a_set_replaces_the_least_recently_used() {
        let cache = VerifiedTokens::new(64);
        let tokens = same_set(&cache, 5);
        for t in &tokens[..4] {
            cache.insert(t, verified(t, 100, None));
        }
        // Use all but tokens[1], which becomes the least recently used.
        for i in [0, 2, 3] {
            assert!(cache.get(&tokens[i]).is_some());
        }
        cache.insert(&tokens[4], verified(&tokens[4], 100, None));
        assert!(
            cache.get(&tokens[1]).is_none(),
            "the least recently used stayed"
        );
        for i in [0, 2, 3, 4] {
            assert!(cache.get(&tokens[i]).is_some(), "token {i} was evicted");
        }
    }

    #[test]
    fn storing_a_token_again_keeps_one_copy() {
        let cache = VerifiedTokens::new(4);
        cache.insert("t", verified("old", 100, None));
        cache.insert("t", verified("new", 100, None));
        assert_eq!(&*cache.get("t").unwrap().user_id, "new");
        cache.remove("t");
        assert!(cache.get("t").is_none(), "a second copy survived");
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let cache = VerifiedTokens::new(0);
        cache.insert("t", verified("u", 100, None));
        assert!(cache.get("t").is_none());
    }

    #[test]
    fn time_is_checked_with_leeway_on_both_ends() {
        let v = verified("u", 1000, Some(500));
        assert!(v.check_time(1000, 0).is_ok());
        assert!(v.check_time(1029, 30).is_ok());
        assert!(matches!(
            v.check_time(1031, 30),
            Err(Rejection::TokenExpired)
        ));
        assert!(v.check_time(471, 30).is_ok());
        assert!(matches!(
            v.check_time(469, 30),
            Err(Rejection::TokenInvalid)
        ));
    }
}
