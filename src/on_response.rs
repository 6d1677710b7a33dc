//! The response future of a layer that finishes the inner service's response (a header, an
//! extension, a log line) without awaiting anything of its own.
//!
//! A named future instead of a boxed `async` block: no allocation and no dynamic call per layer
//! per request, and the inner future stays in place instead of being moved into a box.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;

use crate::Body;

/// What a layer does to the response, with what it kept from the request.
pub type Hook<T> = fn(T, &mut Response<Body>);

pin_project_lite::pin_project! {
    /// The inner future's output, with `hook(state, &mut response)` applied to a response.
    pub struct OnResponse<F, T> {
        #[pin]
        inner: F,
        finish: Option<(T, Hook<T>)>,
    }
}

impl<F, T> OnResponse<F, T> {
    pub fn new(inner: F, state: T, hook: Hook<T>) -> Self {
        OnResponse {
            inner,
            finish: Some((state, hook)),
        }
    }

    /// The inner future's output as it is.
    pub fn unchanged(inner: F) -> Self {
        OnResponse {
            inner,
            finish: None,
        }
    }
}

impl<F, T, E> Future for OnResponse<F, T>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some((state, hook))) = (&mut result, this.finish.take()) {
            hook(state, response);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn ready_response() -> std::future::Ready<Result<Response<Body>, Infallible>> {
        std::future::ready(Ok(Response::new(Body::new(http_body_util::Empty::new()))))
    }

    fn poll_once<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("a ready inner future must finish on the first poll"),
        }
    }

    #[test]
    fn the_hook_sees_the_response_with_its_state() {
        let future = OnResponse::new(ready_response(), 418u16, |code, response| {
            *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
        });
        let Ok(response) = poll_once(future);
        assert_eq!(response.status(), 418);
    }

    #[test]
    fn unchanged_passes_the_response_through() {
        let future: OnResponse<_, u16> = OnResponse::unchanged(ready_response());
        let Ok(response) = poll_once(future);
        assert_eq!(response.status(), 200);
    }
}
