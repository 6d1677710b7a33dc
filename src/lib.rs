//! portcullis: a session-enforcing reverse proxy for game backends.
//!
//! A request reads top to bottom through the modules. [`server`] accepts it and hands its
//! connection to a worker thread (TLS from [`tls`], the connection's [`peer`]); [`app`] holds the tower stack in order: [`request_id`], the
//! client address ([`peer`]), the route class ([`routes`]), [`access_log`] (with [`metrics`]
//! and the audit trail), browsers' cross-origin preflights ([`cors`]), size [`limits`], token verification ([`authn`]), [`rate_limit`], then
//! either the session API ([`session::api`]) or the session gate ([`session::gate`], with its
//! local cache [`session::cache`]) and finally [`forward`], which sends the request upstream
//! and streams the answer back (a WebSocket tunnel on a session route ends with its session:
//! [`session::tunnels`]). [`store`] is the only door to Redis. [`error`] is the one place
//! failures become responses; [`config`] is read and validated once at start; [`admin`] serves
//! health and metrics on its own port; [`echo`] is a demo upstream; [`inject`] adds the sidecar
//! to Kubernetes manifests. The layers that finish a response share [`on_response`]'s future;
//! what they learn about a request travels in [`facts`].

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod authn;
pub mod config;
pub mod cors;
pub mod echo;
pub mod error;
pub mod facts;
pub mod forward;
mod h1;
pub mod inject;
pub mod limits;
pub mod metrics;
pub mod on_response;
pub mod peer;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

/// Errors that only need to be reported.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of a middleware layer's response.
pub type BoxResponse<E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, E>> + Send>>;

/// The body of every request and response inside the stack: any streaming body, boxed.
///
/// A named type rather than an alias of `BoxBody<Bytes, BoxError>`: async blocks that hold the
/// alias across an await trip a compiler limitation on `dyn Error` lifetimes in `Send` checks.
pub struct Body(http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>);

impl Body {
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body(body.map_err(Into::into).boxed())
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl http_body::Body for Body {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
