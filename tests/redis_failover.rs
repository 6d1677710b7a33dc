//! A Redis failover: the master portcullis talks to is demoted to a replica. Redis 7 keeps its
//! clients connected through that, and a replica answers PING and reads, so nothing looks
//! broken until a write is refused (`READONLY`). portcullis must then refuse what needs Redis
//! with 503 and forward nothing, report not ready, re-open its connection, and serve again
//! without a restart once the address it was given reaches a master.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// `[session]` for tests that need every session check to reach Redis and write: no local
/// cache (and so no heartbeat), and `lastActive` moved on every check.
const EVERY_CHECK_WRITES: &str =
    "[session]\nlocal_cache = false\nlast_active_resolution = \"0s\"\n";

/// The Redis address portcullis is given, standing in for a Kubernetes Service or a DNS name
/// that a failover moves: each new connection goes to the server it names now, while those
/// already open stay where they are.
struct ServiceAddress {
    addr: SocketAddr,
    target: Arc<AtomicU16>,
    task: JoinHandle<()>,
}

impl ServiceAddress {
    async fn start(redis: &RedisServer) -> ServiceAddress {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(AtomicU16::new(redis.port));
        let current = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = current.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        ServiceAddress { addr, target, task }
    }

    /// New connections go to `redis` from now on.
    fn point_at(&self, redis: &RedisServer) {
        self.target.store(redis.port, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for ServiceAddress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `REPLICAOF` the given master, or `REPLICAOF NO ONE` (promotion) with `None`.
fn replicate(admin: &mut redis::Connection, master: Option<&RedisServer>) {
    let mut cmd = redis::cmd("REPLICAOF");
    match master {
        Some(master) => cmd.arg("127.0.0.1").arg(master.port),
        None => cmd.arg("NO").arg("ONE"),
    };
    let _: () = cmd.query(admin).unwrap();
}

/// A field of `INFO replication`.
fn replication(admin: &mut redis::Connection, field: &str) -> Option<String> {
    let info: String = redis::cmd("INFO").arg("replication").query(admin).unwrap();
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_string)
}

/// Waits (bounded) until the replica has everything the master wrote so far, so that
/// promoting it loses nothing.
async fn in_sync(master: &mut redis::Connection, replica: &mut redis::Connection) {
    eventually("the replica to catch up with its master", || {
        let written = replication(master, "master_repl_offset");
        let link = replication(replica, "master_link_status");
        let applied = replication(replica, "slave_repl_offset");
        let synced = link.as_deref() == Some("up") && written.is_some() && applied == written;
        async move { synced }
    })
    .await;
}

/// One client of a Redis server as `CLIENT LIST` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Client {
    id: u64,
    flags: String,
}

impl Client {
    /// Runs `CLIENT TRACKING` (the local session cache's connection).
    fn tracks(&self) -> bool {
        self.flags.contains('t')
    }
}

/// The ordinary clients of the server behind `admin`, leaving out `admin` itself (and
/// replication links).
fn clients(admin: &mut redis::Connection) -> BTreeSet<Client> {
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(admin).unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("normal")
        .query(admin)
        .unwrap();
    list.lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_string)
            };
            Some(Client {
                id: field("id")?.parse().ok()?,
                flags: field("flags")?,
            })
        })
        .filter(|c| c.id != me)
        .collect()
}

fn ids(clients: &BTreeSet<Client>) -> BTreeSet<u64> {
    clients.iter().map(|c| c.id).collect()
}

async fn readyz(proxy: &Proxy) -> (u16, serde_json::Value) {
    let resp = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, json(resp).await)
}

async fn proxied(proxy: &Proxy, user: &str, sid: &str) -> reqwest::Response {
    client()
        .get(proxy.url("/game"))
        .bearer_auth(token(user, Some(sid)))
        .send()
        .await
        .unwrap()
}

async fn create(proxy: &Proxy, user: &str) -> reqwest::Response {
    client()
        .post(proxy.url("/api/v1/sessions/create"))
        .bearer_auth(token(user, None))
        .send()
        .await
        .unwrap()
}

/// Everything that needs Redis is refused with 503 and nothing reaches the upstream.
async fn fails_closed(proxy: &Proxy, upstream: &Upstream, user: &str, sid: &str) {
    let forwarded = upstream.count();
    for attempt in 0..3 {
        let resp = proxied(proxy, user, sid).await;
        println!("proxied, attempt {attempt}: {}", resp.status());
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert_error(create(proxy, user).await, 503, "SESSION_STORE_UNAVAILABLE").await;
    }
    assert_eq!(
        upstream.count(),
        forwarded,
        "a request was forwarded unchecked"
    );
}

/// Polls a proxied request (bounded) until it is admitted; until then each is refused with
/// 503 and none is forwarded.
async fn admitted_again(proxy: &Proxy, upstream: &Upstream, user: &str, sid: &str) {
    let forwarded = upstream.count();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = proxied(proxy, user, sid).await;
        if resp.status() == 200 {
            break;
        }
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert_eq!(upstream.count(), forwarded, "forwarded while refused");
        assert!(
            Instant::now() < deadline,
            "portcullis did not serve again within 10 s of a master being back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.count(), forwarded + 1);
    assert_eq!(upstream.last().headers["x-session-id"], sid);
}

#[tokio::test]
async fn a_write_refused_by_a_demoted_master_fails_closed_and_reopens_the_connection() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let (mut admin_a, mut admin_b) = (a.conn(), b.conn());
    replicate(&mut admin_b, Some(&a));
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &a, EVERY_CHECK_WRITES)).await;
    let sid = create_session(&proxy, &token("alice", None)).await;
    assert_eq!(proxied(&proxy, "alice", &sid).await.status(), 200);
    let before = ids(&clients(&mut admin_a));
    assert!(!before.is_empty(), "portcullis has no connection to A");
    in_sync(&mut admin_a, &mut admin_b).await;

    // The failover: B is promoted, A follows it. portcullis' connection to A stays open.
    replicate(&mut admin_b, None);
    replicate(&mut admin_a, Some(&b));
    let forwarded = upstream.count();
    // The first check after it: the session exists on A, but sliding it is a write.
    let resp = proxied(&proxy, "alice", &sid).await;
    assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
    assert_eq!(upstream.count(), forwarded, "forwarded on a refused write");
    fails_closed(&proxy, &upstream, "alice", &sid).await;
    let (status, body) = readyz(&proxy).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    // The connection that got READONLY was let go (new ones to A are refused: A is a replica).
    eventually("portcullis to close its connection to A", || {
        let closed = ids(&clients(&mut admin_a)).is_disjoint(&before);
        async move { closed }
    })
    .await;

    // A is a master again (the address portcullis was given reaches a master).
    replicate(&mut admin_a, None);
    admitted_again(&proxy, &upstream, "alice", &sid).await;
    let (status, body) = readyz(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let after = ids(&clients(&mut admin_a));
    assert!(
        !after.is_empty(),
        "portcullis serves without a connection to A?"
    );
    assert!(after.is_disjoint(&before), "{before:?} {after:?}");
}

/// With the local cache on (the default), its heartbeat is what usually meets a demoted master
/// first; that is counted as `not_writable` (op `heartbeat`), so the failover shows in the
/// metric operators watch even before a request fails.
#[tokio::test]
async fn a_demotion_the_cache_heartbeat_meets_is_counted_as_not_writable() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let mut admin_a = a.conn();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &a, "")).await;
    eventually("/readyz to be 200", || async {
        readyz(&proxy).await.0 == 200
    })
    .await;
    let counted = "portcullis_redis_errors_total{op=\"heartbeat\",kind=\"not_writable\"}";
    assert!(!proxy.metrics_text().await.contains(counted));

    replicate(&mut admin_a, Some(&b));
    eventually("the heartbeat's refused write to be counted", || async {
        proxy.metrics_text().await.contains(counted)
    })
    .await;
}

#[tokio::test]
async fn readyz_is_not_ready_while_redis_is_a_replica() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let mut admin_a = a.conn();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &a, EVERY_CHECK_WRITES)).await;
    let (status, body) = readyz(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let before = ids(&clients(&mut admin_a));

    // Nothing has written since: only the readiness check can notice.
    replicate(&mut admin_a, Some(&b));
    let (status, body) = readyz(&proxy).await;
    println!("{body}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["checks"]["redis"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot take writes"), "{body}");
    // And it stays so while A is a replica: new connections to it are not used.
    for _ in 0..3 {
        let (status, body) = readyz(&proxy).await;
        assert_eq!(status, 503, "{body}");
    }
    eventually("portcullis to close its connection to A", || {
        let closed = ids(&clients(&mut admin_a)).is_disjoint(&before);
        async move { closed }
    })
    .await;

    replicate(&mut admin_a, None);
    eventually("/readyz to turn 200", || async {
        readyz(&proxy).await.0 == 200
    })
    .await;
    let after = ids(&clients(&mut admin_a));
    assert!(
        !after.is_empty() && after.is_disjoint(&before),
        "{before:?} {after:?}"
    );
}

#[tokio::test]
async fn a_replica_cut_off_from_its_master_is_not_ready_and_refuses_sessions() {
    let a = RedisServer::start();
    let mut admin_a = a.conn();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &a, EVERY_CHECK_WRITES)).await;
    let sid = create_session(&proxy, &token("alice", None)).await;
    assert_eq!(proxied(&proxy, "alice", &sid).await.status(), 200);
    let before = ids(&clients(&mut admin_a));

    // A replica of a master that is gone, told not to answer from its stale data: every
    // command but a few (ROLE among them) gets MASTERDOWN, PING included.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("replica-serve-stale-data")
        .arg("no")
        .query(&mut admin_a)
        .unwrap();
    let gone = dead_addr();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(gone.port())
        .query(&mut admin_a)
        .unwrap();
    let (status, body) = readyz(&proxy).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["checks"]["redis"].as_str().unwrap_or_default();
    assert!(reason.contains("MASTERDOWN"), "{body}");
    fails_closed(&proxy, &upstream, "alice", &sid).await;

    replicate(&mut admin_a, None);
    admitted_again(&proxy, &upstream, "alice", &sid).await;
    let after = ids(&clients(&mut admin_a));
    assert!(
        !after.is_empty() && after.is_disjoint(&before),
        "{before:?} {after:?}"
    );
}

#[tokio::test]
async fn a_failover_behind_the_redis_address_is_followed_without_a_restart() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let (mut admin_a, mut admin_b) = (a.conn(), b.conn());
    replicate(&mut admin_b, Some(&a));
    let service = ServiceAddress::start(&a).await;
    let upstream = Upstream::echo().await;
    // The local session cache is on (the default).
    let proxy = Proxy::start(&format!(
        "[upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n",
        upstream.url(),
        service.url()
    ))
    .await;
    let kept = create_session(&proxy, &token("alice", None)).await;
    let revoked = create_session(&proxy, &token("bob", None)).await;
    for (user, sid) in [("alice", &kept), ("bob", &revoked)] {
        // The first check fills the local cache, the second is answered from it.
        assert_eq!(proxied(&proxy, user, sid).await.status(), 200);
        assert_eq!(proxied(&proxy, user, sid).await.status(), 200);
    }
    let tracking = |admin: &mut redis::Connection| -> BTreeSet<Client> {
        clients(admin).into_iter().filter(Client::tracks).collect()
    };
    let before = tracking(&mut admin_a);
    assert_eq!(before.len(), 1, "{before:?}");
    in_sync(&mut admin_a, &mut admin_b).await;

    // The failover: B is promoted and A follows it, while the address still leads to A (a
    // DNS record or Service not yet updated). Nothing is written: the heartbeat notices.
    replicate(&mut admin_b, None);
    replicate(&mut admin_a, Some(&b));
    eventually("/readyz to turn 503", || async {
        readyz(&proxy).await.0 == 503
    })
    .await;
    fails_closed(&proxy, &upstream, "alice", &kept).await;
    fails_closed(&proxy, &upstream, "bob", &revoked).await;
    eventually("portcullis to close its connection to A", || {
        let closed = tracking(&mut admin_a).is_empty();
        async move { closed }
    })
    .await;
    // Meanwhile bob's session is destroyed on the new master: had the cache kept it,
    // it would be admitted from memory once portcullis reconnects.
    let _: i64 = redis::cmd("DEL")
        .arg(sessions_key("bob"))
        .query(&mut admin_b)
        .unwrap();

    // The address now leads to the new master.
    service.point_at(&b);
    admitted_again(&proxy, &upstream, "alice", &kept).await;
    let (status, body) = readyz(&proxy).await;
    assert_eq!(status, 200, "{body}");
    assert_error(
        proxied(&proxy, "bob", &revoked).await,
        401,
        "SESSION_INVALID",
    )
    .await;
    assert_eq!(create(&proxy, "alice").await.status(), 201);
    // One connection, tracking, on the new master; none left on the old one.
    assert_eq!(
        tracking(&mut admin_b).len(),
        1,
        "{:?}",
        clients(&mut admin_b)
    );
    assert!(tracking(&mut admin_a).is_empty());
}
