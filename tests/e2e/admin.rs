//! End-to-end: the admin API (`/readyz`, `/config`, `/route`, `/upstreams`) and the access log.

use crate::support::{Stack, STANDARD};
use std::time::Duration;
use tether_testkit::{http_get, http_request, wait_until_async, ws_connect};

async fn admin_json(stack: &Stack, path: &str) -> (u16, serde_json::Value) {
    let r = http_get(&stack.tether.admin_url(path), &[])
        .await
        .expect("admin request");
    assert_eq!(r.header("content-type"), Some("application/json"));
    (r.status.as_u16(), r.json().expect("JSON body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_200_with_a_backend_up_everywhere_and_503_naming_the_upstream_without() {
    let config = r#"
listeners: [ { address: $PROXY } ]
admin: { address: $ADMIN }
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    upstream: docs
"#;
    let stack = Stack::start(config).await;
    let (status, body) = admin_json(&stack, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    for b in &stack.backends {
        let url = stack
            .tether
            .admin_url(&format!("/upstreams/docs/backends/{}/drain", b.addr()));
        let r = http_request(http::Method::POST, &url, &[], Vec::new())
            .await
            .expect("drain");
        assert_eq!(r.status, 200);
    }
    let (status, body) = admin_json(&stack, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.to_string().contains("upstream docs"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_shows_the_effective_config_with_defaults_and_route_answers_like_the_proxy() {
    let stack = Stack::start(STANDARD).await;
    let (status, config) = admin_json(&stack, "/config").await;
    assert_eq!(status, 200);
    assert_eq!(config["routes"][0]["name"], "by-header");
    assert_eq!(config["routes"][0]["retries"], 2, "defaults are filled in");
    assert_eq!(config["upstreams"]["docs"]["balance"], "ketama");

    for i in 0..20 {
        let key = format!("doc-{i}");
        let (status, decision) = admin_json(&stack, &format!("/route?path=/docs/{key}/x")).await;
        assert_eq!(status, 200);
        assert_eq!(decision["route"], "by-path");
        assert_eq!(decision["key"], key.as_str());
        assert_eq!(decision["key_source"], "path");
        let proxied = http_get(&stack.url(&format!("/docs/{key}/x")), &[])
            .await
            .expect("GET");
        let name = proxied.header("x-backend").expect("x-backend");
        assert_eq!(
            decision["backend"],
            stack.backend(name).addr().to_string(),
            "{key}"
        );
    }
    let (_, by_header) =
        admin_json(&stack, "/route?path=/h/x&header=X-Doc-Id:abc&method=post").await;
    assert_eq!(by_header["key_source"], "header");
    assert_eq!(by_header["key"], "abc");
    let (_, missing) = admin_json(&stack, "/route?path=/h/x").await;
    assert_eq!(missing["rejected"], 400);
    let (status, _) = admin_json(&stack, "/route?nonsense=1").await;
    assert_eq!(status, 400);

    let (_, upstreams) = admin_json(&stack, "/upstreams").await;
    let docs = upstreams["upstreams"]
        .as_array()
        .expect("list")
        .iter()
        .find(|u| u["name"] == "docs")
        .expect("docs")
        .clone();
    let shares: f64 = docs["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["ring_share"].as_f64().expect("share"))
        .sum();
    assert!((shares - 1.0).abs() < 1e-6, "{docs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_writes_one_json_line_per_request_without_keys() {
    let config = STANDARD.replace(
        "listeners:",
        "server:\n  access_log: { format: json }\nlisteners:",
    );
    let stack = Stack::start(&config).await;
    for i in 0..5 {
        let r = http_get(&stack.url(&format!("/docs/secret-doc-{i}/x")), &[])
            .await
            .expect("GET");
        assert_eq!(r.status, 200);
    }
    let _ = http_get(&stack.url("/nowhere"), &[]).await;
    let logged = wait_until_async(Duration::from_secs(5), || {
        let n = stack.tether.stdout().lines().count();
        async move { n >= 6 }
    })
    .await;
    assert!(logged, "stdout: {}", stack.tether.stdout());
    let stdout = stack.tether.stdout();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let routed: Vec<_> = lines.iter().filter(|l| l["route"] == "by-path").collect();
    assert_eq!(routed.len(), 5);
    for line in &routed {
        assert_eq!(line["status"], 200);
        assert_eq!(line["key_source"], "path");
        assert_eq!(line["upstream"], "docs");
        assert!(line["backend"].as_str().is_some_and(|b| !b.is_empty()));
        assert!(line["request_id"].as_str().is_some_and(|b| !b.is_empty()));
        assert!(line["duration"].as_f64().is_some());
        assert!(line.get("key").is_none());
    }
    assert!(lines.iter().any(|l| l["status"] == 404 && l["route"] == ""));
    assert!(!stdout.contains("secret-doc"), "a key leaked into the log");
}

/// A WebSocket is logged once, when it ends: status 101, kind `websocket`, its whole lifetime
/// as the duration, the bytes sent to the client after the 101, and the request id the client
/// saw on the 101.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_is_logged_when_it_ends_with_its_whole_duration() {
    use futures_util::{SinkExt, StreamExt};
    let config = STANDARD.replace(
        "listeners:",
        "server:\n  access_log: { format: json }\nlisteners:",
    );
    let stack = Stack::start(&config).await;
    let (mut ws, headers) = ws_connect(&stack.ws_url("/docs/logged/ws"), &[])
        .await
        .expect("upgrade");
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("X-Request-Id on the 101")
        .to_string();
    let opened = std::time::Instant::now();
    for _ in 0..3 {
        ws.send(tether_testkit::Message::text("0123456789"))
            .await
            .expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time");
        assert!(matches!(echo, Some(Ok(_))), "{echo:?}");
    }
    // Held open a while (the stimulus), so the logged duration shows the whole lifetime.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stack.tether.stdout().contains(&request_id),
        "logged before it ended: {}",
        stack.tether.stdout()
    );
    ws.close(None).await.expect("close");
    let open_for = opened.elapsed().as_secs_f64();
    let logged = wait_until_async(Duration::from_secs(5), || {
        let found = stack.tether.stdout().contains(&request_id);
        async move { found }
    })
    .await;
    assert!(logged, "stdout: {}", stack.tether.stdout());
    let stdout = stack.tether.stdout();
    let line: serde_json::Value = stdout
        .lines()
        .find(|l| l.contains(&request_id))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .expect("the line");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["kind"], "websocket", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["route"], "by-path", "{line}");
    assert!(
        line["backend"].as_str().is_some_and(|b| !b.is_empty()),
        "{line}"
    );
    let duration = line["duration"].as_f64().expect("duration");
    assert!(
        duration >= 0.3 && duration <= open_for + 1.0,
        "duration {duration} for a WebSocket open {open_for} s"
    );
    // Three 10-byte echoes (2-byte frame headers) at least.
    assert!(line["bytes"].as_u64().is_some_and(|b| b >= 36), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_downstream_connection_gauge_follows_open_connections() {
    let stack = Stack::start(STANDARD).await;
    let gauge = || async {
        http_get(&stack.tether.admin_url("/metrics"), &[])
            .await
            .map(|r| r.text())
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("tether_downstream_connections "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let (ws, _) = ws_connect(&stack.ws_url("/docs/g/ws"), &[])
        .await
        .expect("ws");
    let (ws2, _) = ws_connect(&stack.ws_url("/docs/h/ws"), &[])
        .await
        .expect("ws");
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            gauge().await == Some(2.0)
        })
        .await
    );
    drop((ws, ws2));
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            gauge().await == Some(0.0)
        })
        .await
    );
}

const WITH_TOKEN: &str = r#"
listeners: [ { address: $PROXY } ]
admin:
  address: $ADMIN
  token_file: admin.token
  public: [ /healthz, /metrics ]
upstreams:
  docs:
    backends: [ { address: $B0 }, { address: $B1 }, { address: $B2 } ]
routes:
  - name: docs
    upstream: docs
"#;

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_file_every_admin_request_but_the_public_paths_needs_the_bearer_token() {
    let options = tether_testkit::LaunchOptions {
        files: &[("admin.token", b"s3cret-token\n")],
        ..Default::default()
    };
    let stack = Stack::start_with(WITH_TOKEN, options).await;
    let tether = &stack.tether;
    let addrs: Vec<_> = stack.backends.iter().map(|b| b.addr()).collect();
    let url = |p: &str| tether.admin_url(p);

    assert_eq!(
        http_get(&url("/metrics"), &[])
            .await
            .expect("metrics")
            .status,
        200
    );
    let denied = http_get(&url("/upstreams"), &[]).await.expect("upstreams");
    assert_eq!(denied.status, 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    let wrong = http_get(
        &url("/upstreams"),
        &[("authorization", "Bearer s3cret-tokem")],
    )
    .await
    .expect("upstreams");
    assert_eq!(wrong.status, 401);
    let ok = http_get(
        &url("/upstreams"),
        &[("authorization", "Bearer s3cret-token")],
    )
    .await
    .expect("upstreams");
    assert_eq!(ok.status, 200);

    assert_eq!(stack.admin_post("/reload").await.status, 401);
    let drain = format!("/upstreams/docs/backends/{}/drain", addrs[0]);
    let r = stack.admin_post(&drain).await;
    assert_eq!(r.status, 401, "an unauthenticated drain must do nothing");
    let status = http_get(
        &url("/upstreams"),
        &[("authorization", "Bearer s3cret-token")],
    )
    .await
    .expect("upstreams")
    .text();
    assert!(!status.contains("\"draining\":true"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_token_file_stops_the_start_with_a_message_naming_it() {
    let (proxy, admin) = (tether_testkit::free_addr(), tether_testkit::free_addr());
    let addrs: Vec<_> = (0..3).map(|_| tether_testkit::free_addr()).collect();
    let config = crate::support::fill(WITH_TOKEN, proxy, admin, &addrs, &[]);
    let result =
        tether_testkit::TetherProcess::start(crate::support::tether_binary(), &config, admin).await;
    let error = result.expect_err("must not start").to_string();
    assert!(error.contains("admin.token_file admin.token"), "{error}");
}
