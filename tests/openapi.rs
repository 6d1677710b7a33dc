//! The OpenAPI document of the session API: served without a token, identical to the one in
//! the repository, and true: every documented operation exists, answers its documented success
//! status with a body of the documented shape, and its documented errors can be provoked.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

const REPO_DOC: &str = include_str!("../src/session/openapi.json");
const DEFAULT_PREFIX: &str = "/api/v1/sessions";

struct Setup {
    redis: RedisServer,
    proxy: Proxy,
    _upstream: Upstream,
}

async fn setup_with(extra: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    Setup {
        redis,
        proxy,
        _upstream: upstream,
    }
}

fn repo_doc() -> Value {
    serde_json::from_str(REPO_DOC).expect("the repository's openapi.json is JSON")
}

async fn fetch_doc(s: &Setup, prefix: &str) -> Value {
    let resp = client()
        .get(s.proxy.url(&format!("{prefix}/openapi.json")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    json(resp).await
}

/// One documented operation.
struct Operation {
    path: String,
    method: Method,
    spec: Value,
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(spec) = item.get(method) {
                out.push(Operation {
                    path: path.clone(),
                    method: method.to_uppercase().parse().unwrap(),
                    spec: spec.clone(),
                });
            }
        }
    }
    out
}

impl Operation {
    fn documents(&self, status: u16) -> bool {
        self.spec["responses"].get(status.to_string()).is_some()
    }

    fn success(&self) -> u16 {
        let codes: Vec<u16> = self.spec["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter_map(|k| k.parse().ok())
            .filter(|c| (200..300).contains(c))
            .collect();
        assert_eq!(
            codes.len(),
            1,
            "{} {}: success codes {codes:?}",
            self.method,
            self.path
        );
        codes[0]
    }

    fn needs_token(&self) -> bool {
        self.spec
            .get("security")
            .and_then(Value::as_array)
            .is_none_or(|s| !s.is_empty())
    }

    fn url(&self, s: &Setup, session_id: &str) -> String {
        s.proxy.url(&self.path.replace("{sessionId}", session_id))
    }

    fn response_schema(&self, status: u16) -> Value {
        self.spec["responses"][status.to_string()]["content"]["application/json"]["schema"].clone()
    }
}

/// Checks `value` against the subset of JSON Schema the document uses.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unsupported $ref {reference}"))?;
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: dangling $ref {reference}"));
        }
        return validate(doc, target, value, at);
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let object = value
                .as_object()
                .ok_or_else(|| format!("{at}: {value} is not an object"))?;
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = name.as_str().unwrap();
                if !object.contains_key(name) {
                    return Err(format!("{at}: required {name} missing in {value}"));
                }
            }
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, v) in object {
                    match properties.get(name) {
                        Some(p) => validate(doc, p, v, &format!("{at}.{name}"))?,
                        // Answers carry no field the document does not name.
                        None => return Err(format!("{at}: undocumented property {name}")),
                    }
                }
            }
        }
        Some("array") => {
            let items = value
                .as_array()
                .ok_or_else(|| format!("{at}: {value} is not an array"))?;
            for (i, v) in items.iter().enumerate() {
                validate(doc, &schema["items"], v, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") => {
            let s = value
                .as_str()
                .ok_or_else(|| format!("{at}: {value} is not a string"))?;
            match schema.get("format").and_then(Value::as_str) {
                Some("uuid") if uuid::Uuid::parse_str(s).is_err() => {
                    return Err(format!("{at}: {s} is not a uuid"));
                }
                Some("date-time") if chrono::DateTime::parse_from_rfc3339(s).is_err() => {
                    return Err(format!("{at}: {s} is not a date-time"));
                }
                _ => {}
            }
        }
        Some("boolean") if !value.is_boolean() => {
            return Err(format!("{at}: {value} is not a boolean"));
        }
        Some("integer") => {
            let n = value
                .as_i64()
                .ok_or_else(|| format!("{at}: {value} is not an integer"))?;
            if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
                if n < min {
                    return Err(format!("{at}: {n} is below the minimum {min}"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A fresh session of `user`, created through the create operation the document describes.
async fn create(s: &Setup, doc: &Value, user: &str) -> String {
    let path = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .find(|p| p.ends_with("/create"))
        .expect("a create path")
        .clone();
    let resp = client()
        .post(s.proxy.url(&path))
        .bearer_auth(token(user, None))
        .json(&json!({"metadata": {"platform": "web", "deviceId": "d1", "userAgent": "Game/1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    json(resp).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Calls every documented operation as intended and checks status and body shape.
async fn every_operation_answers_as_documented(s: &Setup, doc: &Value) {
    let ops = operations(doc);
    assert_eq!(ops.len(), 7, "documented operations");
    for op in &ops {
        let sid = create(s, doc, "alice").await;
        let mut req = client().request(op.method.clone(), op.url(s, &sid));
        if op.needs_token() {
            req = req.bearer_auth(token("alice", None));
        }
        if op.spec.get("requestBody").is_some() {
            req = req.json(&json!({"metadata": {"platform": "ios"}}));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = json(resp).await;
        let what = format!("{} {}", op.method, op.path);
        assert_ne!(
            body["error"]["code"], "NOT_FOUND",
            "{what} is not an endpoint"
        );
        assert_ne!(status, 405, "{what}: {body}");
        assert_eq!(status, op.success(), "{what}: {body}");
        if let Err(e) = validate(doc, &op.response_schema(status), &body, "body") {
            panic!("{what}: the answer does not match the document: {e}");
        }
    }
}

#[tokio::test]
async fn the_document_is_served_without_a_token_and_is_the_one_in_the_repository() {
    let s = setup_with("").await;
    let served = fetch_doc(&s, DEFAULT_PREFIX).await;
    assert_eq!(served, repo_doc());
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
}

#[tokio::test]
async fn every_documented_operation_is_a_real_endpoint_answering_its_documented_success() {
    let s = setup_with("").await;
    let doc = fetch_doc(&s, DEFAULT_PREFIX).await;
    every_operation_answers_as_documented(&s, &doc).await;
}

#[tokio::test]
async fn undocumented_methods_on_documented_paths_are_405() {
    let s = setup_with("").await;
    let doc = fetch_doc(&s, DEFAULT_PREFIX).await;
    let sid = create(&s, &doc, "alice").await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                continue;
            }
            let url = s.proxy.url(&path.replace("{sessionId}", &sid));
            let resp = client()
                .request(method.to_uppercase().parse().unwrap(), url)
                .bearer_auth(token("alice", None))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 405, "{method} {path}");
        }
    }
}

#[tokio::test]
async fn documented_error_answers_happen_with_the_documented_shape() {
    let mut s = setup_with("").await;
    let doc = fetch_doc(&s, DEFAULT_PREFIX).await;
    let ops = operations(&doc);
    let check = |op: &Operation, status: u16, body: &Value, why: &str| {
        let what = format!("{} {} ({why})", op.method, op.path);
        assert!(op.documents(status), "{what}: {status} is not documented");
        if let Err(e) = validate(&doc, &op.response_schema(status), body, "body") {
            panic!("{what}: {e}");
        }
    };
    for op in &ops {
        let has_id = op.path.contains("{sessionId}");
        // 401 without a token, where a token is needed.
        if op.needs_token() {
            let sid = uuid::Uuid::new_v4().to_string();
            let resp = client()
                .request(op.method.clone(), op.url(&s, &sid))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            assert_eq!(status, 401);
            check(op, status, &json(resp).await, "no token");
        }
        // 400 and 404 on the session id.
        if has_id {
            for (sid, expected) in [
                ("not-a-uuid".to_string(), 400),
                (uuid::Uuid::new_v4().to_string(), 404),
            ] {
                let resp = client()
                    .request(op.method.clone(), op.url(&s, &sid))
                    .bearer_auth(token("alice", None))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                assert_eq!(status, expected, "{} {} with {sid}", op.method, op.path);
                check(op, status, &json(resp).await, &sid);
            }
        }
        // 400 and 413 on the request body.
        if op.spec.get("requestBody").is_some() {
            let resp = client()
                .request(op.method.clone(), op.url(&s, ""))
                .bearer_auth(token("alice", None))
                .json(&json!({"metadata": {"platform": "windows"}}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            assert_eq!(status, 400);
            check(op, status, &json(resp).await, "bad body");
        }
        // 413 on a body over the limit: every POST reads its body, used or not.
        if op.method == Method::POST {
            let sid = uuid::Uuid::new_v4().to_string();
            let resp = client()
                .request(op.method.clone(), op.url(&s, &sid))
                .bearer_auth(token("alice", None))
                .body(" ".repeat(17 * 1024))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            assert_eq!(status, 413, "{} {}", op.method, op.path);
            check(op, status, &json(resp).await, "oversized body");
        }
    }
    // 503 while the store is down, for every operation that documents it.
    s.redis.stop();
    for op in ops.iter().filter(|op| op.documents(503)) {
        let sid = uuid::Uuid::new_v4().to_string();
        let resp = client()
            .request(op.method.clone(), op.url(&s, &sid))
            .bearer_auth(token("alice", None))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, 503, "{} {}", op.method, op.path);
        check(op, status, &json(resp).await, "Redis down");
    }
}

#[tokio::test]
async fn the_document_follows_a_configured_api_prefix() {
    let prefix = "/game/session-api/v2";
    let s = setup_with(&format!("[session]\napi_prefix = \"{prefix}/\"\n")).await;
    let doc = fetch_doc(&s, prefix).await;
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(paths.len(), 5);
    for path in &paths {
        assert!(path.starts_with(&format!("{prefix}/")), "{path}");
    }
    assert!(
        !doc.to_string().contains(DEFAULT_PREFIX),
        "the default prefix is still in the document"
    );
    let expected: Value = serde_json::from_str(&REPO_DOC.replace(DEFAULT_PREFIX, prefix)).unwrap();
    assert_eq!(doc, expected);
    every_operation_answers_as_documented(&s, &doc).await;

    // The default path is now an ordinary proxied route, not the API.
    let resp = client()
        .get(s.proxy.url("/api/v1/sessions/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "TOKEN_MISSING").await;
}
