//! Who is calling: the bearer token is taken from `Authorization`, verified (pinned algorithms,
//! signature, `exp`, `nbf`, `iss`, `aud`), and its subject attached as [`Authenticated`].
//! Identity headers sent by the client are stripped here, before anything else can see them,
//! on every route and whatever the outcome; the session id header is read first.

use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::Either;
use http::{header, HeaderMap, Request, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{AlgorithmFamily, DecodingKey, EncodingKey, Validation};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use crate::config::{AuthMode, IdentityConfig, JwtConfig, JwtKey};
use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::on_response::OnResponse;
use crate::routes::{RouteClass, Routes};
use crate::{Body, BoxError};

mod verified;

use verified::{Verified, VerifiedTokens};

/// A caller whose token verified. `session_hint` is the token's `sid` claim, else the session
/// id header the client sent; it is only a claim until the session gate checks it.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: Arc<str>,
    /// Shared with the verified-token table: a request's copies cost no allocation.
    pub session_hint: Option<Arc<str>>,
    /// `session_hint` is the token's own `sid` claim: the token is bound to that session, and
    /// is good for the session API only while the session lives.
    pub bound_to_session: bool,
    /// The token's `iat` claim (Unix seconds), if it has a usable one: after a user signs out
    /// everywhere, the session API refuses tokens issued before.
    pub issued_at: Option<u64>,
    /// The token's `exp` claim (Unix seconds).
    pub expires_at: u64,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    sid: Option<String>,
    /// Required and checked by the validation; kept so a remembered token can be checked again.
    #[serde(deserialize_with = "rounded_date")]
    exp: u64,
    #[serde(default, deserialize_with = "optional_rounded_date")]
    nbf: Option<u64>,
    /// Lenient: RFC 7519 allows a fractional NumericDate, and before the sign-out check used it,
    /// any `iat` was accepted; one that is not a number counts as absent.
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<u64>,
    /// A string (RFC 7519 4.1.1): the validation would also take an array holding the issuer.
    #[serde(default, rename = "iss")]
    _iss: Option<String>,
}

/// A NumericDate claim as whole seconds: `None` for a value that is not a non-negative number.
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::Number(n)) => whole_seconds(&n, f64::trunc),
        _ => None,
    })
}

/// A NumericDate as whole seconds, a fraction taken by `whole`; `None` for a number that is
/// negative or out of range.
fn whole_seconds(n: &serde_json::Number, whole: fn(f64) -> f64) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| whole(f) as u64)
    })
}

/// `exp` or `nbf` as jsonwebtoken's validation reads it: whole seconds, a fraction (RFC 7519
/// allows one) rounded to the nearest, so that a remembered token is judged again as it was
/// first. Anything else is not a NumericDate, and the token is invalid.
fn rounded_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    whole_seconds(&n, f64::round).ok_or_else(|| serde::de::Error::custom("not a NumericDate"))
}

fn optional_rounded_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    rounded_date(d).map(Some)
}

/// Verifies tokens against the configured keys and rules.
pub struct Verifier {
    key: DecodingKey,
    /// A key being rotated out, tried when a signature does not match `key`.
    previous_key: Option<DecodingKey>,
    /// Tokens accepted that only the previous key verified: once it stays flat for a token
    /// lifetime, the previous key can go.
    verified_with_previous_key: Counter,
    validation: Validation,
    /// `jwt.require_iat`: a token without a usable `iat` is refused.
    require_iat: bool,
    verified: VerifiedTokens,
}

/// The key that verifies `family`'s signatures; configuration checks a public key with it too.
pub(crate) fn decoding_key(key: &JwtKey, family: AlgorithmFamily) -> Result<DecodingKey, BoxError> {
    Ok(match (key, family) {
        (JwtKey::Secret(secret), AlgorithmFamily::Hmac) => DecodingKey::from_secret(secret),
        (JwtKey::PublicPem(pem), AlgorithmFamily::Rsa) => DecodingKey::from_rsa_pem(pem)?,
        (JwtKey::PublicPem(pem), AlgorithmFamily::Ec) => DecodingKey::from_ec_pem(pem)?,
        (JwtKey::PublicPem(pem), AlgorithmFamily::Ed) => DecodingKey::from_ed_pem(pem)?,
        _ => return Err("jwt key does not fit jwt.algorithms".into()),
    })
}

impl Verifier {
    /// `verified_with_previous_key` counts the tokens only the previous key verified.
    pub fn new(
        config: &JwtConfig,
        verified_with_previous_key: Counter,
    ) -> Result<Verifier, BoxError> {
        let first = *config.algorithms.first().ok_or("jwt.algorithms is empty")?;
        let key = decoding_key(&config.key, first.family())?;
        let previous_key = match &config.previous_key {
            Some(previous) => Some(decoding_key(previous, first.family())?),
            None => None,
        };
        // Built from configuration only, never from a token's header.
        let mut validation = Validation::new(first);
        validation.algorithms = config.algorithms.clone();
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            key,
            previous_key,
            verified_with_previous_key,
            validation,
            require_iat: config.require_iat,
            verified: VerifiedTokens::new(config.verified_tokens),
        })
    }

    /// Verifies a token; the rejection says why it failed without echoing it. A token that
    /// verified before has only its `exp` and `nbf` checked again.
    pub fn verify(&self, token: &str) -> Result<Verified, Rejection> {
        if let Some(known) = self.verified.get(token) {
            // A clock before 1970 cannot vouch for anything: every remembered token is expired.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(u64::MAX, |d| d.as_secs());
            return match known.check_time(now, self.validation.leeway) {
                Ok(()) => Ok(known),
                Err(rejection) => {
                    tracing::debug!(reason = ?rejection, "token rejected");
                    self.verified.remove(token);
                    Err(rejection)
                }
            };
        }
        let mut decoded = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation);
        // The signature is checked before the claims, so only a signature that does not match
        // the current key sends a token to the previous one.
        let mut by_previous_key = false;
        if let (Err(e), Some(previous)) = (&decoded, &self.previous_key) {
            if *e.kind() == ErrorKind::InvalidSignature {
                decoded = jsonwebtoken::decode::<Claims>(token, previous, &self.validation);
                by_previous_key = true;
            }
        }
        let data = decoded.map_err(|e| {
            tracing::debug!(reason = rejection_reason(e.kind()), "token rejected");
            match e.kind() {
                ErrorKind::ExpiredSignature => Rejection::TokenExpired,
                _ => Rejection::TokenInvalid,
            }
        })?;
        // No header parameter that must be understood is (RFC 7515 4.1.11): such a token may
        // mean something else than what the signature check read.
        if data.header.crit.is_some() {
            tracing::debug!("token rejected: crit header parameter");
            return Err(Rejection::TokenInvalid);
        }
        let Claims {
            sub,
            sid,
            exp,
            nbf,
            iat,
            _iss: _,
        } = data.claims;
        if !valid_user_id(&sub) {
            tracing::debug!("token rejected: unusable sub");
            return Err(Rejection::TokenInvalid);
        }
        if self.require_iat && iat.is_none() {
            tracing::debug!("token rejected: no usable iat");
            return Err(Rejection::TokenInvalid);
        }
        if by_previous_key {
            self.verified_with_previous_key.inc();
        }
        let verified = Verified {
            user_id: sub.into(),
            sid: sid.map(Arc::from),
            exp,
            nbf,
            iat,
        };
        self.verified.insert(token, verified.clone());
        Ok(verified)
    }
}

/// A user id must be usable as a header value and inside a Redis Cluster hash tag.
pub fn valid_user_id(sub: &str) -> bool {
    !sub.is_empty()
        && sub.len() <= 256
        && sub
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

/// The token in `Authorization: Bearer <token>`, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Decides the authentication outcome for one request. Pure: the layer below calls it.
pub fn authenticate(
    verifier: &Verifier,
    class: RouteClass,
    headers: &HeaderMap,
    session_header: Option<String>,
) -> Result<Option<Authenticated>, Rejection> {
    authenticate_token(verifier, class, bearer(headers), session_header)
}

/// [`authenticate`], with the token already found.
fn authenticate_token(
    verifier: &Verifier,
    class: RouteClass,
    token: Option<&str>,
    session_header: Option<String>,
) -> Result<Option<Authenticated>, Rejection> {
    let required = class.auth() != AuthMode::None;
    let Some(token) = token else {
        return if required {
            Err(Rejection::TokenMissing)
        } else {
            Ok(None)
        };
    };
    match verifier.verify(token) {
        Ok(Verified {
            user_id,
            sid,
            iat,
            exp,
            ..
        }) => Ok(Some(Authenticated {
            user_id,
            bound_to_session: sid.is_some(),
            session_hint: sid.or_else(|| session_header.map(Arc::from)),
            issued_at: iat,
            expires_at: exp,
        })),
        // On open routes a bad token is ignored: the caller is simply anonymous.
        Err(rejection) if required => Err(rejection),
        Err(_) => Ok(None),
    }
}

#[derive(Clone)]
pub struct AuthnLayer {
    pub verifier: Arc<Verifier>,
    pub identity: Arc<IdentityConfig>,
    /// `jwt.websocket_query_token`: the query parameter a WebSocket upgrade may carry its
    /// token in.
    pub websocket_query_token: Option<Arc<str>>,
}

/// Takes query parameter `name` out of the target, so that it goes no further (upstream logs
/// record query strings), and returns its value: every copy goes, the first is the token.
/// `None`, and the target unchanged, when there is none.
///
/// Names and values are read percent-decoded, as the upstream reads them: `access%5Ftoken` is
/// `access_token` to it, so that spelling goes too (and is read as the token), rather than
/// reaching its logs or its own query parsing.
fn take_query_token(req: &mut Request<Body>, name: &str) -> Option<String> {
    let path_and_query = req.uri().path_and_query()?;
    let query = path_and_query.query()?;
    let mut token = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_encoding::percent_decode_str(key).eq(name.bytes()) {
            // A value that does not decode to text is no token (the parameter still goes).
            token.get_or_insert_with(|| {
                percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .unwrap_or_default()
            });
        } else if !pair.is_empty() {
            // Separators the parameter leaves doubled (`a=1&&b=2`) go with it.
            kept.push(pair);
        }
    }
    let token = token?;
    let mut target = path_and_query.path().to_string();
    if !kept.is_empty() {
        target.push('?');
        target.push_str(&kept.join("&"));
    }
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(target).ok();
    // The target was whole before: without the parameter it still is.
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    Some(token).filter(|t| !t.is_empty())
}

impl<S> Layer<S> for AuthnLayer {
    type Service = Authn<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authn {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authn<S> {
    inner: S,
    layer: AuthnLayer,
}

impl<S> Service<Request<Body>> for Authn<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = OnResponse<S::Future, Authenticated>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let identity = &self.layer.identity;
        let headers = req.headers_mut();
        // Strip before set: only values portcullis verified may reach the upstream.
        let session_header = headers
            .remove(&identity.session_id)
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        crate::forward::remove_present(headers, &[&identity.user_id, &identity.platform]);

        let class = RequestFacts::of(&req).route.unwrap_or(RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        });
        // A browser's WebSocket cannot send an Authorization header; its upgrade to a proxied
        // route may carry the token in the query instead, when so configured. The parameter
        // is taken out of every proxied request (Socket.IO's `query` option puts it on each
        // long poll too), and read only from such an upgrade.
        let query_token = match &self.layer.websocket_query_token {
            Some(name) if matches!(class, RouteClass::Proxy { .. }) => {
                let token = take_query_token(&mut req, name);
                let upgrade = crate::forward::wants_upgrade(&req);
                token.filter(|_| upgrade && !req.headers().contains_key(header::AUTHORIZATION))
            }
            _ => None,
        };
        let token = bearer(req.headers()).or(query_token.as_deref());
        match authenticate_token(&self.layer.verifier, class, token, session_header) {
            Ok(Some(who)) => {
                RequestFacts::of_mut(&mut req).who = Some(who.clone());
                // A forwarded response brings the caller back in its facts; a refusal made
                // further in gets it here, for the access log and audit.
                return OnResponse::new(self.inner.call(req), who, |who, response| {
                    RequestFacts::on_mut(response).who.get_or_insert(who);
                });
            }
            Ok(None) => {}
            // Not answered yet: the caller is counted against its IP first (rate limit), then
            // `RequireAuth` refuses it.
            Err(rejection) => {
                req.extensions_mut().insert(AuthFailure(rejection));
            }
        }
        OnResponse::unchanged(self.inner.call(req))
    }
}

/// Why a request that needed a valid token has none; answered by [`RequireAuth`].
#[derive(Debug, Clone)]
pub struct AuthFailure(pub Rejection);

#[derive(Clone, Copy, Default)]
pub struct RequireAuthLayer;

impl<S> Layer<S> for RequireAuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth { inner }
    }
}

/// Refuses requests whose authentication failed.
#[derive(Clone)]
pub struct RequireAuth<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for RequireAuth<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match req.extensions_mut().remove::<AuthFailure>() {
            Some(AuthFailure(rejection)) => {
                Either::Left(std::future::ready(Ok(rejection.into_response())))
            }
            None => Either::Right(self.inner.call(req)),
        }
    }
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sid: Option<&'a str>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs a token with the configured HMAC secret, for trying portcullis out.
pub fn dev_token(
    config: &JwtConfig,
    sub: &str,
    sid: Option<&str>,
    ttl: Duration,
) -> Result<String, BoxError> {
    let JwtKey::Secret(secret) = &config.key else {
        return Err(
            "dev-token signs with an HMAC secret; this config verifies with a public key".into(),
        );
    };
    let alg = config
        .algorithms
        .first()
        .copied()
        .filter(|a| a.family() == AlgorithmFamily::Hmac)
        .ok_or("dev-token needs an HS256/384/512 algorithm in jwt.algorithms")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let exp = now
        .checked_add(ttl.as_secs())
        .ok_or("--ttl is too long: the token's expiry would not be a time")?;
    let claims = DevClaims {
        sub,
        sid,
        iat: now,
        exp,
        iss: config.issuer.as_deref(),
        aud: config.audience.as_deref(),
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )?;
    Ok(token)
}

/// Why a token failed verification, in words of our own: the library's own error would echo
/// the token's content (a JSON error quotes the header's or claims' text), and no token is
/// logged in any part.
fn rejection_reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidToken => "malformed",
        ErrorKind::Base64(_) => "a part is not base64url",
        ErrorKind::Utf8(_) => "a part is not UTF-8",
        ErrorKind::Json(_) => "the header or claims are not the JSON expected",
        ErrorKind::InvalidSignature => "the signature does not match",
        ErrorKind::InvalidAlgorithm => "the algorithm is not allowed",
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSubject => "wrong subject",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        _ => "the token cannot be verified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn config() -> JwtConfig {
        JwtConfig {
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            key: JwtKey::Secret(b"0123456789abcdef0123456789abcdef".to_vec()),
            previous_key: None,
            issuer: Some("portcullis-test".into()),
            audience: None,
            leeway: Duration::from_secs(0),
            verified_tokens: 16,
            require_iat: false,
            websocket_query_token: None,
        }
    }

    #[test]
    fn a_minted_token_verifies_and_carries_its_claims() {
        let c = config();
        let token = dev_token(&c, "player-1", Some("s-1"), Duration::from_secs(60)).unwrap();
        let claims = Verifier::new(&c, Counter::default())
            .unwrap()
            .verify(&token)
            .unwrap();
        assert_eq!(&*claims.user_id, "player-1");
        assert_eq!(claims.sid.as_deref(), Some("s-1"));
        assert!(claims.iat.is_some(), "dev tokens say when they were issued");
    }

    #[test]
    fn a_key_being_rotated_out_still_verifies_its_tokens_and_is_counted() {
        let secret = |s: &str| JwtKey::Secret(s.repeat(32).into_bytes());
        let signed_by = |key: JwtKey, ttl: u64| {
            let c = JwtConfig { key, ..config() };
            dev_token(&c, "u", None, Duration::from_secs(ttl)).unwrap()
        };
        let (old, new, other) = (secret("o"), secret("n"), secret("x"));
        let rotating = JwtConfig {
            key: new.clone(),
            previous_key: Some(old.clone()),
            ..config()
        };
        let counted = Counter::default();
        let verifier = Verifier::new(&rotating, counted.clone()).unwrap();

        assert!(verifier.verify(&signed_by(new.clone(), 60)).is_ok());
        assert_eq!(counted.get(), 0, "the current key verified it");
        let by_old = signed_by(old.clone(), 60);
        assert!(verifier.verify(&by_old).is_ok());
        assert_eq!(counted.get(), 1);
        assert!(verifier.verify(&by_old).is_ok(), "remembered");
        assert_eq!(counted.get(), 1, "a remembered token counts once");
        assert_eq!(
            verifier.verify(&signed_by(other, 60)).unwrap_err(),
            Rejection::TokenInvalid
        );
        // Signed by the old key and expired: expired, like any other token.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "u", "exp": now - 60, "iss": "portcullis-test"}),
            &EncodingKey::from_secret("o".repeat(32).as_bytes()),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&expired).unwrap_err(),
            Rejection::TokenExpired
        );

        let rotated = JwtConfig {
            key: new,
            ..config()
        };
        let verifier = Verifier::new(&rotated, Counter::default()).unwrap();
        assert_eq!(
            verifier.verify(&by_old).unwrap_err(),
            Rejection::TokenInvalid,
            "once the previous key is gone"
        );
    }

    #[test]
    fn a_query_token_is_taken_out_of_the_target_wherever_it_stands() {
        let take = |target: &str| {
            let mut req = Request::builder()
                .uri(target)
                .body(Body::new(http_body_util::Empty::<bytes::Bytes>::new()))
                .unwrap();
            let token = take_query_token(&mut req, "access_token");
            (token, req.uri().to_string())
        };
        let t = |s: &str| Some(s.to_string());
        assert_eq!(take("/ws?access_token=abc"), (t("abc"), "/ws".into()));
        assert_eq!(
            take("/ws?a=1&access_token=abc&b=2"),
            (t("abc"), "/ws?a=1&b=2".into())
        );
        assert_eq!(
            take("/ws?access_token=abc&access_token=def"),
            (t("abc"), "/ws".into())
        );
        assert_eq!(take("/ws?access_token=&a=1"), (None, "/ws?a=1".into()));
        assert_eq!(take("/ws?access_token"), (None, "/ws".into()));
        assert_eq!(
            take("/ws?a=1&&access_token=abc&"),
            (t("abc"), "/ws?a=1".into())
        );
        assert_eq!(take("/ws?&access_token=abc"), (t("abc"), "/ws".into()));
        // Percent-encoded, it is the same parameter to the upstream: taken, and read decoded.
        assert_eq!(
            take("/ws?access%5Ftoken=abc&a=1"),
            (t("abc"), "/ws?a=1".into())
        );
        assert_eq!(
            take("/ws?%61ccess_token=a%2Eb&access%5ftoken=c"),
            (t("a.b"), "/ws".into())
        );
        assert_eq!(take("/ws?access%5Ftoken=%FF&a=1"), (None, "/ws?a=1".into()));
        // Not that parameter: the target is left as it came.
        for target in [
            "/ws",
            "/ws?a=1",
            "/ws?access_token_x=abc",
            "/ws?access%5Ftoken%00=abc",
            "/ws?access+token=abc",
        ] {
            assert_eq!(take(target), (None, target.into()));
        }
        assert_eq!(
            take("http://game.example/ws?access_token=abc&x=1"),
            (t("abc"), "http://game.example/ws?x=1".into())
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn open_routes_ignore_bad_tokens_but_guarded_ones_reject_them() {
        let verifier = Verifier::new(&config(), Counter::default()).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer junk"),
        );
        assert!(matches!(
            authenticate(
                &verifier,
                RouteClass::Proxy {
                    auth: AuthMode::None,
                    routes: Routes::one(None)
                },
                &h,
                None
            ),
            Ok(None)
        ));
        assert_eq!(
            authenticate(
                &verifier,
                RouteClass::Proxy {
                    auth: AuthMode::Jwt,
                    routes: Routes::one(None)
                },
                &h,
                None
            )
            .unwrap_err(),
            Rejection::TokenInvalid
        );
        assert_eq!(
            authenticate(
                &verifier,
                RouteClass::Api { public: false },
                &HeaderMap::new(),
                None
            )
            .unwrap_err(),
            Rejection::TokenMissing
        );
    }

    #[test]
    fn the_sid_claim_wins_over_the_header() {
        let c = config();
        let verifier = Verifier::new(&c, Counter::default()).unwrap();
        let with_sid = dev_token(&c, "u", Some("claim"), Duration::from_secs(60)).unwrap();
        let without = dev_token(&c, "u", None, Duration::from_secs(60)).unwrap();
        let auth = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            authenticate(
                &verifier,
                RouteClass::Proxy {
                    auth: AuthMode::Session,
                    routes: Routes::one(None),
                },
                &h,
                Some("header".into()),
            )
            .unwrap()
            .unwrap()
            .session_hint
        };
        assert_eq!(auth(&with_sid).as_deref(), Some("claim"));
        assert_eq!(auth(&without).as_deref(), Some("header"));
    }

    #[test]
    fn user_ids_that_would_break_keys_or_headers_are_refused() {
        assert!(valid_user_id("player-42@example.com"));
        assert!(!valid_user_id(""));
        assert!(!valid_user_id("a}b"));
        assert!(!valid_user_id("a b"));
        assert!(!valid_user_id("a\nb"));
        assert!(!valid_user_id(&"x".repeat(257)));
    }
}
