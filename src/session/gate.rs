//! The session gate on proxied requests: on `session` routes the token's session must be live
//! and owned by the token's subject; it is slid in the same Redis round trip. The verified
//! identity travels on as [`Identity`] for the forwarder to turn into headers. A store that
//! cannot answer fails closed with 503.

use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};
use uuid::Uuid;

use crate::authn::Authenticated;
use crate::config::AuthMode;
use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::forward::UpgradeHandoff;
use crate::on_response::OnResponse;
use crate::routes::RouteClass;
use crate::session::tunnels::TunnelSession;
use crate::session::{Platform, Sessions};
use crate::{Body, BoxResponse};

/// The identity portcullis vouches for to the upstream.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub session_id: Option<Uuid>,
    pub platform: Option<Platform>,
}

/// Where a request's admission is decided.
enum Admission<'a> {
    /// Without Redis: the route needs no session, the token carries no usable one, or the
    /// local cache vouches for it.
    Decided(Result<Option<Identity>, Rejection>),
    /// The session must be checked (and slid) in Redis.
    AskStore(&'a Authenticated, Uuid),
}

/// Decides the identity of a proxied request where that needs no Redis.
fn admit_now<'a>(
    sessions: &Sessions,
    mode: AuthMode,
    who: Option<&'a Authenticated>,
) -> Admission<'a> {
    let decided = match mode {
        AuthMode::None => Ok(None),
        AuthMode::Jwt => who.ok_or(Rejection::TokenMissing).map(|who| {
            Some(Identity {
                user_id: who.user_id.clone(),
                session_id: None,
                platform: None,
            })
        }),
        AuthMode::Session => {
            let Some(who) = who else {
                return Admission::Decided(Err(Rejection::TokenMissing));
            };
            let Some(session_id) = who
                .session_hint
                .as_deref()
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                return Admission::Decided(Err(Rejection::SessionInvalid));
            };
            match sessions.touch_cached(&who.user_id, session_id) {
                Some(platform) => Ok(Some(Identity {
                    user_id: who.user_id.clone(),
                    session_id: Some(session_id),
                    platform: Some(platform),
                })),
                None => return Admission::AskStore(who, session_id),
            }
        }
    };
    Admission::Decided(decided)
}

/// Decides the identity of a proxied request whose session Redis must check and slide.
async fn admit_from_store(
    sessions: &Sessions,
    who: &Authenticated,
    session_id: Uuid,
) -> Result<Identity, Rejection> {
    match sessions.touch_in_store(&who.user_id, session_id).await {
        Ok(Some(platform)) => Ok(Identity {
            user_id: who.user_id.clone(),
            session_id: Some(session_id),
            platform: Some(platform),
        }),
        Ok(None) => Err(Rejection::SessionInvalid),
        Err(e) => {
            tracing::warn!(error = %e, "session check failed; refusing the request");
            Err(Rejection::StoreUnavailable)
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
    type Future = Either<Decided<S::Future, S::Error>, BoxResponse<S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let facts = RequestFacts::of(&req);
        let mode = match facts.route {
            Some(RouteClass::Proxy { auth, .. }) => auth,
            _ => AuthMode::Session,
        };
        let decided = match admit_now(&self.sessions, mode, facts.who.as_ref()) {
            Admission::Decided(decided) => decided,
            Admission::AskStore(who, session_id) => {
                let who = who.clone();
                return Either::Right(self.ask_store(req, who, session_id));
            }
        };
        Either::Left(match decided {
            Ok(None) => Either::Left(OnResponse::unchanged(self.inner.call(req))),
            Ok(Some(identity)) => {
                Either::Left(call_vouched(&mut self.inner, req, identity, &self.sessions))
            }
            Err(rejection) => Either::Right(std::future::ready(Ok(rejection.into_response()))),
        })
    }
}

/// Calls `inner` with the identity the gate vouches for: the forwarder turns it into headers,
/// and a response that did not come from upstream gets it here, for the access log and audit.
/// A request that asks to upgrade carries its session along: the tunnel it opens ends with it.
fn call_vouched<S: Service<Request<Body>, Response = Response<Body>>>(
    inner: &mut S,
    mut req: Request<Body>,
    identity: Identity,
    sessions: &Arc<Sessions>,
) -> OnResponse<S::Future, Identity> {
    if let Some(session) = identity.session_id {
        if req.extensions().get::<UpgradeHandoff>().is_some() {
            req.extensions_mut().insert(TunnelSession {
                sessions: sessions.clone(),
                user_id: identity.user_id.clone(),
                session,
            });
        }
    }
    RequestFacts::of_mut(&mut req).identity = Some(identity.clone());
    OnResponse::new(inner.call(req), identity, |identity, response| {
        RequestFacts::on_mut(response)
            .identity
            .get_or_insert(identity);
    })
}

/// The gate's future when it decided without Redis.
type Decided<F, E> = Either<OnResponse<F, Identity>, Ready<Result<Response<Body>, E>>>;

impl<S> SessionGate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Admits the request once Redis has checked its session.
    fn ask_store(
        &mut self,
        req: Request<Body>,
        who: Authenticated,
        session_id: Uuid,
    ) -> BoxResponse<S::Error> {
        let sessions = self.sessions.clone();
        // The clone that was driven ready is used; a fresh clone waits for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match admit_from_store(&sessions, &who, session_id).await {
                Ok(identity) => call_vouched(&mut inner, req, identity, &sessions).await,
                Err(rejection) => Ok(rejection.into_response()),
            }
        })
    }
}
