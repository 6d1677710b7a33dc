//! One log line per request: method, path (never the query, which may carry tokens), status,
//! total and upstream time, client address, and the rejection code when portcullis answered
//! itself. Headers are never logged, so Authorization and Cookie cannot leak.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tower::{Layer, Service};

use crate::error::Rejection;
use crate::forward::UpstreamTime;
use crate::peer::ConnInfo;
use crate::Body;

#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let version = req.version();
        let peer = req.extensions().get::<ConnInfo>().map(|c| c.peer);
        // Boxed so the logging future below does not name the inner service's future type.
        let future: Self::Future = Box::pin(self.inner.call(req));
        Box::pin(async move {
            let result = future.await;
            if let Ok(response) = &result {
                let total_ms = started.elapsed().as_secs_f64() * 1000.0;
                let upstream_ms = response
                    .extensions()
                    .get::<UpstreamTime>()
                    .map(|t| t.0.as_secs_f64() * 1000.0);
                let code = response
                    .extensions()
                    .get::<Rejection>()
                    .map(Rejection::code);
                tracing::info!(
                    target: "portcullis::access",
                    method = %method,
                    path = %path,
                    version = ?version,
                    status = response.status().as_u16(),
                    total_ms,
                    upstream_ms,
                    peer = peer.map(tracing::field::display),
                    code,
                    "request"
                );
            }
            result
        })
    }
}
