//! Tether's `ketama` against the real nginx: for the same three backends and weights, a key goes
//! to the same backend through `tether` as through nginx's `hash $http_x_doc_id consistent`.
//!
//! Needs nginx at `/usr/sbin/nginx` (or on `PATH`); `scripts/setup-tests.sh` installs `nginx-light`.
//! Without it these tests fail rather than pass silently.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::Stack;
use tether_testkit::{free_addr, http_get, wait_until_async};

/// Keys `doc-0` .. `doc-999`, each sent once through each proxy.
const KEYS: usize = 1000;
/// Requests in flight at once per proxy.
const CLIENTS: usize = 16;

/// One upstream of the three live backends, with `$W0`..`$W2` as their weights, and one route
/// keyed on `X-Doc-Id`.
const TEMPLATE: &str = r#"
listeners:
  - address: $PROXY
admin:
  address: $ADMIN
upstreams:
  docs:
    balance: ketama
    backends:
      - { address: $B0, weight: $W0 }
      - { address: $B1, weight: $W1 }
      - { address: $B2, weight: $W2 }
routes:
  - name: by-doc
    match: { path_prefix: / }
    sticky: { keys: [ { header: X-Doc-Id } ] }
    upstream: docs
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_and_nginx_pick_the_same_backend_for_every_key() {
    let counts = compare_with_nginx([1, 1, 1]).await;
    assert_eq!(
        counts.len(),
        3,
        "keys did not spread over all three backends: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_weights_1_2_3_tether_and_nginx_still_agree() {
    let counts = compare_with_nginx([1, 2, 3]).await;
    assert_eq!(
        counts.len(),
        3,
        "keys did not spread over all three backends: {counts:?}"
    );
    // Agreement alone would also hold if both ignored weights; the heaviest must get more.
    assert!(
        counts["b2"] > counts["b0"],
        "weight 3 (b2) got fewer keys than weight 1 (b0): {counts:?}"
    );
}

/// Starts tether and nginx over the same backends with `weights`, sends every key through both,
/// asserts they agree on each, and returns how many keys each backend (by name) got.
async fn compare_with_nginx(weights: [u32; 3]) -> BTreeMap<String, usize> {
    let mut template = TEMPLATE.to_string();
    for (i, w) in weights.iter().enumerate() {
        template = template.replace(&format!("$W{i}"), &w.to_string());
    }
    let stack = Stack::start(&template).await;
    let servers: Vec<(SocketAddr, u32)> = stack
        .backends
        .iter()
        .map(|b| b.addr())
        .zip(weights)
        .collect();
    let nginx = Nginx::start(&servers).await;

    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("doc-{i}")).collect());
    let via_tether = backend_per_key(stack.url("/doc"), keys.clone()).await;
    let via_nginx = backend_per_key(nginx.url("/doc"), keys.clone()).await;

    let differing: Vec<String> = keys
        .iter()
        .zip(via_tether.iter().zip(&via_nginx))
        .filter(|(_, (t, n))| t != n)
        .map(|(k, (t, n))| format!("{k}: tether {t}, nginx {n}"))
        .collect();
    assert!(
        differing.is_empty(),
        "weights {weights:?}: {} of {KEYS} keys went to another backend through tether than \
         through nginx, e.g.\n{}",
        differing.len(),
        differing[..differing.len().min(10)].join("\n")
    );

    let mut counts = BTreeMap::new();
    for name in via_tether {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// For each key in order, the `x-backend` that answered `GET url` with `X-Doc-Id: key`.
/// `CLIENTS` tasks share the keys; each request is on a new connection.
async fn backend_per_key(url: String, keys: Arc<Vec<String>>) -> Vec<String> {
    let url = Arc::new(url);
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (url, keys) = (url.clone(), keys.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for i in (client..keys.len()).step_by(CLIENTS) {
                let key = keys[i].as_str();
                let response = match http_get(&url, &[("x-doc-id", key)]).await {
                    Ok(r) => r,
                    Err(e) => panic!("GET {url} with key {key}: {e}"),
                };
                assert_eq!(
                    response.status,
                    200,
                    "GET {url} with key {key}: {}",
                    response.text()
                );
                let Some(backend) = response.header("x-backend") else {
                    panic!("GET {url} with key {key}: no x-backend header");
                };
                answers.push((i, backend.to_string()));
            }
            answers
        });
    }
    let mut by_key = vec![String::new(); keys.len()];
    while let Some(done) = tasks.join_next().await {
        let answers = match done {
            Ok(a) => a,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        for (i, backend) in answers {
            by_key[i] = backend;
        }
    }
    by_key
}

/// A real nginx (single process, in the foreground) in its own temp dir, proxying `/` to an
/// upstream `hash $http_x_doc_id consistent`. Killed, and its dir removed, on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    /// Writes the config, starts nginx and waits until its listener accepts.
    async fn start(servers: &[(SocketAddr, u32)]) -> Nginx {
        let binary = nginx_binary();
        let dir = std::env::temp_dir().join(format!(
            "tether-nginx-{}-{}",
            std::process::id(),
            servers
                .iter()
                .map(|(a, _)| a.port().to_string())
                .collect::<Vec<_>>()
                .join("-")
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        let addr = free_addr();
        let conf = dir.join("nginx.conf");
        if let Err(e) = std::fs::write(&conf, nginx_config(&dir, addr, servers)) {
            panic!("cannot write {}: {e}", conf.display());
        }
        let spawned = Command::new(&binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => panic!("cannot run {}: {e}", binary.display()),
        };
        let mut nginx = Nginx { child, dir, addr };

        let mut exited = None;
        let up = wait_until_async(Duration::from_secs(10), || {
            if exited.is_none() {
                exited = nginx.child.try_wait().ok().flatten();
            }
            let gone = exited.is_some();
            async move { !gone && tokio::net::TcpStream::connect(addr).await.is_ok() }
        })
        .await;
        if !up {
            panic!(
                "nginx never accepted on {addr} ({}); error.log:\n{}",
                exited.map_or("still running".to_string(), |s| format!("exited: {s}")),
                nginx.error_log()
            );
        }
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nginx error.log ----\n{}", self.error_log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/usr/sbin/nginx`, or `nginx` on `PATH`; a clear failure if neither exists.
fn nginx_binary() -> PathBuf {
    let standard = Path::new("/usr/sbin/nginx");
    if standard.is_file() {
        return standard.to_path_buf();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => p,
        None => panic!(
            "nginx is not installed (looked for /usr/sbin/nginx and nginx on PATH); \
             the ketama compatibility test needs it: run scripts/setup-tests.sh (installs nginx-light)"
        ),
    }
}

/// Foreground, single process (no user switch, nothing outlives the kill), every path in `dir`.
fn nginx_config(dir: &Path, listen: SocketAddr, servers: &[(SocketAddr, u32)]) -> String {
    let d = dir.display();
    let servers: String = servers
        .iter()
        .map(|(addr, weight)| format!("    server {addr} weight={weight};\n"))
        .collect();
    format!(
        "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream u {{
    hash $http_x_doc_id consistent;
{servers}  }}
  server {{
    listen {listen};
    location / {{ proxy_pass http://u; }}
  }}
}}
"
    )
}
