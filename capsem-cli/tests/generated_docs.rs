//! `capsem completions SHELL` and `capsem man` come from the clap
//! definitions: each names every subcommand that `capsem --help` lists.

use std::process::Command;

/// Every subcommand, as documented in README.md's usage block.
const SUBCOMMANDS: &[&str] = &[
    "shell",
    "create",
    "list",
    "inspect",
    "stop",
    "start",
    "rm",
    "logs",
    "run",
    "exec",
    "cp",
    "diff",
    "audit",
    "doctor",
    "completions",
    "man",
    "image",
];

fn capsem(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_capsem"))
        .args(args)
        .env_remove("CAPSEM_HOME")
        .output()
        .expect("run capsem");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The names under `Commands:` in `capsem --help`.
fn listed_in_help() -> Vec<String> {
    let help = capsem(&["--help"]);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|name| name != "help")
        .collect()
}

#[test]
fn help_lists_exactly_the_known_subcommands() {
    assert_eq!(listed_in_help(), SUBCOMMANDS);
}

#[test]
fn bash_completions_mention_every_subcommand() {
    let script = capsem(&["completions", "bash"]);
    assert!(script.contains("complete -F _capsem"), "{script}");
    for name in SUBCOMMANDS {
        // The word list offered after `capsem `, and a case of its own.
        assert!(
            script.contains(&format!("capsem,{name})"))
                || script.contains(&format!("capsem__{name}")),
            "{name} missing from the bash completions"
        );
    }
    let words = script
        .lines()
        .find(|l| l.contains("opts=\"") && l.contains("shell create"))
        .expect("the top-level word list");
    for name in SUBCOMMANDS {
        assert!(
            words.split(['"', ' ']).any(|w| w == *name),
            "{name} not offered after `capsem `: {words}"
        );
    }
}

#[test]
fn other_shells_get_scripts_and_a_bad_shell_is_a_usage_error() {
    for shell in ["zsh", "fish"] {
        let script = capsem(&["completions", shell]);
        for name in SUBCOMMANDS {
            assert!(script.contains(name), "{name} missing for {shell}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_capsem"))
        .args(["completions", "nosh"])
        .output()
        .expect("run capsem");
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn the_man_page_contains_every_subcommand_name() {
    let page = capsem(&["man"]);
    assert!(page.contains(".TH capsem 1"), "{page}");
    for name in SUBCOMMANDS {
        // roff escapes '-': capsem\-NAME(1) in SUBCOMMANDS.
        assert!(
            page.contains(&format!("capsem\\-{name}(1)")),
            "{name} missing from the man page"
        );
    }
}
