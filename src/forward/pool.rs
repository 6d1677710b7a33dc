//! One worker's keep-alive pool of HTTP/1.1 connections to the upstream.
//!
//! The connections speak portcullis' own client ([`super::client`]), in the request's task. A
//! connection goes back into the pool the moment its answer has been read to the end, from
//! inside the answer's body, so returning it costs no task and no wakeup. The most recently
//! returned connection is taken first: steady traffic keeps a small hot set busy, and the rest
//! reach `pool_idle_timeout`, when the reaper closes them.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use super::client::{self, Answer, Conn, Home};
use crate::config::UpstreamConfig;
use crate::{Body, BoxError};

pub use super::client::Upgraded;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// How often the reaper looks at idle connections for ones the upstream closed: their sockets
/// are let go within this, not at `pool_idle_timeout`. A look is one non-blocking read each.
const LOOK_AT_IDLE_EVERY: Duration = Duration::from_secs(1);

/// A request sent on a connection idle this long may be sent again if the upstream closes the
/// connection under it: a keep-alive timeout closes connections that have been idle.
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// What the pools count (exported as `portcullis_upstream_*`); clones count together.
#[derive(Clone, Debug, Default)]
pub struct PoolCounters {
    /// Connections opened to the upstream.
    pub opened: Counter,
    /// Requests sent again after their pooled connection closed under them.
    pub replayed: Counter,
    /// Connections waiting in the pools.
    pub idle: Gauge,
    /// Requests waiting for a connection while `upstream.max_connections` are open.
    pub waiting: Gauge,
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    #[error(
        "upstream.max_connections are open and none came free within upstream.connect_timeout"
    )]
    Busy,
    #[error(transparent)]
    Exchange(#[from] client::Error),
}

/// A worker's pool; clones share it. Its connections are used by the tasks of the runtime that
/// opened them, so a pool belongs to one worker.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    connector: Connector,
    /// `scheme://authority`: what the connector dials.
    target: Uri,
    /// Bounds the whole of connecting: name lookup, TCP, and the TLS handshake.
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Idle>,
    counters: PoolCounters,
    /// The places under `upstream.max_connections`, shared with every worker's pool.
    slots: Arc<UpstreamSlots>,
    /// Requests of this pool waiting for a connection while `slots` has none left.
    waiting: AtomicUsize,
    /// Told when a connection comes back while some are waiting.
    returned: Notify,
}

#[derive(Default)]
struct Idle {
    /// Oldest first: taken from the end, expired from the front.
    conns: Vec<IdleConn>,
    /// A reaper task is watching `conns`.
    reaping: bool,
}

/// A connection waiting in the pool, counted in the idle gauge while it waits.
struct IdleConn {
    /// Taken when the connection leaves the pool for an exchange.
    conn: Option<Conn>,
    since: Instant,
    gauge: Gauge,
}

impl IdleConn {
    fn new(conn: Conn, gauge: &Gauge) -> Self {
        gauge.inc();
        IdleConn {
            conn: Some(conn),
            since: Instant::now(),
            gauge: gauge.clone(),
        }
    }

    /// Still open, with nothing on it that no request asked for.
    fn is_open(&mut self) -> bool {
        self.conn.as_mut().is_some_and(Conn::is_open)
    }
}

impl Drop for IdleConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Pool {
    /// `slots` bounds the connections open to the upstream, with the other workers' pools: each
    /// connection holds a place until it closes.
    pub fn new(config: &UpstreamConfig, counters: PoolCounters, slots: Arc<UpstreamSlots>) -> Pool {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let connector = match &config.ca {
            Some(roots) => {
                let tls = rustls::ClientConfig::builder()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)
            }
            None => hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots(),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        let mut target = http::uri::Parts::default();
        target.scheme = Some(config.scheme.clone());
        target.authority = Some(config.authority.clone());
        target.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let shared = Arc::new(Shared {
            connector,
            target: Uri::from_parts(target).unwrap_or_default(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle,
            idle: Mutex::new(Idle::default()),
            counters,
            slots,
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
        });
        shared.slots.register(&shared);
        Pool(shared)
    }

    /// Sends `req` (origin-form target, Host set) on a pooled connection, or on a new one when
    /// none is ready. A 101 comes back with the connection, handed over to the new protocol.
    ///
    /// A pooled connection can be closed by the upstream (its keep-alive timeout, a reload) just
    /// as a request goes out on it. The request goes again on a new connection when the
    /// connection had been idle for [`REPLAY_AFTER_IDLE`] (the case of keep-alive timeouts)
    /// and repeating it is harmless: an idempotent method without a body, and no byte of an
    /// answer received.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Body>, Option<Upgraded>), PoolError> {
        if let Some((conn, idle)) = self.checkout() {
            // Kept only for connections at risk: copying the head costs 4% of a request.
            let replay = (idle >= REPLAY_AFTER_IDLE)
                .then(|| Replay::of(&req))
                .flatten();
            match client::exchange(conn, req, self.0.clone()).await {
                Ok(answer) => return Ok(answer.into()),
                Err(error) => match replay {
                    Some(replay) if error.closed_before_answer() => {
                        self.0.counters.replayed.inc();
                        tracing::debug!(
                            %error,
                            "pooled connection was closed; sending again on a new one"
                        );
                        req = replay.request();
                    }
                    _ => return Err(error.into()),
                },
            }
        }
        // Boxed: connecting is the rare path, and its state would make every request's future
        // (moved a few times on its way) several times larger.
        Box::pin(self.send_on_new_connection(req)).await
    }

    async fn send_on_new_connection(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Body>, Option<Upgraded>), PoolError> {
        let conn = self.connect().await?;
        Ok(client::exchange(conn, req, self.0.clone()).await?.into())
    }

    /// The most recently returned connection that is still open and not past its idle time,
    /// with how long it was idle.
    fn checkout(&self) -> Option<(Conn, Duration)> {
        let mut idle = self.0.idle.lock().ok()?;
        while let Some(mut parked) = idle.conns.pop() {
            let idle_for = parked.since.elapsed();
            if idle_for < self.0.idle_timeout && parked.is_open() {
                return parked.conn.take().map(|conn| (conn, idle_for));
            }
        }
        None
    }

    /// A connection for a request that found none idle: a new one, or, while
    /// `upstream.max_connections` are open, whichever comes first of one of this pool's coming
    /// back and a place coming free.
    async fn connect(&self) -> Result<Conn, PoolError> {
        let slot = match self.0.slots.permits.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = Waiting::new(self);
                let wait = self.0.connect_timeout;
                match tokio::time::timeout(wait, self.wait_for_room()).await {
                    Ok(Some(Room::Slot(slot))) => slot,
                    Ok(Some(Room::Returned(conn))) => return Ok(conn),
                    Ok(None) | Err(_) => return Err(PoolError::Busy),
                }
            }
        };
        // The connector's own timeout covers TCP only: an upstream that accepts and then never
        // finishes the TLS handshake would otherwise hold the request until request_timeout.
        // Counted from when the place is held: a wait for one is not the upstream's slowness.
        let connecting = self.0.connector.clone().oneshot(self.0.target.clone());
        let io = tokio::time::timeout(self.0.connect_timeout, connecting)
            .await
            .map_err(|_| PoolError::Connect("timed out connecting".into()))?
            .map_err(PoolError::Connect)?;
        self.0.counters.opened.inc();
        Ok(Conn::new(TokioIo::new(io), Some(slot)))
    }

    /// The first connection to come back to this pool or place to come free, closing another
    /// pool's idle connection for one when there is such; `None` if the places were closed.
    async fn wait_for_room(&self) -> Option<Room> {
        let permits = &self.0.slots.permits;
        loop {
            // Listening before looking: a connection that comes back in between is not missed.
            let returned = self.0.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some((conn, _)) = self.checkout() {
                return Some(Room::Returned(conn));
            }
            if let Ok(slot) = permits.clone().try_acquire_owned() {
                return Some(Room::Slot(slot));
            }
            if self.0.slots.close_an_idle_connection(&self.0) {
                continue;
            }
            tokio::select! {
                slot = permits.clone().acquire_owned() => return slot.ok().map(Room::Slot),
                () = &mut returned => {}
            }
        }
    }
}

/// The places under `upstream.max_connections`: one per connection open to the upstream, idle
/// ones and tunnels included, shared by every worker's pool.
pub struct UpstreamSlots {
    permits: Arc<Semaphore>,
    /// Requests waiting for a place, all pools together.
    waiting: AtomicUsize,
    /// Every pool, so that a request waiting for a place can close another's idle connection:
    /// it would otherwise hold its place until `pool_idle_timeout`.
    pools: Mutex<Vec<Weak<Shared>>>,
}

impl UpstreamSlots {
    pub fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(UpstreamSlots {
            permits: Arc::new(Semaphore::new(max_connections)),
            waiting: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
        })
    }

    fn register(&self, pool: &Arc<Shared>) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|p| p.strong_count() > 0);
            pools.push(Arc::downgrade(pool));
        }
    }

    /// Closes the longest idle connection of a pool other than `asking`, if any, freeing its
    /// place.
    fn close_an_idle_connection(&self, asking: &Shared) -> bool {
        let pools: Vec<Arc<Shared>> = match self.pools.lock() {
            Ok(pools) => pools.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return false,
        };
        for pool in pools
            .iter()
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), asking))
        {
            let closed = pool
                .idle
                .lock()
                .ok()
                .and_then(|mut idle| (!idle.conns.is_empty()).then(|| idle.conns.remove(0)));
            if closed.is_some() {
                // Dropped here, outside the lock: its place goes back now.
                return true;
            }
        }
        false
    }
}

/// What a request waiting for a connection gets.
enum Room {
    Slot(OwnedSemaphorePermit),
    Returned(Conn),
}

/// Counts a request among those waiting (its pool's, all pools', and the gauge) while it
/// waits.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(pool: &'a Pool) -> Self {
        let pool = &*pool.0;
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        pool.slots.waiting.fetch_add(1, Ordering::SeqCst);
        pool.counters.waiting.inc();
        Waiting(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.slots.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.counters.waiting.dec();
    }
}

impl From<Answer<Arc<Shared>>> for (Response<Body>, Option<Upgraded>) {
    fn from(answer: Answer<Arc<Shared>>) -> Self {
        match answer {
            Answer::Response(response) => (response.map(Body::new), None),
            Answer::Switched(response, upgraded) => (
                response.map(|()| Body::new(http_body_util::Empty::<Bytes>::new())),
                Some(upgraded),
            ),
        }
    }
}

impl Home for Arc<Shared> {
    /// Takes back a connection whose exchange is complete.
    fn take_back(&self, mut conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        // Requests of other pools, and none of this one, wait for a place: this connection's
        // goes to them. One of this pool's own takes the connection itself, below.
        let waiting_here = self.waiting.load(Ordering::SeqCst);
        if waiting_here == 0 && self.slots.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        conn.rest();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.conns.len() >= self.max_idle {
            idle.conns.remove(0);
        }
        idle.conns.push(IdleConn::new(conn, &self.counters.idle));
        // Read after the push (both SeqCst): a request that starts waiting after this read
        // looks in the pool after the push, and finds the connection there.
        // One connection, one waiter: the rest keep their places in the semaphore's queue.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
        if !idle.reaping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idle.reaping = true;
                runtime.spawn(reap(Arc::downgrade(self), self.idle_timeout));
            }
        }
    }
}

/// The head of a request that may be sent a second time.
struct Replay(http::request::Parts);

impl Replay {
    fn of(req: &Request<Body>) -> Option<Replay> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        if !idempotent || !http_body::Body::is_end_stream(req.body()) {
            return None;
        }
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        Some(Replay(head.into_parts().0))
    }

    fn request(&self) -> Request<Body> {
        let mut req = Request::new(Body::new(http_body_util::Empty::<Bytes>::new()));
        *req.method_mut() = self.0.method.clone();
        *req.uri_mut() = self.0.uri.clone();
        *req.version_mut() = self.0.version;
        *req.headers_mut() = self.0.headers.clone();
        req
    }
}

/// Closes idle connections as they pass `timeout`, and, looking every
/// [`LOOK_AT_IDLE_EVERY`], those the upstream closed; ends when none is left, until the next
/// one comes back.
async fn reap(pool: Weak<Shared>, timeout: Duration) {
    loop {
        let next_due = {
            let Some(shared) = pool.upgrade() else { return };
            let Ok(mut idle) = shared.idle.lock() else {
                return;
            };
            let now = Instant::now();
            idle.conns
                .retain_mut(|c| now.duration_since(c.since) < timeout && c.is_open());
            match idle.conns.first() {
                Some(oldest) => (oldest.since + timeout).min(now + LOOK_AT_IDLE_EVERY),
                None => {
                    idle.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next_due.into()).await;
    }
}
