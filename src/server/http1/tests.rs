//! The engine against a real socket whose client end the test scripts byte by byte, serving a
//! stack the test writes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Response;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::util::BoxCloneService;

use super::*;
use crate::app::AppService;

fn limits() -> ConnLimits {
    ConnLimits {
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
        max_header_bytes: 16 * 1024,
        max_connections: 10,
    }
}

/// What a run of the engine ended with.
fn outcome_name<I>(outcome: &Outcome<I>) -> &'static str {
    match outcome {
        Outcome::Rest(..) => "rest",
        Outcome::Upgrade(..) => "upgrade",
        Outcome::Close(_) => "close",
        Outcome::Abort(_) => "abort",
        Outcome::Drop => "drop",
    }
}

/// A connection served by an engine whose stack is `handler`; the client's end, how many
/// requests reached the stack, and how the engine's run ended.
async fn serve<F, Fut>(
    handler: F,
) -> (
    TcpStream,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<&'static str>,
)
where
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, peer) = listener.accept().await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app: AppService = BoxCloneService::new(tower::service_fn(move |req| {
        counted.fetch_add(1, Ordering::SeqCst);
        let response = handler(req);
        async move { Ok::<_, Infallible>(response.await) }
    }));
    let service = ConnService::for_tests(app, peer);
    let run = tokio::spawn(async move {
        let limits = limits();
        let (_stop, stopping) = watch::channel(false);
        let outcome = Engine::new(server, &service, &limits, &stopping)
            .run(None)
            .await;
        outcome_name(&outcome)
    });
    (client, calls, run)
}

/// Sends `request` on a connection served by `handler` and reads until the server closes; the
/// answer, how many requests reached the stack, and how the engine's run ended.
async fn answer_to<F, Fut>(
    handler: F,
    request: &[u8],
) -> (
    String,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<&'static str>,
)
where
    F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let (mut client, calls, run) = serve(handler).await;
    client.write_all(request).await.unwrap();
    (read_to_end(&mut client).await, calls, run)
}

fn text(body: &'static str) -> Response<Body> {
    Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        body.as_bytes(),
    ))))
}

/// A body of `pieces` whose length is not known in advance.
fn streamed(pieces: &[&'static str]) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = pieces
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

/// Echoes the request body back, with the request's method and target.
async fn echo(req: Request<Body>) -> Response<Body> {
    let line = format!("{} {} ", req.method(), req.uri());
    let body = req.into_body().collect().await;
    let body = match body {
        Ok(body) => format!("{line}{}", String::from_utf8_lossy(&body.to_bytes())),
        Err(e) => format!("{line}error: {e}"),
    };
    Response::new(Body::new(http_body_util::Full::new(Bytes::from(body))))
}

/// Everything the server sends until it closes.
async fn read_to_end(client: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut all))
        .await
        .expect("the server closed within 5 s")
        .unwrap();
    String::from_utf8(all).unwrap()
}

/// Reads until `count` copies of `marker` have arrived.
async fn read_until(client: &mut TcpStream, marker: &str, count: usize) -> String {
    let mut all = Vec::new();
    let read = async {
        while String::from_utf8_lossy(&all).matches(marker).count() < count {
            let mut buf = [0u8; 4096];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&all));
            all.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the response within 5 s");
    String::from_utf8(all).unwrap()
}

#[tokio::test]
async fn ambiguous_framing_is_refused_before_the_stack_sees_it() {
    for head in [
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
        "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let (mut client, calls, run) = serve(echo).await;
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{head:?}: {answer:?}"
        );
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "{head:?} reached the stack"
        );
        drop(client);
        assert_eq!(run.await.unwrap(), "close");
    }
}

#[tokio::test]
async fn a_head_past_the_hard_cap_is_refused_with_431() {
    let (mut client, calls, _run) = serve(echo).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nx-big: {}\r\n\r\n",
        "a".repeat(limits().hard_header_cap() + 1)
    );
    client.write_all(big.as_bytes()).await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn chunked_and_length_bodies_reach_the_stack_and_the_connection_carries_on() {
    let (mut client, calls, run) = serve(echo).await;
    client
        .write_all(
            b"POST /one HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n\
              POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nxyz",
        )
        .await
        .unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.contains("POST /one abcde"), "{answer:?}");
    assert!(answer.ends_with("POST /two xyz"), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn a_body_arriving_a_byte_at_a_time_is_read_whole() {
    let (mut client, _, _run) = serve(echo).await;
    let request = b"POST /slow HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                    5\r\nhello\r\n0\r\n\r\n";
    for byte in request {
        client.write_all(&[*byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let answer = read_to_end(&mut client).await;
    assert!(answer.ends_with("POST /slow hello"), "{answer:?}");
}

#[tokio::test]
async fn a_body_cut_short_fails_in_the_stack_and_ends_the_connection() {
    let (mut client, _, run) = serve(echo).await;
    client
        .write_all(b"POST /cut HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nshort")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.contains("POST /cut error: "), "{answer:?}");
    assert_ne!(run.await.unwrap(), "rest");
}

#[tokio::test]
async fn continue_is_sent_only_when_the_stack_reads_the_body() {
    // The stack reads the body: the client hears 100 Continue first.
    let (mut client, _, _run) = serve(echo).await;
    client
        .write_all(
            b"POST /read HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut client, "\r\n\r\n", 1).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"ok").await.unwrap();
    let answer = read_until(&mut client, "POST /read ok", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");

    // The stack answers without reading: no 100, and the body never sent is not waited for.
    let (answer, _, run) = answer_to(
        |_| async { text("no") },
        b"POST /refused HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer:?}");
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn an_unread_body_already_received_does_not_cost_the_connection() {
    let (mut client, calls, run) = serve(|_| async { text("refused") }).await;
    let body = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\nxxxx";
    let requests = format!(
        "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{body}\
         GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(requests.as_bytes()).await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert_eq!(answer.matches("refused").count(), 2, "{answer:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the body was not read as a request"
    );
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn an_unread_body_still_to_come_closes_the_connection_after_the_response() {
    let (mut client, calls, run) = serve(|_| async { text("refused") }).await;
    client
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.ends_with("refused"), "{answer:?}");
    assert!(answer.contains("\r\ncontent-length: 7\r\n"), "{answer:?}");
    assert!(
        answer.contains("\r\nconnection: close\r\n"),
        "the response says the connection ends: {answer:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn responses_are_framed_for_the_client_that_asked() {
    let streaming = |_| async { Response::new(streamed(&["hel", "lo"])) };
    // HTTP/1.1: chunked.
    let (answer, _, _) = answer_to(
        streaming,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{answer:?}"
    );
    assert!(
        answer.ends_with("\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"),
        "{answer:?}"
    );
    assert!(answer.contains("\r\ndate: "), "{answer:?}");

    // HTTP/1.0: the body runs to the close.
    let (mut client, _, run) = serve(streaming).await;
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer:?}");
    assert!(!answer.contains("transfer-encoding"), "{answer:?}");
    assert_eq!(run.await.unwrap(), "close");

    // HEAD: the length a GET would have, no body.
    let (answer, _, _) = answer_to(
        |_| async { text("twelve bytes") },
        b"HEAD / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("\r\ncontent-length: 12\r\n"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer:?}");

    // 204: neither length nor body, whatever the stack said.
    let (mut client, _, _) = serve(|_| async {
        let mut response = text("");
        *response.status_mut() = StatusCode::NO_CONTENT;
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        response
    })
    .await;
    client
        .write_all(b"DELETE / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(
        answer.starts_with("HTTP/1.1 204 No Content\r\n"),
        "{answer:?}"
    );
    assert!(!answer.contains("content-length"), "{answer:?}");
}

#[tokio::test]
async fn keep_alive_follows_the_clients_version_and_wishes() {
    // HTTP/1.0 asking to keep the connection: it is kept, and told so.
    let (answer, calls, run) = answer_to(
        |_| async { text("ok") },
        b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    )
    .await;
    assert_eq!(
        answer.matches("HTTP/1.1 200 OK\r\n").count(),
        2,
        "{answer:?}"
    );
    assert_eq!(
        answer.matches("connection: keep-alive").count(),
        1,
        "{answer:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(run.await.unwrap(), "close");

    // HTTP/1.1 asking to close: told so, and nothing after is read.
    let (answer, calls, _) = answer_to(|_| async { text("ok") }, b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(
        answer.matches("HTTP/1.1 200 OK\r\n").count(),
        1,
        "{answer:?}"
    );
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_quiet_connection_rests_with_nothing_unread() {
    let (mut client, _, run) = serve(|_| async { text("ok") }).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "ok", 1).await;
    assert_eq!(run.await.unwrap(), "rest");
}

#[tokio::test]
async fn the_reason_phrase_the_stack_gives_is_kept() {
    let (mut client, _, _) = serve(|_| async {
        let mut response = text("");
        *response.status_mut() = StatusCode::from_u16(299).unwrap();
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Custom Words"));
        response
    })
    .await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(
        answer.starts_with("HTTP/1.1 299 Custom Words\r\n"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_trailer_section_larger_than_a_head_may_be_fails_the_body() {
    let (mut client, _, run) = serve(echo).await;
    let mut request =
        b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
            .to_vec();
    for i in 0..limits().max_header_bytes / 100 + 1 {
        request.extend_from_slice(format!("x-t{i}: {}\r\n", "t".repeat(90)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    client.write_all(&request).await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.contains("POST /t error: "), "{answer:?}");
    drop(client);
    assert_eq!(run.await.unwrap(), "close");
}

/// A small deterministic generator (xorshift), so that a failing case can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Pipelined requests with every kind of body the engine reads, and what `echo` answers them.
const PIPELINE: &str = "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
    POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
    3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nt: 1\r\n\r\n\
    GET /c HTTP/1.1\r\nHost: h\r\n\r\n\
    POST /d HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n";

#[tokio::test]
async fn pipelined_requests_split_anywhere_are_read_the_same() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..40 {
        let (mut client, calls, run) = serve(echo).await;
        let bytes = PIPELINE.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            let len = 1 + rng.below(24);
            let end = (at + len).min(bytes.len());
            client.write_all(&bytes[at..end]).await.unwrap();
            if rng.below(3) == 0 {
                tokio::task::yield_now().await;
            }
            at = end;
        }
        let answer = read_to_end(&mut client).await;
        let bodies: Vec<&str> = answer
            .split("\r\n\r\n")
            .skip(1)
            .map(|rest| rest.split("HTTP/1.1").next().unwrap_or(""))
            .collect();
        assert_eq!(
            bodies,
            ["POST /a hello", "POST /b abcd", "GET /c ", "POST /d "],
            "round {round}: {answer:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4, "round {round}");
        assert_eq!(run.await.unwrap(), "close", "round {round}");
    }
}

#[tokio::test]
async fn mangled_requests_are_refused_or_read_whole_never_half() {
    // Each round changes a few bytes of a valid request. Whatever the engine makes of it, the
    // stack sees only complete requests it was able to frame, the engine does not panic, and
    // the connection ends rather than hangs.
    let valid =
        "POST /m HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                 4\r\nbody\r\n0\r\n\r\n";
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..150 {
        let mut bytes = valid.as_bytes().to_vec();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = rng.next() as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"\r\n: ;0aZ\x00\x7f"[rng.below(9)]),
            }
        }
        let (mut client, _, run) = serve(echo).await;
        client.write_all(&bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let answer = read_to_end(&mut client).await;
        // A refusal, an echo of what the stack read, or nothing (the client closed mid-head).
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 400 ")
                || answer.starts_with("HTTP/1.1 431 ")
                || answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "round {round}: {:?} -> {answer:?}",
            String::from_utf8_lossy(&bytes)
        );
        if let Some(body) = answer.split("\r\n\r\n").nth(1) {
            assert!(
                !body.starts_with("POST /m bo") || body == "POST /m body",
                "round {round}: a body read past its framing: {body:?}"
            );
        }
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the engine ended")
            .expect("the engine did not panic");
    }
}

/// Answers without reading the request body, which the response body holds until it is first
/// polled (after the head is written), as a proxy does whose upstream answered before taking
/// all of the upload.
async fn answer_holding_the_body(req: Request<Body>) -> Response<Body> {
    let held = req.into_body();
    let frame = async move {
        drop(held);
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"early")))
    };
    Response::new(Body::new(http_body_util::StreamBody::new(
        futures_util::stream::once(frame),
    )))
}

#[tokio::test]
async fn an_answer_given_while_the_body_is_still_to_come_says_the_connection_ends() {
    let (mut client, calls, run) = serve(answer_holding_the_body).await;
    // The rest of the body reads as a request: it must not be taken for one.
    let rest = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    let head = format!(
        "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\nabcd",
        4 + rest.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut client, "early", 1).await;
    assert!(
        answer.contains("\r\nconnection: close\r\n"),
        "the response says the connection ends: {answer:?}"
    );
    client.write_all(rest.as_bytes()).await.unwrap();
    let rest = read_to_end(&mut client).await;
    assert!(!rest.contains("HTTP/1.1"), "{rest:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn an_answer_given_while_a_body_all_arrived_is_held_keeps_the_connection() {
    let (mut client, calls, run) = serve(answer_holding_the_body).await;
    // Chunked (the copy of the decoder reads it), then a length, then the last request.
    client
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nabcd\r\n0\r\nx-t: 1\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd\
              GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_to_end(&mut client).await;
    assert_eq!(answer.matches("early").count(), 3, "{answer:?}");
    assert_eq!(
        answer.matches("connection: close").count(),
        1,
        "only the last response closes: {answer:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(run.await.unwrap(), "close");
}

#[tokio::test]
async fn what_a_response_wrote_over_tls_goes_out_while_it_waits_for_the_upstream() {
    // Much more than the sockets hold: the response waits for its socket again and again, and
    // TLS still holds records back when the first part has all been written.
    const FIRST: usize = 512 * 1024;
    use crate::tls::for_tests::{handshake, small_buffered_pair};
    let (server, client) = small_buffered_pair(false).await;
    let (mut client, server) = handshake(client, server).await;

    // The response body: what the test feeds it, as an upstream's streamed answer.
    let (feed, body) = crate::tls::for_tests::fed_body();
    let body = Arc::new(std::sync::Mutex::new(Some(body)));
    let app: AppService = BoxCloneService::new(tower::service_fn(move |_req| {
        let body = body.lock().unwrap().take().expect("one request");
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(FIRST as u64 + 1));
        async move { Ok::<_, Infallible>(response) }
    }));
    let service = ConnService::for_tests(app, "127.0.0.1:1".parse().unwrap());
    let engine = async {
        let limits = limits();
        let (_stop, stopping) = watch::channel(false);
        let outcome = Engine::new(server, &service, &limits, &stopping)
            .run(None)
            .await;
        outcome_name(&outcome)
    };

    // The client has the first part before the rest is fed; if what went out before the
    // response waited for its body stayed in TLS, each side would wait for the other for ever.
    let (got_first, first_arrived) = tokio::sync::oneshot::channel::<()>();
    let client_side = async {
        client
            .write_all(b"GET /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        crate::tls::for_tests::read_paused_message(&mut client, FIRST, got_first).await
    };
    // Moves the feed in: the body ends when it is dropped.
    let upstream_side = async move {
        feed.send(Bytes::from(vec![b'x'; FIRST])).await.unwrap();
        first_arrived.await.unwrap();
        feed.send(Bytes::from_static(b"y")).await.unwrap();
    };
    let (head, outcome, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(client_side, engine, upstream_side)
    })
    .await
    .expect("the response went through");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(outcome, "close");
}
