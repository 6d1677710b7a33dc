//! Tokens that verified recently, so that a client's next request with the same token skips the
//! signature check, which is most of what verification costs.
//!
//! An entry is found only by the exact token text, so a hit admits nothing that a full
//! verification would not; `exp` and `nbf` are checked again on every hit, with the same leeway.
//! Failures are never remembered. The table is direct-mapped: a token's slot comes from a keyed
//! hash, so a caller cannot aim at another's slot, and a newcomer simply replaces what was
//! there, which bounds memory at `capacity` tokens.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use foldhash::quality::RandomState;

use crate::error::Rejection;

/// A verified token's identity and validity window.
#[derive(Clone)]
pub struct Verified {
    pub user_id: Arc<str>,
    pub sid: Option<String>,
    pub exp: u64,
    pub nbf: Option<u64>,
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
    token: Box<str>,
    verified: Verified,
}

pub struct VerifiedTokens {
    slots: Box<[Mutex<Option<Entry>>]>,
    hasher: RandomState,
}

impl VerifiedTokens {
    /// Room for `capacity` tokens (rounded up to a power of two); 0 remembers none.
    pub fn new(capacity: usize) -> VerifiedTokens {
        let len = if capacity == 0 {
            0
        } else {
            capacity.next_power_of_two()
        };
        VerifiedTokens {
            slots: (0..len).map(|_| Mutex::new(None)).collect(),
            hasher: RandomState::default(),
        }
    }

    fn slot(&self, token: &str) -> Option<&Mutex<Option<Entry>>> {
        if self.slots.is_empty() {
            return None;
        }
        let index = self.hasher.hash_one(token) as usize & (self.slots.len() - 1);
        self.slots.get(index)
    }

    /// What `token` verified as, if it is remembered.
    pub fn get(&self, token: &str) -> Option<Verified> {
        let slot = self.slot(token)?.lock().ok()?;
        let entry = slot.as_ref()?;
        same_bytes(entry.token.as_bytes(), token.as_bytes()).then(|| entry.verified.clone())
    }

    pub fn insert(&self, token: &str, verified: Verified) {
        if let Some(Ok(mut slot)) = self.slot(token).map(Mutex::lock) {
            *slot = Some(Entry {
                token: token.into(),
                verified,
            });
        }
    }

    /// Forgets `token` (it has expired).
    pub fn remove(&self, token: &str) {
        if let Some(Ok(mut slot)) = self.slot(token).map(Mutex::lock) {
            if slot
                .as_ref()
                .is_some_and(|e| same_bytes(e.token.as_bytes(), token.as_bytes()))
            {
                *slot = None;
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
        let cache = VerifiedTokens::new(4);
        for i in 0..100 {
            cache.insert(&format!("token-{i}"), verified("u", 100, None));
        }
        let kept = (0..100)
            .filter(|i| cache.get(&format!("token-{i}")).is_some())
            .count();
        assert!((1..=4).contains(&kept), "{kept} tokens kept");
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
