//! Request size limits, applied before anything else looks at a request: the head (431) and the
//! body (413). A path the router could not judge safely (400) is refused here too, after the
//! access log has seen it. A declared Content-Length over the limit is refused at once; a streamed body is
//! cut off where it crosses the limit, and the forwarder turns that into a 413.

use std::convert::Infallible;
use std::future::Ready;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{header, Request, Response};
use http_body_util::Limited;
use tower::{Layer, Service};

use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::routes::RouteClass;
use crate::Body;

#[derive(Debug, Clone, Copy)]
pub struct RequestLimitsLayer {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
}

impl<S> Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimits {
            inner,
            limits: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLimits<S> {
    inner: S,
    limits: RequestLimitsLayer,
}

/// Size of the request head as it would be written in HTTP/1.1: request line and header lines.
pub fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

/// Most header lines a request may carry.
pub const MAX_HEADER_COUNT: usize = 100;

/// Checks a request against the limits without looking at its body.
pub fn check(req: &Request<Body>, limits: &RequestLimitsLayer) -> Result<(), Rejection> {
    if let Some(RouteClass::Invalid(e)) = RequestFacts::of(req).route {
        return Err(Rejection::InvalidPath(e));
    }
    if head_size(req) > limits.max_header_bytes || req.headers().len() > MAX_HEADER_COUNT {
        return Err(Rejection::HeadersTooLarge(limits.max_header_bytes));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes) {
        return Err(Rejection::PayloadTooLarge(limits.max_body_bytes));
    }
    Ok(())
}

impl<S> Service<Request<Body>> for RequestLimits<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    // The inner future as it is (no box around a box): this layer adds no step after it.
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if let Err(rejection) = check(&req, &self.limits) {
            return Either::Left(std::future::ready(Ok(rejection.into_response())));
        }
        // A body with nothing left to read cannot exceed the limit: it is not wrapped.
        if http_body::Body::is_end_stream(req.body()) {
            return Either::Right(self.inner.call(req));
        }
        let max = usize::try_from(self.limits.max_body_bytes).unwrap_or(usize::MAX);
        let req = req.map(|body| Body::new(Limited::new(body, max)));
        Either::Right(self.inner.call(req))
    }
}
