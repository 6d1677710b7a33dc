//! The public listener: accept, TLS handshake (ALPN picks h2 or http/1.1), or plain-text protocol
//! detection (HTTP/2 prior knowledge or HTTP/1.1), then one hyper connection per socket serving
//! the app's tower stack. Every stage before the request head is bounded by
//! `server.header_read_timeout`; idle connections are closed after `server.idle_timeout`; on
//! shutdown, accepting stops and open connections finish their in-flight requests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::app::AppService;
use crate::config::ServerConfig;
use crate::peer::ConnInfo;
use crate::Body;

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

/// Most header lines hyper parses in one request; more is a bare 431 from hyper itself.
const MAX_HEADERS: usize = 512;

impl ConnLimits {
    /// The HTTP layer's own hard cap on a request head: well above `max_header_bytes`, so that
    /// the limits layer decides (with a JSON 431) every case up to it; past it hyper and h2
    /// refuse with a bare 431 before any of portcullis sees the request.
    pub fn hard_header_cap(&self) -> usize {
        (self.max_header_bytes * 4).max(64 * 1024)
    }
}

/// Open public connections, for metrics and tests.
#[derive(Debug, Default)]
pub struct ConnCount(AtomicUsize);

impl ConnCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
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
    open: Arc<ConnCount>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Vec::with_capacity(services.len());
    for (index, app) in services.into_iter().enumerate() {
        let shared = WorkerShared {
            app,
            tls: tls.clone(),
            limits: limits.clone(),
            stop: stop_rx.clone(),
            open: open.clone(),
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
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
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
    for worker in workers {
        worker.finish().await;
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
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
    open: Arc<ConnCount>,
}

/// One connection-serving thread and its single-threaded runtime.
struct Worker {
    inbox: mpsc::UnboundedSender<Accepted>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    fn start(index: usize, shared: WorkerShared) -> io::Result<Worker> {
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

    /// Stops handing over connections and waits for the worker to drain.
    async fn finish(self) {
        drop(self.inbox);
        if self.done.await.is_err() {
            tracing::error!("a worker thread ended abnormally");
        }
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
                app: self.app.clone(),
                tls: self.tls.clone(),
                limits: self.limits.clone(),
                peer,
                stop: self.stop.clone(),
                open: self.open.clone(),
            };
            tracker.spawn(async move {
                conn.run(stream).await;
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

struct Connection {
    app: AppService,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    open: Arc<ConnCount>,
}

enum Protocol {
    Http1,
    Http2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Connection {
    async fn run(self, stream: TcpStream) {
        self.open.0.fetch_add(1, Ordering::Relaxed);
        let _open = OpenGuard(self.open.clone());
        let deadline = self.limits.header_read_timeout;
        match self.tls.clone() {
            Some(acceptor) => {
                let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                        return;
                    }
                };
                let protocol = match tls.get_ref().1.alpn_protocol() {
                    Some(b"h2") => Protocol::Http2,
                    _ => Protocol::Http1,
                };
                self.serve(tls, protocol, true).await;
            }
            None => {
                let protocol = match tokio::time::timeout(deadline, detect(&stream)).await {
                    Ok(Ok(Some(p))) => p,
                    _ => return,
                };
                self.serve(stream, protocol, false).await;
            }
        }
    }

    async fn serve<I>(self, io: I, protocol: Protocol, tls: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: io,
            activity: activity.clone(),
        });
        let service = ConnService {
            app: self.app.clone(),
            conn: ConnInfo {
                peer: self.peer,
                tls,
            },
            activity: activity.clone(),
        };

        let limits = &self.limits;
        match protocol {
            Protocol::Http1 => {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_buf_size(limits.hard_header_cap())
                    .max_headers(MAX_HEADERS);
                let conn = builder.serve_connection(io, service).with_upgrades();
                drive(conn, |c| c.graceful_shutdown(), activity, limits, self.stop).await;
            }
            Protocol::Http2 => {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .max_header_list_size(limits.hard_header_cap().try_into().unwrap_or(u32::MAX))
                    .max_concurrent_streams(256);
                let conn = builder.serve_connection(io, service);
                drive(conn, |c| c.graceful_shutdown(), activity, limits, self.stop).await;
            }
        }
    }
}

/// Adapts the app's tower stack to one hyper connection: marks each request with its
/// connection's facts and counts it as in flight until its response head is ready.
#[derive(Clone)]
struct ConnService {
    app: AppService,
    conn: ConnInfo,
    activity: Arc<Activity>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        let in_flight = InFlight::new(self.activity.clone());
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(self.conn);
        let body = Body::new(body);
        // Every layer of the stack is always ready (none applies backpressure through
        // poll_ready), so the stack is called directly rather than through `oneshot`.
        let response = self.app.clone().call(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await;
            drop(in_flight);
            response
        })
    }
}

/// Runs one hyper connection to completion, starting a graceful shutdown of it when the server
/// stops or when it has been idle (nothing in flight, no bytes moving) for `idle_timeout`.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    limits: &ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut closing = *stop.borrow();
    if closing {
        graceful_shutdown(conn.as_mut());
    }
    loop {
        let idle_check = tokio::time::sleep(activity.until_idle(limits.idle_timeout));
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = idle_check, if !closing => {
                if activity.is_idle(limits.idle_timeout) {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                }
            }
        }
    }
}

/// Reads just enough of a plain-text connection to tell HTTP/2 prior knowledge from HTTP/1.1.
async fn detect(stream: &TcpStream) -> io::Result<Option<Protocol>> {
    let mut buf = [0u8; 24];
    loop {
        stream.readable().await?;
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // A partial preface: wait for the rest (bounded by the caller's timeout).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct OpenGuard(Arc<ConnCount>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a connection last moved bytes, and how many requests it has in flight.
struct Activity {
    epoch: Instant,
    last_millis: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_millis: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_millis.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn is_idle(&self, idle_timeout: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.quiet_for() >= idle_timeout
    }

    /// How long to sleep before the connection could next be idle.
    fn until_idle(&self, idle_timeout: Duration) -> Duration {
        idle_timeout
            .saturating_sub(self.quiet_for())
            .max(Duration::from_millis(10))
    }
}

/// Counts a request as in flight until its response head is produced.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// An IO that records activity on every read and write.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.activity.touch();
            }
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.activity.touch();
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
