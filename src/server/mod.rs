//! The public listener: accept on the control thread, deal each connection to a worker thread,
//! where `connection` serves it. On shutdown, accepting stops and open connections finish
//! their in-flight requests.

mod connection;
mod http1;
mod io;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::app::AppService;
use crate::config::ServerConfig;

use connection::Connection;

/// The connection-level limits the server applies.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

impl From<&ServerConfig> for ConnLimits {
    fn from(c: &ServerConfig) -> Self {
        ConnLimits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            shutdown_grace: c.shutdown_grace,
            max_header_bytes: c.max_header_bytes,
            max_connections: c.max_connections,
        }
    }
}

/// Most header lines the HTTP layer parses in one request; more is a bare 431 from it.
const MAX_HEADERS: usize = 512;

/// An HTTP/1.1 connection with nothing in flight for this long, between messages, lets go of
/// its engine and buffers and waits for the client's next byte on the bare socket.
/// Short enough that idle game clients spend nearly all their life this way, and that a burst
/// of new connections never has many holding buffers at once (the allocator keeps a peak's
/// memory long after); long enough that a connection under load, its next request a
/// millisecond away, does not pay to rebuild its engine each time.
const REST_AFTER: Duration = Duration::from_millis(20);

/// How long an HTTP/2 connection asked to close for idleness may take to finish what it has in
/// flight (hyper's graceful close waits for it) before it is dropped: a client that stopped
/// reading a response would otherwise hold its connection, and an upstream one, for ever.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// TCP keepalive on client sockets: a client that vanished without closing (a phone that lost
/// its network) is noticed after about two minutes of silence, rather than holding its
/// connection, its slot under `server.max_connections` and a WebSocket tunnel's upstream
/// connection until something is written to it, or for ever. Idle HTTP connections close long
/// before it matters; tunnels are what it is for.
const CLIENT_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(5);

/// Keepalive probes are not sent while data waits to be acknowledged, so a tunnel that keeps
/// writing to a vanished client would be held by retransmissions (about 15 minutes): written
/// data unacknowledged this long ends the connection too (`TCP_USER_TIMEOUT`, Linux).
const CLIENT_USER_TIMEOUT: Duration = Duration::from_secs(120);

/// Sets [`CLIENT_KEEPALIVE`] and [`CLIENT_USER_TIMEOUT`] on an accepted client socket.
fn watch_for_vanished_client(stream: &tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_tcp_keepalive(&CLIENT_KEEPALIVE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_user_timeout(Some(CLIENT_USER_TIMEOUT));
}

/// An accept error that concerns only the connection being accepted, not the listener.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    )
}

impl ConnLimits {
    /// The HTTP layer's own hard cap on a request head: well above `max_header_bytes`, so that
    /// the limits layer decides (with a JSON 431) every case up to it; past it the HTTP/1.1
    /// engine and h2 refuse with a bare 431 before the stack sees the request.
    pub fn hard_header_cap(&self) -> usize {
        (self.max_header_bytes * 4).max(64 * 1024)
    }
}

/// Public connections by state, for metrics and tests.
#[derive(Debug, Default)]
pub struct ConnCounts {
    open: AtomicUsize,
    resting: AtomicUsize,
}

impl ConnCounts {
    /// Open public connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// HTTP/1.1 connections at rest: waiting for their client's next request on the bare
    /// socket, holding no parser or buffers.
    pub fn resting(&self) -> usize {
        self.resting.load(Ordering::Relaxed)
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<ConnCounts>);

impl OpenGuard {
    fn new(counts: Arc<ConnCounts>) -> Self {
        counts.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(counts)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection as resting while it waits for its client.
struct RestingGuard<'a>(&'a ConnCounts);

impl<'a> RestingGuard<'a> {
    fn new(counts: &'a ConnCounts) -> Self {
        counts.resting.fetch_add(1, Ordering::Relaxed);
        RestingGuard(counts)
    }
}

impl Drop for RestingGuard<'_> {
    fn drop(&mut self) {
        self.0.resting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains for at most
/// `limits.shutdown_grace`. Returns once every connection has closed or the grace ran out.
///
/// The calling task only accepts. Each accepted connection goes, round robin, to one of
/// `services.len()` worker threads, each running a single-threaded runtime with its own copy of
/// the stack (and so its own upstream pool). Everything a request does, from parsing its head to
/// writing the upstream's answer, then happens on one thread: on a work-stealing runtime the
/// hand-offs between the client connection, the upstream connection and the pool cost a
/// cross-thread wakeup each, which was the largest single cost of a proxied request.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    services: Vec<AppService>,
    limits: ConnLimits,
    counts: Arc<ConnCounts>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared_limits = Arc::new(limits.clone());
    let mut workers = Vec::with_capacity(services.len());
    for (index, app) in services.into_iter().enumerate() {
        let shared = WorkerShared {
            app,
            tls: tls.clone(),
            limits: shared_limits.clone(),
            stop: stop_rx.clone(),
            counts: counts.clone(),
        };
        workers.push(Worker::start(index, shared)?);
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);

    let mut next = 0;
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // One connection's trouble (reset before it was taken): on with the next.
                Err(e) if per_connection(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                    continue;
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        watch_for_vanished_client(&stream);
        // Leave this runtime's poller, to join the worker's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand over a connection");
                continue;
            }
        };
        let mut accepted = Accepted {
            stream,
            peer,
            permit,
        };
        // A worker whose thread has died refuses; the next one takes the connection.
        for _ in 0..workers.len() {
            let worker = &workers[next % workers.len()];
            next = next.wrapping_add(1);
            match worker.inbox.send(accepted) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => accepted = back,
            }
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    // Every worker hears it at once, so that their graces run side by side: one after the
    // other, a drain would take workers × shutdown_grace.
    let done: Vec<_> = workers.into_iter().map(Worker::finish).collect();
    for worker in done {
        if worker.await.is_err() {
            tracing::error!("a worker thread ended abnormally");
        }
    }
    Ok(())
}

/// A connection on its way from the acceptor to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    /// Held for the connection's life: `server.max_connections`.
    permit: OwnedSemaphorePermit,
}

/// What every worker's connections share.
struct WorkerShared {
    app: AppService,
    tls: Option<TlsAcceptor>,
    limits: Arc<ConnLimits>,
    stop: watch::Receiver<bool>,
    counts: Arc<ConnCounts>,
}

/// One connection-serving thread and its single-threaded runtime.
struct Worker {
    inbox: mpsc::UnboundedSender<Accepted>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    fn start(index: usize, shared: WorkerShared) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (inbox, arrivals) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("portcullis-worker-{index}"))
            .spawn(move || {
                runtime.block_on(shared.run(arrivals));
                // Dropping the runtime ends what is left on it (idle pool connections and, past
                // the grace, unfinished connections) before the acceptor hears that we are done.
                drop(runtime);
                let _ = done_tx.send(());
            })?;
        Ok(Worker { inbox, done })
    }

    /// Stops handing over connections; the worker is drained when the receiver resolves.
    fn finish(self) -> oneshot::Receiver<()> {
        drop(self.inbox);
        self.done
    }
}

impl WorkerShared {
    /// Serves each connection handed over until the acceptor hangs up, then waits at most
    /// `shutdown_grace` for the open ones (which the stop signal has told to finish).
    async fn run(self, mut arrivals: mpsc::UnboundedReceiver<Accepted>) {
        let tracker = TaskTracker::new();
        while let Some(Accepted {
            stream,
            peer,
            permit,
        }) = arrivals.recv().await
        {
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot take over a connection");
                    continue;
                }
            };
            let conn = Connection {
                app: Arc::new(std::sync::Mutex::new(self.app.clone())),
                tls: self.tls.clone(),
                limits: self.limits.clone(),
                peer,
                stop: self.stop.clone(),
                counts: self.counts.clone(),
            };
            let open = OpenGuard::new(self.counts.clone());
            tracker.spawn(async move {
                conn.run(stream).await;
                drop(open);
                drop(permit);
            });
        }
        tracker.close();
        if tokio::time::timeout(self.limits.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "shutdown grace elapsed with connections still open"
            );
        }
    }
}
