//! WebSocket tunnels opened on a `session` route end when their session ends: destroyed
//! through the API on any replica, evicted by a newer session, or expired.
//!
//! A tunnel carries no requests for the gate to check, so each one holds a [`TunnelLease`]
//! that checks its session itself: at once when something may have ended it (this process
//! wrote the user's sessions, another client's write was announced by Redis invalidation, or
//! invalidations resumed after a gap), and every `slide_interval` otherwise, sliding it like
//! a request would. A player connected only by WebSocket is active: the session stays alive.
//! A check Redis cannot answer leaves the tunnel open (a Redis outage must not drop every
//! player); the next one decides.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::session::Sessions;

/// One open tunnel's entry: how to ask its lease to check its session.
struct Watched {
    id: u64,
    check: Arc<Notify>,
}

/// The open tunnels admitted on a session, by user id.
#[derive(Default)]
pub struct TunnelWatch {
    by_user: Mutex<HashMap<Arc<str>, Vec<Watched>>>,
    next_id: AtomicU64,
}

impl TunnelWatch {
    /// Asks every tunnel of `user_id` to check its session now.
    pub fn check_user(&self, user_id: &[u8]) {
        let Ok(by_user) = self.by_user.lock() else {
            return;
        };
        let Ok(user_id) = std::str::from_utf8(user_id) else {
            return;
        };
        for watched in by_user.get(user_id).into_iter().flatten() {
            watched.check.notify_one();
        }
    }

    /// Asks every tunnel to check its session now (invalidations may have been lost).
    pub fn check_all(&self) {
        let Ok(by_user) = self.by_user.lock() else {
            return;
        };
        for watched in by_user.values().flatten() {
            watched.check.notify_one();
        }
    }

    /// Open tunnels being watched.
    pub fn len(&self) -> usize {
        self.by_user
            .lock()
            .map_or(0, |by_user| by_user.values().map(Vec::len).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(&self, user_id: &Arc<str>) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let check = Arc::new(Notify::new());
        if let Ok(mut by_user) = self.by_user.lock() {
            by_user.entry(user_id.clone()).or_default().push(Watched {
                id,
                check: check.clone(),
            });
        }
        (id, check)
    }

    fn deregister(&self, user_id: &str, id: u64) {
        let Ok(mut by_user) = self.by_user.lock() else {
            return;
        };
        if let Some(tunnels) = by_user.get_mut(user_id) {
            tunnels.retain(|w| w.id != id);
            if tunnels.is_empty() {
                by_user.remove(user_id);
            }
        }
    }

    #[cfg(test)]
    fn ids_of(&self, user_id: &str) -> Vec<u64> {
        let by_user = self.by_user.lock().unwrap();
        by_user
            .get(user_id)
            .map(|t| t.iter().map(|w| w.id).collect())
            .unwrap_or_default()
    }
}

/// The session a request that asks to upgrade was admitted on, carried (as a request
/// extension) to the forwarder, which watches it once the upstream accepts the upgrade.
#[derive(Clone)]
pub struct TunnelSession {
    pub sessions: Arc<Sessions>,
    pub user_id: Arc<str>,
    pub session: Uuid,
}

impl TunnelSession {
    /// Starts watching the session for the tunnel that now opens. Its first check is at once:
    /// the session may have ended while the upstream was accepting the upgrade, when nothing
    /// was registered to hear of it.
    pub fn watch(self) -> TunnelLease {
        let (id, check) = self.sessions.tunnels().register(&self.user_id);
        check.notify_one();
        TunnelLease {
            sessions: self.sessions,
            user_id: self.user_id,
            session: self.session,
            id,
            check,
        }
    }
}

/// A tunnel's hold on its session; dropping it stops the watching.
pub struct TunnelLease {
    sessions: Arc<Sessions>,
    user_id: Arc<str>,
    session: Uuid,
    id: u64,
    check: Arc<Notify>,
}

impl TunnelLease {
    /// Resolves once the session has ended.
    pub async fn ended(&self) {
        let every = self.sessions.slide_interval();
        let mut slide_due = tokio::time::Instant::now() + every;
        loop {
            let slide = tokio::select! {
                _ = self.check.notified() => false,
                _ = tokio::time::sleep_until(slide_due) => true,
            };
            if slide {
                // From now, not from when it was due: a check slower than the interval must
                // not make the next ones run back to back.
                slide_due = tokio::time::Instant::now() + every;
            }
            // Asked: read only, so that checking never writes (and never sets off another
            // replica's checks). Due: slide, as a request would.
            let live = if slide {
                self.sessions
                    .touch_in_store(&self.user_id, self.session)
                    .await
                    .map(|p| p.is_some())
            } else {
                self.sessions
                    .get(&self.user_id, self.session, super::TokenCheck::NONE)
                    .await
                    .map(|s| s.is_some())
            };
            match live {
                Ok(true) => {}
                Ok(false) => {
                    self.sessions.metrics.tunnels_session_ended.inc();
                    tracing::info!(
                        user_id = %self.user_id,
                        session_id = %self.session,
                        "session ended; closing its tunnel"
                    );
                    return;
                }
                // Debug: during an outage every tunnel gets here each interval, and the store
                // already warns about Redis itself.
                Err(e) => {
                    tracing::debug!(error = %e, "cannot check a tunnel's session; it stays open");
                }
            }
        }
    }
}

impl Drop for TunnelLease {
    fn drop(&mut self) {
        self.sessions.tunnels().deregister(&self.user_id, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_and_go_and_checks_reach_only_their_user() {
        use std::future::Future;
        let watch = TunnelWatch::default();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        let (a1, alice_1) = watch.register(&alice);
        let (a2, alice_2) = watch.register(&alice);
        let (b1, bob_1) = watch.register(&bob);
        assert_eq!(watch.len(), 3);
        assert_eq!(watch.ids_of("alice"), [a1, a2]);

        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut asked = |n: &Arc<Notify>| {
            let notified = n.notified();
            futures_util::pin_mut!(notified);
            notified.poll(&mut cx).is_ready()
        };
        watch.check_user(b"alice");
        assert!(asked(&alice_1) && asked(&alice_2));
        assert!(!asked(&bob_1), "bob's tunnel was asked about alice's write");
        assert!(!asked(&alice_1), "one check, one answer");

        watch.check_all();
        assert!(asked(&alice_1) && asked(&alice_2) && asked(&bob_1));

        watch.deregister("alice", a1);
        watch.deregister("bob", b1);
        assert_eq!(watch.ids_of("alice"), [a2]);
        assert!(watch.ids_of("bob").is_empty());
        assert_eq!(watch.len(), 1);
    }
}
