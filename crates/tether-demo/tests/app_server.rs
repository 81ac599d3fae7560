//! One demo app server, talked to directly (no proxy) over each transport.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tether_demo::AppServer;
use tether_testkit::{http_get, http_request, sse_events, ws_connect, Message, WsClient};

/// Loopback delivery budget for one edit, from the issue.
const PUSH_BUDGET: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(5);

async fn server() -> (AppServer, String) {
    let server = AppServer::start("app-1", "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("start");
    let base = format!("http://{}", server.addr());
    (server, base)
}

async fn next_json(ws: &mut WsClient) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message within 5 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// Reads messages until one of `kind`, skipping others (e.g. viewer counts).
async fn next_of(ws: &mut WsClient, kind: &str) -> Value {
    loop {
        let message = next_json(ws).await;
        if message["type"] == kind {
            return message;
        }
    }
}

async fn post_edit(
    base: &str,
    doc: &str,
    client: &str,
    edit: Value,
) -> tether_testkit::HttpResponse {
    let url = format!("{base}/docs/{doc}/ops?client={client}");
    http_request(http::Method::POST, &url, &[], edit.to_string())
        .await
        .expect("POST")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_on_one_websocket_reaches_the_other_viewer_within_100ms() {
    let (_server, base) = server().await;
    let ws_url =
        |client: &str| format!("{}/docs/d1/ws?client={client}", base.replace("http", "ws"));
    let (mut a, _) = ws_connect(&ws_url("a"), &[]).await.expect("a");
    let (mut b, _) = ws_connect(&ws_url("b"), &[]).await.expect("b");
    let hello = next_of(&mut a, "hello").await;
    assert_eq!(hello["server"], "app-1");
    assert_eq!(
        (hello["rev"].clone(), hello["text"].clone()),
        (json!(0), json!(""))
    );
    next_of(&mut b, "hello").await;

    let sent = Instant::now();
    let edit = json!({"rev": 0, "seq": 1, "op": ["hi"]});
    a.send(Message::text(edit.to_string())).await.expect("send");
    let seen = next_of(&mut b, "op").await;
    let latency = sent.elapsed();
    assert_eq!(seen["op"], json!(["hi"]));
    assert_eq!(
        (seen["rev"].clone(), seen["client"].clone()),
        (json!(1), json!("a"))
    );
    assert!(latency < PUSH_BUDGET, "took {latency:?}");
    // The author gets it back too: that is its acknowledgement.
    assert_eq!(next_of(&mut a, "op").await["seq"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_edits_over_websocket_and_post_are_both_kept() {
    let (_server, base) = server().await;
    post_edit(
        &base,
        "d2",
        "seed",
        json!({"rev": 0, "seq": 1, "op": ["ac"]}),
    )
    .await;
    let ws_url = format!("{}/docs/d2/ws?client=w", base.replace("http", "ws"));
    let (mut ws, _) = ws_connect(&ws_url, &[]).await.expect("ws");
    assert_eq!(next_of(&mut ws, "hello").await["text"], "ac");
    // Both edits are made on revision 1, neither knowing the other.
    let posted = post_edit(
        &base,
        "d2",
        "p",
        json!({"rev": 1, "seq": 1, "op": [1, "b", 1]}),
    )
    .await;
    assert_eq!(posted.json().expect("json")["rev"], 2);
    ws.send(Message::text(
        json!({"rev": 1, "seq": 1, "op": [2, "d"]}).to_string(),
    ))
    .await
    .expect("send");
    next_of(&mut ws, "op").await;
    let own = next_of(&mut ws, "op").await;
    assert_eq!(own["client"], "w");
    let state = http_get(&format!("{base}/docs/d2/state"), &[])
        .await
        .expect("state");
    assert_eq!(state.json().expect("json")["text"], "abcd");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sse_viewer_receives_edits_posted_by_others_within_100ms() {
    let (_server, base) = server().await;
    let mut events = sse_events(&format!("{base}/docs/d3/events?client=s"))
        .await
        .expect("sse");
    assert_eq!(
        events.headers.get("x-app-server").map(|v| v.as_bytes()),
        Some(&b"app-1"[..])
    );
    let hello = tokio::time::timeout(WAIT, events.next_event())
        .await
        .expect("hello in time")
        .expect("open")
        .expect("event");
    assert_eq!(hello.json().expect("json")["type"], "hello");

    let sent = Instant::now();
    post_edit(&base, "d3", "p", json!({"rev": 0, "seq": 1, "op": ["x"]})).await;
    loop {
        let event = tokio::time::timeout(WAIT, events.next_event())
            .await
            .expect("event in time")
            .expect("open")
            .expect("event");
        let message = event.json().expect("json");
        if message["type"] == "op" {
            assert_eq!(message["op"], json!(["x"]));
            break;
        }
    }
    assert!(sent.elapsed() < PUSH_BUDGET, "took {:?}", sent.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_answers_as_soon_as_an_edit_is_applied() {
    let (_server, base) = server().await;
    let first = http_get(&format!("{base}/poll/docs/d4?client=p&hello=1"), &[])
        .await
        .expect("hello poll");
    let hello = &first.json().expect("json")[0];
    assert_eq!(
        (hello["type"].clone(), hello["viewers"].clone()),
        (json!("hello"), json!(1))
    );

    let url = format!("{base}/poll/docs/d4?client=p&since=0&server=app-1&viewers=1");
    let poll = tokio::spawn(async move { http_get(&url, &[]).await });
    // The poll is waiting: it has not answered before the edit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "the poll answered with nothing to say");
    let sent = Instant::now();
    post_edit(&base, "d4", "q", json!({"rev": 0, "seq": 1, "op": ["z"]})).await;
    let answer = tokio::time::timeout(WAIT, poll)
        .await
        .expect("answer in time")
        .expect("task")
        .expect("poll");
    assert!(sent.elapsed() < PUSH_BUDGET, "took {:?}", sent.elapsed());
    assert_eq!(answer.json().expect("json")[0]["op"], json!(["z"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn viewers_see_the_count_change_as_people_come_and_go() {
    let (_server, base) = server().await;
    let ws_url =
        |client: &str| format!("{}/docs/d5/ws?client={client}", base.replace("http", "ws"));
    let (mut a, _) = ws_connect(&ws_url("a"), &[]).await.expect("a");
    assert_eq!(next_of(&mut a, "hello").await["viewers"], 1);
    let (b, _) = ws_connect(&ws_url("b"), &[]).await.expect("b");
    assert_eq!(next_of(&mut a, "viewers").await["count"], 2);
    drop(b);
    assert_eq!(next_of(&mut a, "viewers").await["count"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_gets_missed_edits_from_the_same_server_and_a_full_copy_from_another() {
    let (_server, base) = server().await;
    for (seq, op) in [(1, json!(["ab"])), (2, json!([2, "c"]))] {
        post_edit(
            &base,
            "d6",
            "p",
            json!({"rev": seq - 1, "seq": seq, "op": op}),
        )
        .await;
    }
    let ws = base.replace("http", "ws");
    let (mut same, _) = ws_connect(
        &format!("{ws}/docs/d6/ws?client=a&since=1&server=app-1"),
        &[],
    )
    .await
    .expect("same");
    let hello = next_of(&mut same, "hello").await;
    assert_eq!(hello["missed"][0]["op"], json!([2, "c"]));
    assert!(hello.get("text").is_none());
    let (mut other, _) = ws_connect(
        &format!("{ws}/docs/d6/ws?client=b&since=1&server=app-9"),
        &[],
    )
    .await
    .expect("other");
    assert_eq!(next_of(&mut other, "hello").await["text"], "abc");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_edit_is_refused_and_the_document_is_unchanged() {
    let (_server, base) = server().await;
    let refused = post_edit(
        &base,
        "d7",
        "p",
        json!({"rev": 0, "seq": 1, "op": [5, "x"]}),
    )
    .await;
    assert_eq!(refused.status, 409);
    let unknown = post_edit(&base, "d7", "p", json!({"rev": 3, "seq": 2, "op": ["x"]})).await;
    assert_eq!(unknown.status, 409);
    let state = http_get(&format!("{base}/docs/d7/state"), &[])
        .await
        .expect("state");
    assert_eq!(state.json().expect("json")["rev"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_name_their_server_and_also_work_under_unpinned() {
    let (_server, base) = server().await;
    for path in ["/docs/notes", "/unpinned/docs/notes"] {
        let page = http_get(&format!("{base}{path}"), &[]).await.expect("page");
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(page.header("x-app-server"), Some("app-1"));
        assert!(page.text().contains(r#"id="page-server">app-1<"#), "{path}");
    }
    for (path, status) in [
        ("/", 200),
        ("/unpinned/", 200),
        ("/assets/app.js", 200),
        ("/assets/ot.js", 200),
        ("/assets/style.css", 200),
        ("/assets/nope.js", 404),
        ("/docs/not%20ok", 400),
        ("/docs/x/ws?client=a", 400),
        ("/docs/x/events", 400),
        ("/nowhere", 404),
    ] {
        let response = http_get(&format!("{base}{path}"), &[]).await.expect(path);
        assert_eq!(response.status, status, "{path}");
    }
}
