//! One worker's keep-alive pool of HTTP/1.1 connections to the upstream.
//!
//! hyper's connection API driven directly. A connection goes back into the pool the moment its
//! response body has been read to the end, from inside that body, so returning it costs no task
//! and no wakeup. The most recently returned connection is taken first: steady traffic keeps a
//! small hot set busy, and the rest reach `pool_idle_timeout`, when the reaper closes them.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use crate::config::UpstreamConfig;
use crate::{Body, BoxError};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A request sent on a connection idle this long may be sent again if the upstream closes the
/// connection under it: a keep-alive timeout closes connections that have been idle.
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A worker's pool; clones share it. Its connections are driven by tasks on the runtime that
/// opened them, so a pool belongs to one worker.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    connector: Connector,
    /// `scheme://authority`: what the connector dials.
    target: Uri,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Oldest first: taken from the end, expired from the front.
    conns: Vec<IdleConn>,
    /// A reaper task is watching `conns`.
    reaping: bool,
}

struct IdleConn {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    pub fn new(config: &UpstreamConfig) -> Pool {
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
        Pool(Arc::new(Shared {
            connector,
            target: Uri::from_parts(target).unwrap_or_default(),
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle,
            idle: Mutex::new(Idle::default()),
        }))
    }

    /// Sends `req` (origin-form target, Host set) on a pooled connection, or on a new one when
    /// none is ready.
    ///
    /// A pooled connection can be closed by the upstream (its keep-alive timeout, a reload) just
    /// as a request goes out on it. A request it never sent moves on to the next connection.
    /// One it sent goes again on a new connection when the connection had been idle for
    /// [`REPLAY_AFTER_IDLE`] (the case of keep-alive timeouts) and repeating it is harmless: an
    /// idempotent method without a body, and no byte of a response received.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, PoolError> {
        while let Some((mut sender, idle)) = self.checkout() {
            // Kept only for connections at risk: copying the head costs 4% of a request.
            let replay = (idle >= REPLAY_AFTER_IDLE)
                .then(|| Replay::of(&req))
                .flatten();
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.attach(sender, response)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        let error = e.into_error();
                        match &replay {
                            Some(replay) if closed_under_request(&error) => {
                                tracing::debug!(
                                    %error,
                                    "pooled connection was closed; sending again on a new one"
                                );
                                req = replay.request();
                                break;
                            }
                            _ => return Err(error.into()),
                        }
                    }
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
    ) -> Result<Response<Body>, PoolError> {
        let mut sender = self.connect().await?;
        let response = sender.send_request(req).await?;
        Ok(self.attach(sender, response))
    }

    /// The most recently returned connection that is still open and not past its idle time,
    /// with how long it was idle.
    fn checkout(&self) -> Option<(SendRequest<Body>, Duration)> {
        let mut idle = self.0.idle.lock().ok()?;
        while let Some(conn) = idle.conns.pop() {
            let idle_for = conn.since.elapsed();
            if conn.sender.is_ready() && idle_for < self.0.idle_timeout {
                return Some((conn.sender, idle_for));
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, PoolError> {
        let io = self
            .0
            .connector
            .clone()
            .oneshot(self.0.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        // Writes flattened into one buffer, as the server side's (see `http1_builder`).
        let (sender, connection) = http1::Builder::new().writev(false).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// The response with a body that returns `sender` to the pool once read to the end. A 101
    /// hands the connection to the upgrade, so it never comes back.
    fn attach(&self, sender: SendRequest<Body>, response: Response<Incoming>) -> Response<Body> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return response.map(Body::new);
        }
        let home = Some((sender, self.0.clone()));
        response.map(|body| Body::new(PooledBody { body, home }))
    }
}

impl Shared {
    /// Takes back a connection whose exchange is complete. One that is not ready for another
    /// request (closed, or still sending a request body the upstream did not wait for) is let
    /// go, and hyper closes it when it is done.
    fn put_back(self: &Arc<Self>, sender: SendRequest<Body>) {
        if !sender.is_ready() || self.max_idle == 0 {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.conns.len() >= self.max_idle {
            idle.conns.remove(0);
        }
        idle.conns.push(IdleConn {
            sender,
            since: Instant::now(),
        });
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

/// The upstream closed or reset the connection before any of a response arrived.
fn closed_under_request(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            );
        }
        source = e.source();
    }
    false
}

/// Closes idle connections as they pass `timeout` (and forgets those the upstream closed);
/// ends when none is left, until the next one comes back.
async fn reap(pool: Weak<Shared>, timeout: Duration) {
    loop {
        let next_due = {
            let Some(shared) = pool.upgrade() else { return };
            let Ok(mut idle) = shared.idle.lock() else {
                return;
            };
            let now = Instant::now();
            idle.conns
                .retain(|c| now.duration_since(c.since) < timeout && !c.sender.is_closed());
            match idle.conns.first() {
                Some(oldest) => oldest.since + timeout,
                None => {
                    idle.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next_due.into()).await;
    }
}

/// An upstream response body that returns its connection to the pool when read to the end.
/// Dropped before that, it takes the connection with it: hyper cannot reuse a connection
/// with an unread response on it.
struct PooledBody {
    body: Incoming,
    home: Option<(SendRequest<Body>, Arc<Shared>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.home.take() {
            pool.put_back(sender);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Err(_)) => this.home = None,
            Some(Ok(_)) if !this.body.is_end_stream() => {}
            _ => this.release(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodiless responses (HEAD, 204, 304) are never polled: they end here.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
