//! End-to-end: pinning a document to a backend. A pin moves exactly that document (its
//! WebSockets on the old owner close with 1012, every other stream stays), holds while the
//! pinned backend is available and comes back with it, says `pinned` in `/route` and
//! `tether route`, and survives a reload and a restart through `server.state_file`;
//! `tether pin` / `tether unpin` drive it. (Pins shared by a fleet through etcd: `fleet.rs`.)

use crate::support::{metric, pin_request, tether_binary, Socket, Stack};
use serde_json::Value;
use std::time::Duration;
use tether_testkit::{http_get, http_request, wait_until_async, LaunchOptions, TetherProcess};

const CONFIG: &str = r#"
server:
  state_file: $STATE
listeners:
  - address: $PROXY
admin:
  address: $ADMIN
upstreams:
  docs:
    backends:
      - address: $B0
      - address: $B1
      - address: $B2
    rebalance:
      max_per_second: 1000
routes:
  - name: docs
    match: { path_prefix: /docs/ }
    sticky: { keys: [ { path: "/docs/{key}" } ] }
    upstream: docs
"#;

async fn admin_json(stack: &Stack, path: &str) -> Value {
    let r = http_get(&stack.tether.admin_url(path), &[])
        .await
        .expect("admin");
    r.json().unwrap_or(Value::Null)
}

/// `GET /route` for document `key`: (backend address, reason).
async fn route(admin: &str, key: &str) -> (String, String) {
    let r = http_get(&format!("{admin}/route?path=/docs/{key}/live"), &[])
        .await
        .expect("route");
    let v = r.json().unwrap_or(Value::Null);
    (
        v["backend"].as_str().unwrap_or("").to_string(),
        v["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// `POST` (Some) or `DELETE` (None) the pin of `key`: (status, answer).
async fn set_pin(stack: &Stack, key: &str, backend: Option<&str>) -> (u16, Value) {
    pin_request(&stack.tether, key, backend).await
}

/// A WebSocket of document `key` through `stack`.
async fn open(stack: &Stack, key: &str) -> Socket {
    Socket::open(&stack.ws_url(&format!("/docs/{key}/live")), key).await
}

fn admin_base(stack: &Stack) -> String {
    stack.tether.admin_url("").trim_end_matches('/').to_string()
}

async fn start(state: &std::path::Path) -> Stack {
    let config = CONFIG.replace("$STATE", &state.display().to_string());
    Stack::start(&config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_moves_exactly_its_document_and_holds_while_its_backend_is_available() {
    let dir = tempfile::tempdir().expect("dir");
    let stack = start(&dir.path().join("state.json")).await;
    let admin = admin_base(&stack);

    // Two documents on one backend; pin one of them to another backend.
    let (owner, reason) = route(&admin, "moving").await;
    assert_eq!(reason, "ring");
    let mut staying = None;
    for i in 0..200 {
        let key = format!("staying-{i}");
        if route(&admin, &key).await.0 == owner {
            staying = Some(key);
            break;
        }
    }
    let staying = staying.expect("a second document on the same backend");
    let moving_sockets = [open(&stack, "moving").await, open(&stack, "moving").await];
    let staying_sockets = [open(&stack, &staying).await, open(&stack, &staying).await];
    let owner_name = stack.name_of(owner.parse().expect("addr")).to_string();
    assert!(moving_sockets.iter().all(|s| s.backend == owner_name));
    let target = stack
        .backends
        .iter()
        .find(|b| b.addr().to_string() != owner)
        .expect("another backend");
    let pins_before = metric(
        &stack,
        r#"tether_ring_changes_total{cause="pin",upstream="docs"}"#,
    )
    .await
    .unwrap_or(0.0);

    let (status, answer) = set_pin(&stack, "moving", Some(&target.addr().to_string())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], "state_file");
    assert_eq!(answer["in_force"], true);

    let moved = wait_until_async(Duration::from_secs(5), || async {
        moving_sockets.iter().all(|s| s.ended().is_some())
    })
    .await;
    assert!(
        moved,
        "the pinned document's streams on its old owner were not closed"
    );
    for s in &moving_sockets {
        assert_eq!(s.ended(), Some(Some(1012)), "closed as moved");
    }
    assert!(
        staying_sockets.iter().all(|s| s.ended().is_none()),
        "another document's stream on the same backend was closed"
    );
    assert_eq!(
        route(&admin, "moving").await,
        (target.addr().to_string(), "pinned".to_string())
    );
    let reopened = open(&stack, "moving").await;
    assert_eq!(
        reopened.backend,
        target.name(),
        "a new stream goes to the pin"
    );
    let read = admin_json(&stack, "/upstreams/docs/keys/moving/pin").await;
    assert_eq!(read["pinned"], target.addr().to_string(), "{read}");
    assert_eq!(read["in_force"], true, "{read}");
    let listed = admin_json(&stack, "/upstreams/docs/pins").await;
    assert_eq!(listed["pins"][0]["key"], "moving", "{listed}");
    assert_eq!(
        metric(
            &stack,
            r#"tether_ring_changes_total{cause="pin",upstream="docs"}"#
        )
        .await,
        Some(pins_before + 1.0)
    );

    // The pinned backend drained: the ring's owner takes the document; undrained: the pin.
    stack.set_drain(target.name(), true).await;
    assert_eq!(
        route(&admin, "moving").await,
        (owner.clone(), "ring".into())
    );
    let read = admin_json(&stack, "/upstreams/docs/keys/moving/pin").await;
    assert_eq!(read["in_force"], false, "{read}");
    stack.set_drain(target.name(), false).await;
    assert_eq!(
        route(&admin, "moving").await,
        (target.addr().to_string(), "pinned".into())
    );

    // Unpinned: back to the ring's owner, and the stream on the pinned backend is closed.
    let (status, answer) = set_pin(&stack, "moving", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pinned"], Value::Null);
    assert_eq!(route(&admin, "moving").await, (owner, "ring".into()));
    let back = wait_until_async(Duration::from_secs(5), || async {
        reopened.ended().is_some()
    })
    .await;
    assert!(back && reopened.ended() == Some(Some(1012)));
    assert!(staying_sockets.iter().all(|s| s.ended().is_none()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_that_cannot_be_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let stack = start(&dir.path().join("state.json")).await;
    let member = stack.backends[0].addr().to_string();
    let cases = [
        (
            "doc",
            Some("127.0.0.1:1"),
            400,
            "is not a backend of upstream",
        ),
        ("doc", Some("nowhere"), 400, "is not ip:port"),
        ("%01doc", Some(member.as_str()), 400, "control characters"),
    ];
    for (key, backend, status, says) in cases {
        let (got, answer) = set_pin(&stack, key, backend).await;
        assert_eq!(got, status, "{key} {backend:?}: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(error.contains(says), "{key} {backend:?}: {error}");
    }
    let r = http_request(
        http::Method::POST,
        &stack.tether.admin_url("/upstreams/nope/keys/doc/pin"),
        &[],
        format!("{{\"backend\":\"{}\"}}", stack.backends[0].addr()).into_bytes(),
    )
    .await
    .expect("pin");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        !dir.path().join("state.json").exists(),
        "a refused pin wrote the state file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_survive_a_reload_and_a_restart_and_the_cli_sets_and_shows_them() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state.json");
    let mut stack = start(&state).await;
    let admin = admin_base(&stack);
    let (owner, _) = route(&admin, "big-doc").await;
    let target = stack
        .backends
        .iter()
        .find(|b| b.addr().to_string() != owner)
        .expect("another backend")
        .addr()
        .to_string();
    let config_path = stack.tether.config_path();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(tether_binary())
            .args(args)
            .output()
            .expect("run tether");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let config_arg = config_path.display().to_string();
    let (ok, said) = cli(&["pin", "-c", &config_arg, "big-doc", &target]);
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("big-doc pinned to {target}")),
        "{said}"
    );
    assert!(said.contains("state_file"), "{said}");
    assert_eq!(
        route(&admin, "big-doc").await,
        (target.clone(), "pinned".into())
    );
    let file = std::fs::read_to_string(&state).expect("state file written");
    assert!(file.contains("big-doc") && file.contains(&target), "{file}");

    // `tether route` answers from the config and its state file, as the proxy would.
    let (ok, said) = cli(&["route", "-c", &config_arg, "--path", "/docs/big-doc/live"]);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("backend: {target}")), "{said}");
    assert!(said.contains("reason: pinned"), "{said}");
    let (ok, said) = cli(&["check", "-c", &config_arg]);
    assert!(ok && said.contains("1 pinned documents"), "{said}");

    // A reload keeps it.
    let r = stack.admin_post("/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        route(&admin, "big-doc").await,
        (target.clone(), "pinned".into())
    );

    // A restart (a new process on the same config and state file) reads it back.
    let config = stack.config.clone();
    stack.tether.kill().await.expect("kill");
    let restarted = TetherProcess::start_with(
        tether_binary(),
        &config,
        stack.tether.admin_addr(),
        LaunchOptions::default(),
    )
    .await
    .expect("restart");
    let admin = restarted.admin_url("").trim_end_matches('/').to_string();
    assert_eq!(
        route(&admin, "big-doc").await,
        (target.clone(), "pinned".into())
    );

    // Unpinned through the CLI, against the restarted proxy (the first process's directory,
    // which holds the config file, is kept).
    let _first = std::mem::replace(&mut stack.tether, restarted);
    let (ok, said) = cli(&["unpin", "-c", &config_arg, "big-doc"]);
    assert!(ok, "{said}");
    assert!(said.contains("big-doc unpinned"), "{said}");
    assert_eq!(route(&admin, "big-doc").await, (owner, "ring".into()));
    let file = std::fs::read_to_string(&state).expect("state file");
    assert!(!file.contains("big-doc"), "{file}");

    // A state file that is not one stops the proxy at start, naming it.
    std::fs::write(&state, "{ not json").expect("write");
    let (ok, said) = cli(&["check", "-c", &config_arg]);
    assert!(!ok && said.contains("state file"), "{said}");
}
