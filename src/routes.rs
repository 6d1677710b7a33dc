//! Which policy applies to a request: the session API, or a proxied route with its auth mode.
//! Prefixes match whole segments of the normalised path (percent-decoded once, dot segments
//! resolved, empty segments dropped), so `/public/../game` and `/public/%2e%2e/game` are judged
//! as `/game`. The path itself is still forwarded byte for byte.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use percent_encoding::percent_decode_str;
use tower::{Layer, Service};

use crate::config::{AuthMode, RouteConfig};
use crate::Body;

/// The class of a request, decided once and carried as an extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// The session API; `public` for its OpenAPI document.
    Api { public: bool },
    /// Forwarded upstream after the route's checks.
    Proxy(AuthMode),
}

/// The route table: the session API prefix first, then the longest matching `[[routes]]` prefix,
/// else `session`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    api_prefix: String,
    /// Longest prefix first.
    routes: Vec<RouteConfig>,
}

impl RouteTable {
    pub fn new(api_prefix: &str, routes: &[RouteConfig]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        RouteTable {
            api_prefix: api_prefix.to_string(),
            routes,
        }
    }

    pub fn api_prefix(&self) -> &str {
        &self.api_prefix
    }

    pub fn classify(&self, raw_path: &str) -> RouteClass {
        let path = normalise(raw_path);
        if matches_prefix(&self.api_prefix, &path) {
            let public = path == format!("{}/openapi.json", self.api_prefix);
            return RouteClass::Api { public };
        }
        let auth = self
            .routes
            .iter()
            .find(|r| matches_prefix(&r.path_prefix, &path))
            .map_or(AuthMode::Session, |r| r.auth);
        RouteClass::Proxy(auth)
    }
}

/// True when `prefix` (normalised, no trailing slash; `""` is the root) covers `path` on whole
/// segments.
pub fn matches_prefix(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// The path as a server would resolve it: percent-decoded once (so `%2e` and `%2f` count),
/// `.` and `..` resolved, empty segments dropped. Always starts with `/`, never ends with one
/// (except the root).
pub fn normalise(raw_path: &str) -> String {
    let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[derive(Clone)]
pub struct RouterLayer(pub Arc<RouteTable>);

impl<S> Layer<S> for RouterLayer {
    type Service = Router<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Router {
            inner,
            table: self.0.clone(),
        }
    }
}

/// Classifies each request and passes it on with its [`RouteClass`].
#[derive(Clone)]
pub struct Router<S> {
    inner: S,
    table: Arc<RouteTable>,
}

impl<S> Service<Request<Body>> for Router<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let class = self.table.classify(req.uri().path());
        req.extensions_mut().insert(class);
        self.inner.call(req)
    }
}

/// Sends API requests to one service and proxied requests to another.
#[derive(Clone)]
pub struct Split<A, P> {
    pub api: A,
    pub proxy: P,
}

type BoxResponse<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

impl<A, P, E> Service<Request<Body>> for Split<A, P>
where
    A: Service<Request<Body>, Response = Response<Body>, Error = E>,
    P: Service<Request<Body>, Response = Response<Body>, Error = E>,
    A::Future: Send + 'static,
    P::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = BoxResponse<E>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match req.extensions().get::<RouteClass>() {
            Some(RouteClass::Api { .. }) => Box::pin(self.api.call(req)),
            _ => Box::pin(self.proxy.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(
            "/api/v1/sessions",
            &[
                RouteConfig {
                    path_prefix: "/login".into(),
                    auth: AuthMode::None,
                },
                RouteConfig {
                    path_prefix: "/public".into(),
                    auth: AuthMode::None,
                },
                RouteConfig {
                    path_prefix: "/public/profile".into(),
                    auth: AuthMode::Jwt,
                },
            ],
        )
    }

    #[test]
    fn normalisation_resolves_encoded_dot_segments() {
        assert_eq!(normalise("/public/../game"), "/game");
        assert_eq!(normalise("/public/%2e%2e/game"), "/game");
        assert_eq!(normalise("/public/%2E%2E%2Fgame"), "/game");
        assert_eq!(normalise("//a/./b//"), "/a/b");
        assert_eq!(normalise("/.."), "/");
        assert_eq!(normalise(""), "/");
    }

    #[test]
    fn prefixes_match_whole_segments_and_longest_wins() {
        let t = table();
        assert_eq!(t.classify("/login"), RouteClass::Proxy(AuthMode::None));
        assert_eq!(t.classify("/login/x"), RouteClass::Proxy(AuthMode::None));
        assert_eq!(t.classify("/loginx"), RouteClass::Proxy(AuthMode::Session));
        assert_eq!(
            t.classify("/public/profile/7"),
            RouteClass::Proxy(AuthMode::Jwt)
        );
        assert_eq!(t.classify("/public/x"), RouteClass::Proxy(AuthMode::None));
        assert_eq!(t.classify("/game"), RouteClass::Proxy(AuthMode::Session));
    }

    #[test]
    fn traversal_out_of_an_open_route_is_judged_by_its_target() {
        let t = table();
        assert_eq!(
            t.classify("/public/../game"),
            RouteClass::Proxy(AuthMode::Session)
        );
        assert_eq!(
            t.classify("/public/%2e%2e/game"),
            RouteClass::Proxy(AuthMode::Session)
        );
        assert_eq!(
            t.classify("/login/..%2fgame"),
            RouteClass::Proxy(AuthMode::Session)
        );
    }

    #[test]
    fn the_session_api_is_recognised_after_normalisation() {
        let t = table();
        assert_eq!(
            t.classify("/api/v1/sessions/create"),
            RouteClass::Api { public: false }
        );
        assert_eq!(
            t.classify("/public/../api/v1/sessions/x"),
            RouteClass::Api { public: false }
        );
        assert_eq!(
            t.classify("/api/v1/sessions/openapi.json"),
            RouteClass::Api { public: true }
        );
        assert_eq!(
            t.classify("/api/v1/sessionsx"),
            RouteClass::Proxy(AuthMode::Session)
        );
    }
}
