//! `portcullis echo-upstream`: a tiny upstream that answers every request with what it received
//! (method, path and query, headers, body length) as JSON, so users can see exactly what their
//! backend will get. A WebSocket handshake is accepted; the first message is that same JSON for
//! the handshake request, then every message is echoed back.

use std::collections::BTreeMap;
use std::convert::Infallible;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use crate::error::json_response;
use crate::Body;

/// What the echo upstream saw of one request.
#[derive(Debug, Serialize)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub path: String,
    pub version: String,
    /// Header name -> every value, in order.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_length: u64,
}

fn seen<B>(req: &Request<B>, body_length: u64) -> Seen {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    Seen {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        version: format!("{:?}", req.version()),
        headers,
        body_length,
    }
}

async fn handle(mut req: Request<Incoming>) -> Response<Body> {
    if crate::forward::wants_upgrade(&req) {
        if let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() {
            return websocket(&mut req, &key);
        }
    }
    let mut body_length = 0u64;
    let body = req.body_mut();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_length += data.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let seen = seen(&req, body_length);
    json_response(
        StatusCode::OK,
        serde_json::to_vec_pretty(&seen).unwrap_or_default(),
    )
}

fn websocket(req: &mut Request<Incoming>, key: &HeaderValue) -> Response<Body> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let hello = serde_json::to_string(&seen(req, 0)).unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if ws.send(Message::text(hello)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Text(_) | Message::Binary(_) => message,
                // The reply to a close (queued by tungstenite) goes out with the next read,
                // which then ends the stream.
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(crate::error::full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}

/// Serves the echo upstream on `listener` (HTTP/1.1 and HTTP/2 prior knowledge) forever.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(handle(req).await) },
                );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
