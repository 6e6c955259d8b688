//! The `capsem doctor` report: one [`Check`] per line, on stdout:
//!
//! ```text
//! <status>  <what>: <detail>
//!   fix: <command>
//! ```
//!
//! `<status>` is `ok`, `warn` or `missing`, left-aligned in 7 columns, then
//! two spaces. A `  fix: <command>` line follows every `missing` line, and a
//! `warn` line when there is a command that would change it. Exit status: 0
//! when nothing is `missing`, 1 otherwise. The checks themselves are in
//! [`crate::checks`].

use std::path::Path;

use crate::exit::Exit;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, or is not needed for the chosen backend, but worth knowing.
    Warn,
    Missing,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Missing => "missing",
        }
    }
}

/// One line of the report (plus its fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub what: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    pub fn new(status: Status, what: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            what,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// Not needed by the chosen backend: `missing` reads as `warn`.
    pub fn informational(mut self, yes: bool) -> Self {
        if yes && self.status == Status::Missing {
            self.status = Status::Warn;
        }
        self
    }

    /// `<status>  <what>: <detail>\n[  fix: <command>\n]`, each line free
    /// of control characters.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<7}  {}: {}\n",
            self.status.label(),
            self.what,
            one_line(&self.detail)
        );
        if let Some(fix) = &self.fix {
            out.push_str(&format!("  fix: {}\n", one_line(fix)));
        }
        out
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// 0 when nothing is missing, else [`Exit::DoctorMissing`] (1).
pub fn exit_code(checks: &[Check]) -> Exit {
    if checks.iter().any(|c| c.status == Status::Missing) {
        Exit::DoctorMissing
    } else {
        Exit::OK
    }
}

/// `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command that puts binary `pkg` at `path`: a plain `cargo build`
/// when `path` is in cargo's own `debug`/`release` directory,
/// `scripts/install.sh PREFIX` for `PREFIX/bin/<pkg>`, else a release build
/// installed there (run from the capsem repository).
pub fn build_fix(pkg: &str, path: &Path) -> String {
    let parent = path.parent();
    let dir = parent.and_then(Path::file_name);
    let named_pkg = path.file_name().is_some_and(|n| n == pkg);
    let prefix = parent
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty());
    match (dir.and_then(|d| d.to_str()), prefix) {
        (Some("debug"), _) if named_pkg => format!("cargo build -p {pkg}"),
        (Some("release"), _) if named_pkg => format!("cargo build --release -p {pkg}"),
        (Some("bin"), Some(prefix)) if named_pkg => format!(
            "scripts/install.sh {}",
            shell_quote(&prefix.display().to_string())
        ),
        _ => format!(
            "cargo build --release -p {pkg} && install -m 0755 target/release/{pkg} {}",
            shell_quote(&path.display().to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::QEMU_FIX;

    #[test]
    fn line_format() {
        let c = Check::new(Status::Missing, "qemu", "x\ny").fix(QEMU_FIX);
        assert_eq!(
            c.render(),
            "missing  qemu: x y\n  fix: sudo apt-get install qemu-system-x86\n"
        );
        assert_eq!(
            Check::new(Status::Ok, "home", "/h is writable").render(),
            "ok       home: /h is writable\n"
        );
        assert_eq!(
            Check::new(Status::Warn, "accelerator", "tcg").render(),
            "warn     accelerator: tcg\n"
        );
    }

    #[test]
    fn exit_code_is_1_only_when_something_is_missing() {
        let ok = Check::new(Status::Ok, "a", "");
        let warn = Check::new(Status::Warn, "b", "");
        let missing = Check::new(Status::Missing, "c", "");
        assert_eq!(exit_code(&[ok.clone(), warn.clone()]).code(), 0);
        assert_eq!(exit_code(&[ok, warn, missing.clone()]).code(), 1);
        assert_eq!(exit_code(&[missing.informational(true)]).code(), 0);
    }

    #[test]
    fn quoting_and_build_fixes() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            build_fix(
                "capsem-process",
                Path::new("/r/target/debug/capsem-process")
            ),
            "cargo build -p capsem-process"
        );
        assert_eq!(
            build_fix("capsem-agent", Path::new("/r/target/release/capsem-agent")),
            "cargo build --release -p capsem-agent"
        );
        assert_eq!(
            build_fix("capsem-agent", Path::new("/usr/local/bin/capsem-agent")),
            "scripts/install.sh /usr/local"
        );
        assert_eq!(
            build_fix("capsem-agent", Path::new("/opt/x/capsem-agent")),
            "cargo build --release -p capsem-agent && \
             install -m 0755 target/release/capsem-agent /opt/x/capsem-agent"
        );
    }
}
