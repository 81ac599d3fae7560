//! End-to-end, the container recipe (`Dockerfile`) against the repository. No container tool
//! runs here, so the image is never built; what can drift is checked instead: every file it
//! copies exists and is not excluded by `.dockerignore`, the build copies every workspace
//! member, installs what `scripts/setup.sh` installs and builds the binary it later copies, the
//! config it ships passes `tether check` and sits where its command reads it, the command and
//! the Kubernetes manifests' commands are real subcommands, and the health check is a real
//! admin route on the shipped config's admin port, probed by a real `tether probe`.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::tether_binary;
use tether_testkit::{free_addr, TetherProcess};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One instruction: the keyword upper-cased and the rest, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    rest: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if line.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    rest: rest.trim().to_string(),
                });
                current.clear();
            }
        }
    }
    out
}

/// A JSON-array (exec form) argument list.
fn exec_form(text: &str) -> Vec<String> {
    match serde_json::from_str::<Vec<String>>(text) {
        Ok(args) => args,
        Err(e) => panic!("not an exec-form list ({e}): {text}"),
    }
}

fn tether(args: &[&str]) -> Output {
    match Command::new(tether_binary()).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run tether {args:?}: {e}"),
    }
}

fn assert_subcommand(name: &str, whose: &str) {
    let out = tether(&[name, "--help"]);
    assert!(
        out.status.success(),
        "{whose}: `{name}` is not a tether subcommand: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_matches_the_repository() {
    let dockerfile = instructions(&read("Dockerfile"));
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&Instruction> = dockerfile.iter().filter(|i| i.keyword == "FROM").collect();
    assert_eq!(froms.len(), 2, "a build stage and a run stage");
    assert!(
        froms[0].rest.starts_with("rust:"),
        "build stage: {}",
        froms[0].rest
    );
    assert!(froms[0].rest.ends_with(" AS build"), "{}", froms[0].rest);
    assert!(froms[1].rest.starts_with("debian:") && froms[1].rest.contains("slim"));

    // Every COPY from the build context names files that exist and are sent.
    let mut copied = Vec::new(); // (source, destination) from the context
    let mut workdir = String::from("/");
    let mut binary_built = None;
    for i in &dockerfile {
        match i.keyword.as_str() {
            "WORKDIR" => workdir = i.rest.clone(),
            "RUN" if i.rest.contains("cargo build") => {
                assert!(
                    i.rest.contains("--release") && i.rest.contains("--locked"),
                    "{}",
                    i.rest
                );
                let bin = i
                    .rest
                    .split("--bin ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next());
                binary_built = Some(format!(
                    "{workdir}/target/release/{}",
                    bin.unwrap_or("tether")
                ));
            }
            "COPY" if i.rest.starts_with("--from=build ") => {
                let mut parts = i.rest.split_whitespace().skip(1);
                let source = parts.next().unwrap();
                assert_eq!(
                    Some(source.to_string()),
                    binary_built,
                    "the run stage copies what was built"
                );
            }
            "COPY" => {
                let words: Vec<&str> = i.rest.split_whitespace().collect();
                let (sources, destination) = words.split_at(words.len() - 1);
                for source in sources {
                    let source = source.trim_end_matches('/').trim_start_matches("./");
                    assert!(
                        repo().join(source).exists(),
                        "COPY {source}: not in the repository"
                    );
                    assert!(
                        !ignored
                            .iter()
                            .any(|ig| source == ig || source.starts_with(&format!("{ig}/"))),
                        "COPY {source}: excluded by .dockerignore"
                    );
                    copied.push((source.to_string(), destination[0].to_string()));
                }
            }
            _ => {}
        }
    }
    assert!(binary_built.is_some(), "no cargo build step");

    // The build sees the whole workspace: every member is under a copied directory.
    let manifest = read("Cargo.toml");
    let members = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    for member in members.split('"').skip(1).step_by(2) {
        assert!(
            copied
                .iter()
                .any(|(s, _)| member == s || member.starts_with(&format!("{s}/"))),
            "workspace member {member} is not copied into the build stage"
        );
    }

    // The build stage installs what scripts/setup.sh installs for the build.
    let setup = read("scripts/setup.sh");
    let run_apt = dockerfile
        .iter()
        .find(|i| i.keyword == "RUN" && i.rest.contains("apt-get install"))
        .expect("an apt-get install step");
    let install = run_apt.rest.split("apt-get install").nth(1).unwrap();
    let packages: Vec<&str> = install
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(packages, ["cmake"], "the build stage installs {packages:?}");
    for p in &packages {
        assert!(
            setup.contains(&format!("install -y -qq {p}")),
            "scripts/setup.sh does not install {p}"
        );
    }

    // The command: ENTRYPOINT tether + CMD run -c <the copied config>.
    let last = |k: &str| {
        dockerfile
            .iter()
            .rev()
            .find(|i| i.keyword == k)
            .map(|i| exec_form(&i.rest))
    };
    let entrypoint = last("ENTRYPOINT").expect("ENTRYPOINT");
    let cmd = last("CMD").expect("CMD");
    assert_eq!(entrypoint, ["tether"]);
    assert_eq!(cmd[0], "run");
    assert_subcommand(&cmd[0], "CMD");
    let config_path = &cmd[cmd.iter().position(|a| a == "-c").expect("-c") + 1];
    // Where each copied file lands in the image: into a directory (`dest/`) or as `dest`.
    let in_image = |(source, dest): &(String, String)| match dest.strip_suffix('/') {
        Some(dir) => format!(
            "{dir}/{}",
            Path::new(source).file_name().unwrap().to_str().unwrap()
        ),
        None => dest.clone(),
    };
    let shipped = copied
        .iter()
        .find(|c| &in_image(c) == config_path)
        .unwrap_or_else(|| panic!("nothing is copied to {config_path}"));
    let out = tether(&["check", "-c", repo().join(&shipped.0).to_str().unwrap()]);
    assert!(
        out.status.success(),
        "tether check -c {}: {}",
        shipped.0,
        String::from_utf8_lossy(&out.stderr)
    );

    // A non-root user runs it.
    let user = dockerfile
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("USER");
    assert!(user.rest != "root" && user.rest != "0", "runs as root");

    // The health check probes the shipped config's admin port at a path served without a token.
    let health = dockerfile
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    let probe = exec_form(health.rest.split_once("CMD ").expect("HEALTHCHECK CMD").1);
    assert_eq!(probe[..2], ["tether", "probe"]);
    assert_subcommand("probe", "HEALTHCHECK");
    let url = &probe[2];
    let shipped_config = read(&shipped.0);
    let admin = shipped_config
        .lines()
        .skip_while(|l| !l.starts_with("admin:"))
        .find_map(|l| l.trim().strip_prefix("address: "))
        .expect("admin.address in the shipped config");
    let port = admin.rsplit(':').next().unwrap();
    assert_eq!(
        url,
        &format!("http://127.0.0.1:{port}/healthz"),
        "HEALTHCHECK url"
    );
}

/// What the HEALTHCHECK runs, run here: `tether probe` on its path, against a tether running
/// the shipped config (its addresses moved to free ports), exits 0; on a path the admin
/// listener does not serve, or a port where nothing listens, 1.
#[tokio::test]
async fn the_health_check_probe_passes_on_a_running_tether_and_fails_without_one() {
    let (proxy, admin) = (free_addr(), free_addr());
    let config = read("conf/tether.yaml")
        .replace("127.0.0.1:8080", &proxy.to_string())
        .replace("127.0.0.1:9901", &admin.to_string());
    let tether_process = match TetherProcess::start(tether_binary(), &config, admin).await {
        Ok(t) => t,
        Err(e) => panic!("tether did not start with conf/tether.yaml: {e}"),
    };
    let health = instructions(&read("Dockerfile"))
        .into_iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    let probe = exec_form(health.rest.split_once("CMD ").expect("HEALTHCHECK CMD").1);
    let path = probe[2]
        .splitn(4, '/')
        .nth(3)
        .expect("a path in the probe URL");
    let url = tether_process.admin_url(&format!("/{path}"));
    let out = tether(&["probe", &url]);
    assert!(
        out.status.success(),
        "probe {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A path the admin listener does not serve is not healthy.
    let out = tether(&["probe", &tether_process.admin_url("/nothing-here")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "probe of an unknown path passed"
    );
    drop(tether_process);
    let out = tether(&[
        "probe",
        "--timeout",
        "1s",
        &format!("http://{}/healthz", free_addr()),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "probe with nothing listening passed"
    );
}

/// Every container of the Kubernetes manifests that runs the image runs a real subcommand, and
/// the proxy's reads its config from where the ConfigMap is mounted.
#[test]
fn the_kubernetes_manifests_run_the_image_with_real_subcommands() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"tether\"]"));
    for file in [
        "deploy/kubernetes/tether.yaml",
        "deploy/kubernetes/app-with-announce.yaml",
    ] {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        let mut found = 0;
        for (i, line) in lines.iter().enumerate() {
            if !line.trim_start().starts_with("image: tether:latest") {
                continue;
            }
            found += 1;
            let indent = |l: &str| l.len() - l.trim_start().len();
            let rest = &lines[i + 1..];
            // The container's own fields are indented as deep as `image:`.
            let args = rest
                .iter()
                .take_while(|l| indent(l) >= indent(line))
                .position(|l| indent(l) == indent(line) && l.trim_start().starts_with("args:"))
                .unwrap_or_else(|| panic!("{file}: no args after line {}", i + 1));
            let args_line = rest[args]
                .trim_start()
                .strip_prefix("args:")
                .unwrap()
                .trim();
            let first = if let Some(list) = args_line.strip_prefix('[') {
                list.split(',').next().unwrap().trim().to_string()
            } else {
                let item = rest[args + 1].trim_start();
                item.strip_prefix("- ").unwrap().trim().to_string()
            };
            assert_subcommand(&first, file);
            if first == "run" {
                assert!(
                    args_line.contains("/etc/tether/tether.yaml"),
                    "{file}: {args_line}"
                );
                assert!(
                    text.contains("mountPath: /etc/tether }"),
                    "{file}: config not mounted"
                );
            }
        }
        assert!(found > 0, "{file}: no container runs tether:latest");
    }
}
