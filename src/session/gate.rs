//! The session gate on proxied requests: on `session` routes the token's session must be live
//! and owned by the token's subject; it is slid in the same Redis round trip. The verified
//! identity travels on as [`Identity`] for the forwarder to turn into headers. A store that
//! cannot answer fails closed with 503.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};
use uuid::Uuid;

use crate::authn::Authenticated;
use crate::config::AuthMode;
use crate::error::Rejection;
use crate::routes::RouteClass;
use crate::session::{Platform, Sessions};
use crate::{Body, BoxResponse};

/// The identity portcullis vouches for to the upstream.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub session_id: Option<Uuid>,
    pub platform: Option<Platform>,
}

/// Decides the identity of a proxied request, checking and sliding the session when the route
/// demands one.
pub async fn admit(
    sessions: &Sessions,
    mode: AuthMode,
    who: Option<&Authenticated>,
) -> Result<Option<Identity>, Rejection> {
    match mode {
        AuthMode::None => Ok(None),
        AuthMode::Jwt => {
            let who = who.ok_or(Rejection::TokenMissing)?;
            Ok(Some(Identity {
                user_id: who.user_id.clone(),
                session_id: None,
                platform: None,
            }))
        }
        AuthMode::Session => {
            let who = who.ok_or(Rejection::TokenMissing)?;
            let session_id = who
                .session_hint
                .as_deref()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or(Rejection::SessionInvalid)?;
            match sessions.touch(&who.user_id, session_id).await {
                Ok(Some(platform)) => Ok(Some(Identity {
                    user_id: who.user_id.clone(),
                    session_id: Some(session_id),
                    platform: Some(platform),
                })),
                Ok(None) => Err(Rejection::SessionInvalid),
                Err(e) => {
                    tracing::warn!(error = %e, "session check failed; refusing the request");
                    Err(Rejection::StoreUnavailable)
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct SessionGateLayer(pub Arc<Sessions>);

impl<S> Layer<S> for SessionGateLayer {
    type Service = SessionGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionGate {
            inner,
            sessions: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct SessionGate<S> {
    inner: S,
    sessions: Arc<Sessions>,
}

impl<S> Service<Request<Body>> for SessionGate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxResponse<S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let mode = match req.extensions().get::<RouteClass>() {
            Some(RouteClass::Proxy { auth, .. }) => *auth,
            _ => AuthMode::Session,
        };
        if mode == AuthMode::None {
            return Either::Left(self.inner.call(req));
        }
        let sessions = self.sessions.clone();
        // The clone that was driven ready is used; a fresh clone waits for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let who = req.extensions().get::<Authenticated>().cloned();
            match admit(&sessions, mode, who.as_ref()).await {
                Ok(None) => inner.call(req).await,
                Ok(Some(identity)) => {
                    req.extensions_mut().insert(identity.clone());
                    let mut response = inner.call(req).await?;
                    response.extensions_mut().insert(identity);
                    Ok(response)
                }
                Err(rejection) => Ok(rejection.into_response()),
            }
        }))
    }
}
