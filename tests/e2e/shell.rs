//! End-to-end, what `tether` generates from its own command-line definitions: shell
//! completions (`tether completions bash|zsh|fish`) and man pages (`tether man`).

use std::process::{Command, Output};

use crate::support::tether_binary;

fn tether(args: &[&str]) -> Output {
    let out = match Command::new(tether_binary()).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run tether {args:?}: {e}"),
    };
    assert!(
        out.status.success(),
        "tether {args:?} exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The subcommands `tether --help` lists (but `help`): read from the binary, not written here,
/// so a new subcommand is covered without touching this test.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(tether(&["--help"]).stdout).unwrap();
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    for expected in ["run", "check", "schema", "completions", "man"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    names
}

#[test]
fn completions_name_every_subcommand_and_bash_accepts_the_script() {
    let commands = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(tether(&["completions", shell]).stdout).unwrap();
        for command in &commands {
            assert!(
                script.contains(command.as_str()),
                "{shell} completion does not mention `{command}`"
            );
        }
    }
    // `bash -n` parses the script without running it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tether.bash");
    std::fs::write(&file, tether(&["completions", "bash"]).stdout).unwrap();
    let out = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the completion works: after `tether ch`, bash offers `check`.
    let probe = format!(
        "source {}; COMP_WORDS=(tether ch); COMP_CWORD=1; COMP_LINE='tether ch'; \
         COMP_POINT=9; _tether tether ch tether; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.display()
    );
    let out = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        offered.lines().any(|l| l == "check"),
        "bash completion of `tether ch` offered {offered:?} ({})",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_man_page_is_roff_with_a_name_section_and_every_subcommand() {
    let commands = subcommands();
    let page = String::from_utf8(tether(&["man"]).stdout).unwrap();
    assert!(page.contains(".TH tether 1"), "no .TH title:\n{page}");
    assert!(
        page.contains(".SH NAME\ntether \\- "),
        "no NAME section:\n{page}"
    );
    for command in &commands {
        assert!(
            page.contains(&format!("tether\\-{command}(1)")),
            "the man page does not list `{command}`"
        );
    }
    // With --out-dir, every page it lists is written.
    let dir = tempfile::tempdir().unwrap();
    tether(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    for command in &commands {
        let sub = dir.path().join(format!("tether-{command}.1"));
        let text =
            std::fs::read_to_string(&sub).unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
        assert!(
            text.contains(".SH NAME"),
            "{}: no NAME section",
            sub.display()
        );
    }
}
