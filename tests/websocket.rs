//! HTTP Upgrade through the proxy: a WebSocket to the echo upstream (`portcullis::echo`).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// The echo upstream on an ephemeral port.
async fn echo_upstream() -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(portcullis::echo::serve(listener)))
}

/// The next data or close message, within 5 s.
async fn next(ws: &mut Ws) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no WebSocket message within 5 s");
        match msg {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

/// Opens a WebSocket through the proxy with one extra request header; the proxy must answer 101.
async fn handshake(proxy: &Proxy, path: &str, name: &'static str, value: &str) -> Ws {
    let mut request = format!("ws://{}{}", proxy.addr, path)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert(name, http::HeaderValue::from_str(value).unwrap());
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("handshake within 5 s")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    ws
}

/// Connects through the proxy and returns the socket and the upstream's description of the
/// handshake request (the echo upstream's first message).
async fn connect(proxy: &Proxy, path: &str) -> (Ws, serde_json::Value) {
    let mut ws = handshake(proxy, path, "x-client", "ws-test").await;
    let hello = match next(&mut ws).await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected the echo upstream's JSON hello, got {other:?}"),
    };
    (ws, hello)
}

#[tokio::test]
async fn handshake_reaches_upstream_with_forwarded_headers() {
    let (upstream, _task) = echo_upstream().await;
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let (_ws, hello) = connect(&proxy, "/ws?room=7").await;
    assert_eq!(hello["method"], "GET");
    assert_eq!(hello["path"], "/ws?room=7");
    let headers = &hello["headers"];
    assert_eq!(headers["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        headers["x-forwarded-host"],
        serde_json::json!([proxy.addr.to_string()])
    );
    assert_eq!(headers["upgrade"], serde_json::json!(["websocket"]));
    assert_eq!(headers["x-client"], serde_json::json!(["ws-test"]));
    assert!(headers["sec-websocket-key"].is_array(), "{headers}");
}

#[tokio::test]
async fn text_frames_round_trip() {
    let (upstream, _task) = echo_upstream().await;
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let (mut ws, _) = connect(&proxy, "/ws").await;
    for text in ["hello", "", "ünïcödé ✓", &"x".repeat(100_000)] {
        ws.send(Message::text(text)).await.unwrap();
        match next(&mut ws).await {
            Some(Ok(Message::Text(echoed))) => assert_eq!(echoed.as_str(), text),
            other => panic!("expected text back, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn binary_frames_round_trip() {
    let (upstream, _task) = echo_upstream().await;
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let (mut ws, _) = connect(&proxy, "/ws").await;
    let payloads: [Vec<u8>; 3] = [
        vec![0, 1, 2, 255],
        Vec::new(),
        (0..200_000u32).map(|i| (i % 251) as u8).collect(),
    ];
    for payload in payloads {
        ws.send(Message::binary(payload.clone())).await.unwrap();
        match next(&mut ws).await {
            Some(Ok(Message::Binary(echoed))) => assert!(echoed[..] == payload[..]),
            other => panic!("expected binary back, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn closing_from_the_client_ends_the_tunnel() {
    let (upstream, _task) = echo_upstream().await;
    let (proxy, tunnels) =
        Proxy::start_counting_tunnels(&open_config(&format!("http://{upstream}"))).await;
    let (mut ws, _) = connect(&proxy, "/ws").await;
    ws.send(Message::text("before close")).await.unwrap();
    assert!(matches!(next(&mut ws).await, Some(Ok(Message::Text(_)))));
    assert_eq!(tunnels.get(), 1, "the open WebSocket is a live tunnel");

    ws.close(None).await.unwrap();
    // The upstream's close reply comes back through the proxy, then the connection ends ...
    let mut replied = false;
    loop {
        match next(&mut ws).await {
            Some(Ok(Message::Close(_))) => replied = true,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            None | Some(Err(_)) => break,
        }
    }
    assert!(replied, "no close frame came back");
    let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        unreachable!("ws:// is plain TCP")
    };
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy kept the client's connection open");
    // ... and once the client has let go of its socket, the proxy no longer holds a tunnel.
    drop(tcp);
    eventually("the tunnel to end", || async { tunnels.get() == 0 }).await;
}

#[tokio::test]
async fn upstream_close_ends_the_tunnel_even_if_the_client_lingers() {
    let (upstream, _task) = echo_upstream().await;
    let (proxy, tunnels) =
        Proxy::start_counting_tunnels(&open_config(&format!("http://{upstream}"))).await;
    let (mut ws, _) = connect(&proxy, "/ws").await;
    assert_eq!(tunnels.get(), 1);
    // The echo upstream answers a close frame and closes its connection.
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = next(&mut ws).await {}
    // The client still holds its socket (`ws` is alive): the upstream is gone, so the tunnel
    // must end anyway.
    eventually("the tunnel to end after the upstream closed", || async {
        tunnels.get() == 0
    })
    .await;
    drop(ws);
}

#[tokio::test]
async fn client_disconnect_ends_the_tunnel() {
    let (upstream, _task) = echo_upstream().await;
    let (proxy, tunnels) =
        Proxy::start_counting_tunnels(&open_config(&format!("http://{upstream}"))).await;
    let (ws, _) = connect(&proxy, "/ws").await;
    assert_eq!(tunnels.get(), 1);
    drop(ws); // TCP closed without a close frame
    eventually("the tunnel to end", || async { tunnels.get() == 0 }).await;
}

/// An upstream that accepts the upgrade with a bare 101 and then keeps its side of the
/// connection open without ever writing, the way an idle game server would.
async fn silent_upgrade_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            // A client that closed early still gets its 101 written (and ignored).
            read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .await;
            held.push(stream); // never read, never written, never closed
        }
    });
    (addr, task)
}

#[tokio::test]
async fn client_disconnect_ends_the_tunnel_even_if_the_upstream_stays_silent() {
    let (upstream, _task) = silent_upgrade_upstream().await;
    let (proxy, tunnels) =
        Proxy::start_counting_tunnels(&open_config(&format!("http://{upstream}"))).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /raw HTTP/1.1\r\nHost: game.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
            .await
            .expect("101 within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&chunk[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    eventually("the tunnel to open", || async { tunnels.get() == 1 }).await;
    drop(client);
    eventually("the tunnel to end after the client left", || async {
        tunnels.get() == 0
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_tunnels_without_waiting_out_the_grace() {
    let (upstream, _task) = echo_upstream().await;
    let (mut proxy, tunnels) =
        Proxy::start_counting_tunnels(&open_config(&format!("http://{upstream}"))).await;
    let (mut ws, _) = connect(&proxy, "/ws").await;
    assert_eq!(tunnels.get(), 1);

    // A WebSocket is never "finished": at shutdown it is closed, so that clients reconnect to
    // another replica, instead of holding the process for shutdown_grace (30 s by default).
    // The close frame says so: a browser would report a bare TCP close as 1006.
    let stopped = proxy.shutdown();
    assert_closed_with(&mut ws, CloseCode::Away, "going away", "shutdown").await;
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown completed without waiting for the tunnel")
        .expect("portcullis stopped cleanly");
    assert_eq!(tunnels.get(), 0);
}

/// An upstream that accepts any upgrade with a bare 101 and then echoes raw bytes.
async fn raw_echo_upgrade_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !accept_upgrade(&mut stream).await {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn bytes_sent_right_behind_the_upgrade_request_reach_the_upstream() {
    let (upstream, _task) = raw_echo_upgrade_upstream().await;
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The client does not wait for the 101: its first bytes of the new protocol arrive with
    // the request, so portcullis has read them before the tunnel exists.
    conn.write_all(
        b"GET /raw HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nEAGER",
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let complete = async {
        loop {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&chunk[..n]);
            if received.ends_with(b"EAGER") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), complete)
        .await
        .expect("the early bytes came back through the tunnel");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Tunnels and their sessions
// ---------------------------------------------------------------------------------------------

/// A portcullis in front of `upstream` whose routes all need a session, kept in `redis`.
fn session_routes(upstream: SocketAddr, redis: &RedisServer, session: &str) -> String {
    format!(
        "[upstream]\nurl = \"http://{upstream}\"\n\n[redis]\nurl = \"{}\"\n\n[session]\n{session}\n",
        redis.url()
    )
}

/// Connects through the proxy with `token` and checks that the tunnel echoes.
async fn connect_with(proxy: &Proxy, path: &str, token: &str) -> Ws {
    let mut ws = handshake(proxy, path, "authorization", &format!("Bearer {token}")).await;
    assert!(matches!(next(&mut ws).await, Some(Ok(Message::Text(_)))));
    assert_echoes(&mut ws).await;
    ws
}

async fn assert_echoes(ws: &mut Ws) {
    ws.send(Message::text("ping")).await.unwrap();
    match next(ws).await {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), "ping"),
        other => panic!("expected the echo, got {other:?}"),
    }
}

/// Reads until the proxy ends the tunnel, which it must do with a close frame saying why.
async fn assert_closed_with(ws: &mut Ws, code: CloseCode, reason: &str, what: &str) {
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("{what}: the tunnel ended without a close frame: {other:?}"),
            }
        }
    })
    .await;
    let frame = ended
        .unwrap_or_else(|_| panic!("{what}: the tunnel stayed open"))
        .unwrap_or_else(|| panic!("{what}: a close frame without a code"));
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (code, reason),
        "{what}"
    );
}

/// The proxy closed the tunnel because its session ended.
async fn assert_ends(ws: &mut Ws, what: &str) {
    assert_closed_with(ws, CloseCode::Policy, "session ended", what).await;
}

async fn destroy(proxy: &Proxy, user: &str, session: &str) {
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{session}")))
        .bearer_auth(token(user, None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_tunnel_ends_when_its_session_is_destroyed_on_this_or_another_replica() {
    let redis = RedisServer::start();
    let (upstream, _task) = echo_upstream().await;
    let config = session_routes(upstream, &redis, "");
    let here = Proxy::start(&config).await;
    let elsewhere = Proxy::start(&config).await;

    let mut tunnels = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let sid = create_session(&here, &token("alice", None)).await;
        tunnels.push(connect_with(&here, "/ws", &token("alice", Some(&sid))).await);
        sessions.push(sid);
    }

    // Destroyed through this replica's API.
    destroy(&here, "alice", &sessions[0]).await;
    assert_ends(&mut tunnels[0], "destroyed here").await;

    // Destroyed through another replica: this one learns of it from Redis.
    destroy(&elsewhere, "alice", &sessions[1]).await;
    assert_ends(&mut tunnels[1], "destroyed on another replica").await;

    // The user's other session, and its tunnel, live on.
    assert_echoes(&mut tunnels[2]).await;
    eventually("both closings counted", || async {
        here.metrics_text()
            .await
            .lines()
            .any(|l| l == "portcullis_tunnels_session_ended_total 2")
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_ends_when_a_newer_session_evicts_its_own() {
    let redis = RedisServer::start();
    let (upstream, _task) = echo_upstream().await;
    let proxy = Proxy::start(&session_routes(upstream, &redis, "max_per_user = 1")).await;
    let first = create_session(&proxy, &token("bob", None)).await;
    let mut ws = connect_with(&proxy, "/ws", &token("bob", Some(&first))).await;
    create_session(&proxy, &token("bob", None)).await;
    assert_ends(&mut ws, "evicted").await;
}

#[tokio::test]
async fn an_open_tunnel_keeps_its_session_alive() {
    let redis = RedisServer::start();
    let (upstream, _task) = echo_upstream().await;
    // A 2 s TTL is slid every 100 ms (ttl/20) while something uses the session.
    let proxy = Proxy::start(&session_routes(upstream, &redis, "ttl = \"2s\"")).await;
    let sid = create_session(&proxy, &token("carol", None)).await;
    let mut ws = connect_with(&proxy, "/ws", &token("carol", Some(&sid))).await;

    // Twice the TTL with no request at all: only the tunnel can have kept the session.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let session_url = proxy.url(&format!("/api/v1/sessions/{sid}"));
    let resp = client()
        .get(&session_url)
        .bearer_auth(token("carol", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the session expired under its tunnel");
    assert_echoes(&mut ws).await;

    // Once the tunnel is gone, the session runs out.
    drop(ws);
    eventually("the session to expire", || async {
        let resp = client()
            .get(&session_url)
            .bearer_auth(token("carol", None))
            .send()
            .await
            .unwrap();
        resp.status() == 404
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_ends_when_redis_is_flushed() {
    let redis = RedisServer::start();
    let (upstream, _task) = echo_upstream().await;
    let proxy = Proxy::start(&session_routes(upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("dave", None)).await;
    let mut ws = connect_with(&proxy, "/ws", &token("dave", Some(&sid))).await;
    let _: () = redis::cmd("FLUSHDB").query(&mut redis.conn()).unwrap();
    assert_ends(&mut ws, "the session's key flushed").await;
}

/// An upstream that accepts a WebSocket upgrade only when told to, then echoes raw bytes.
async fn gated_upgrade_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::mpsc::channel(1);
    let (open_tx, open) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if !read_head(&mut stream).await {
            return;
        }
        let _ = arrived_tx.send(()).await;
        let _ = open.await;
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    (addr, arrived, open_tx)
}

/// A session destroyed while the upstream is still accepting the upgrade: nothing was
/// watching yet, so the tunnel checks its session the moment it opens.
#[tokio::test]
async fn a_session_destroyed_during_the_upgrade_ends_the_tunnel_as_it_opens() {
    let redis = RedisServer::start();
    let (upstream, mut arrived, open) = gated_upgrade_upstream().await;
    let proxy = Proxy::start(&session_routes(upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("erin", None)).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: game.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Authorization: Bearer {}\r\n\r\n",
        token("erin", Some(&sid))
    );
    client.write_all(head.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("the upgrade reached the upstream");
    destroy(&proxy, "erin", &sid).await;
    open.send(()).unwrap();
    // The 101 comes through, then the proxy closes the tunnel (well before slide_interval, 30 s)
    // with an unmasked close frame: 1008, "session ended".
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut seen)).await;
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert!(
        closed.is_ok(),
        "the tunnel of a destroyed session stayed open"
    );
    assert!(
        seen.ends_with(b"\r\n\r\n\x88\x0f\x03\xf0session ended"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
}

/// An upstream that accepts a WebSocket handshake, sends the first `split` bytes of `frame`,
/// and the rest when told to; then hands back all it read from the proxy until it closed.
async fn half_frame_upstream(
    frame: Vec<u8>,
    split: usize,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (rest_tx, rest) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Sec-WebSocket-Key: ")
                    .or_else(|| l.strip_prefix("sec-websocket-key: "))
            })
            .expect("the handshake's key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
        stream.write_all(&frame[..split]).await.unwrap();
        rest.await.unwrap();
        stream.write_all(&frame[split..]).await.unwrap();
        let mut read = Vec::new();
        stream.read_to_end(&mut read).await.unwrap();
        read
    });
    (addr, rest_tx, task)
}

/// The session ends while the upstream is half way through a frame: the client gets the whole
/// frame and then the close frame, never a close frame cut into the middle of a message, and
/// the upstream is told too, with a close frame masked as a client's must be.
#[tokio::test]
async fn a_frame_in_flight_is_finished_before_the_close_frame() {
    let redis = RedisServer::start();
    let mut frame = vec![0x82, 126, 0, 200];
    frame.extend(std::iter::repeat_n(b'a', 200));
    let (upstream, rest, upstream_read) = half_frame_upstream(frame, 104).await;
    let proxy = Proxy::start(&session_routes(upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("frank", None)).await;
    let mut ws = handshake(
        &proxy,
        "/ws",
        "authorization",
        &format!("Bearer {}", token("frank", Some(&sid))),
    )
    .await;

    destroy(&proxy, "frank", &sid).await;
    eventually("the tunnel to learn its session ended", || async {
        proxy
            .metrics_text()
            .await
            .lines()
            .any(|l| l == "portcullis_tunnels_session_ended_total 1")
    })
    .await;
    rest.send(()).unwrap();

    match next(&mut ws).await {
        Some(Ok(Message::Binary(data))) => assert_eq!(data.as_ref(), [b'a'; 200]),
        other => panic!("expected the whole frame, got {other:?}"),
    }
    assert_ends(&mut ws, "after the frame in flight").await;

    let read = tokio::time::timeout(Duration::from_secs(5), upstream_read)
        .await
        .expect("the proxy closed the upstream's side")
        .unwrap();
    assert_eq!(read.len(), 2 + 4 + 15, "one masked close frame: {read:?}");
    assert_eq!(read[..2], [0x88, 0x80 | 15]);
    let unmasked: Vec<u8> = read[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ read[2 + i % 4])
        .collect();
    assert_eq!(unmasked, b"\x03\xf0session ended");
}

/// Opens a WebSocket through the proxy the way a browser does: no Authorization header.
async fn browser_handshake(
    proxy: &Proxy,
    target: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let request = format!("ws://{}{}", proxy.addr, target)
        .into_client_request()
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("handshake within 5 s")
    .map(|(ws, _)| ws)
}

/// With `jwt.websocket_query_token`, a browser's WebSocket (which cannot send an Authorization
/// header) brings its token in the query; the parameter goes no further than portcullis.
#[tokio::test]
async fn a_browser_websocket_may_bring_its_token_in_the_query() {
    let redis = RedisServer::start();
    let (upstream, _task) = echo_upstream().await;
    let base = session_routes(upstream, &redis, "");
    let proxy = Proxy::start(&format!(
        "{base}\n[jwt]\nwebsocket_query_token = \"access_token\"\n"
    ))
    .await;
    let sid = create_session(&proxy, &token("gina", None)).await;
    let target = format!(
        "/ws?EIO=4&access_token={}&transport=websocket",
        token("gina", Some(&sid))
    );
    let mut ws = browser_handshake(&proxy, &target)
        .await
        .expect("the upgrade with a token in the query is admitted");
    let hello: serde_json::Value = match next(&mut ws).await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected the echo upstream's hello, got {other:?}"),
    };
    assert_eq!(hello["headers"]["x-user-id"][0], "gina", "{hello}");
    assert_eq!(hello["headers"]["x-session-id"][0], sid.as_str(), "{hello}");
    let seen = hello.to_string();
    assert!(
        !seen.contains("access_token"),
        "the token went upstream: {seen}"
    );
    assert!(seen.contains("EIO=4&transport=websocket"), "{seen}");
    assert_echoes(&mut ws).await;

    // The session's end still ends the tunnel.
    destroy(&proxy, "gina", &sid).await;
    assert_ends(&mut ws, "destroyed").await;

    // Only upgrades read the query: a plain request with one is refused as bringing no token.
    let live = create_session(&proxy, &token("gina", None)).await;
    let resp = client()
        .get(proxy.url(&format!("/ws?access_token={}", token("gina", Some(&live)))))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "TOKEN_MISSING").await;

    // The parameter goes upstream from no proxied request (Socket.IO puts it on each long
    // poll too), though only an upgrade reads it.
    let sid = create_session(&proxy, &token("gina", None)).await;
    let resp = client()
        .get(proxy.url("/ws/poll?EIO=4&access_token=not-read&transport=polling"))
        .bearer_auth(token("gina", Some(&sid)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["path"], "/ws/poll?EIO=4&transport=polling", "{seen}");
    // Nor does a percent-encoded spelling, which the upstream would decode to the same name.
    let resp = client()
        .get(proxy.url("/ws/poll?EIO=4&access%5Ftoken=not-read&%61ccess_token=x"))
        .bearer_auth(token("gina", Some(&sid)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["path"], "/ws/poll?EIO=4", "{seen}");

    // A POST that asks to upgrade is no WebSocket handshake: its query is not read.
    let resp = client()
        .post(proxy.url(&format!("/ws?access_token={}", token("gina", Some(&sid)))))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // An upgrade with an Authorization header is judged by it alone, usable or not.
    let mut request = format!(
        "ws://{}/ws?access_token={}",
        proxy.addr,
        token(
            "gina",
            Some(&create_session(&proxy, &token("gina", None)).await)
        )
    )
    .into_client_request()
    .unwrap();
    request.headers_mut().insert(
        "authorization",
        http::HeaderValue::from_static("Basic Zm9vOmJhcg=="),
    );
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("an answer within 5 s");
    assert!(refused.is_err());

    // Without the setting, the query is not read.
    let plain = Proxy::start(&base).await;
    let sid = create_session(&plain, &token("hana", None)).await;
    let target = format!("/ws?access_token={}", token("hana", Some(&sid)));
    assert!(browser_handshake(&plain, &target).await.is_err());
}
