//! The escapes are documented where a user looks first: `capsem --help`
//! and `capsem shell --help`.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_capsem"))
        .args(args)
        .output()
        .expect("run capsem");
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn help_documents_the_escapes() {
    let text = help(&["--help"]);
    let escapes = text
        .split("Escapes")
        .nth(1)
        .unwrap_or_else(|| panic!("no Escapes section: {text}"));
    for needle in [
        "~.",
        "exit 255",
        "keeps running",
        "~?",
        "~~",
        "start of a line",
    ] {
        assert!(escapes.contains(needle), "{needle:?} missing: {escapes}");
    }
}

#[test]
fn shell_help_names_the_escape() {
    let text = help(&["shell", "--help"]);
    assert!(text.contains("`~.` at the start of a line"), "{text}");
    assert!(text.contains("exits 255"), "{text}");
}
