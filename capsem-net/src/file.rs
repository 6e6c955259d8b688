//! `--net-policy FILE`: the same policy as `--net`, for lists too long for
//! a command line. TOML (`.toml`, or anything not starting with `{`) or
//! JSON (`.json`, or a leading `{`):
//!
//! ```toml
//! open = false                       # optional; `--net open`
//! allow = ["pypi.org", "*.pythonhosted.org:443", "127.0.0.1:8080"]
//! ```
//!
//! Unknown keys are errors (a misspelt `alow` must not silently mean
//! "deny everything").

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::Policy;
use crate::rule::RuleError;

/// A policy file larger than this is refused before it is parsed.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("--net-policy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--net-policy {path}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("--net-policy {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("--net-policy {path}: rule {rule:?}: {source}")]
    Rule {
        path: PathBuf,
        rule: String,
        #[source]
        source: RuleError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spelling {
    #[serde(default)]
    open: bool,
    #[serde(default)]
    allow: Vec<String>,
}

/// Parses a policy file's text; `path` names it in errors and picks the
/// format by extension.
pub fn parse(path: &Path, text: &str) -> Result<Policy, FileError> {
    let json = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => true,
        Some("toml") => false,
        _ => text.trim_start().starts_with('{'),
    };
    let syntax = |message: String| FileError::Syntax {
        path: path.to_owned(),
        message,
    };
    let spelling: Spelling = if json {
        serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?
    } else {
        toml::from_str(text).map_err(|e| syntax(e.message().to_owned()))?
    };
    let mut policy = Policy {
        open: spelling.open,
        rules: Vec::with_capacity(spelling.allow.len()),
    };
    for raw in spelling.allow {
        let rule = raw.parse().map_err(|source| FileError::Rule {
            path: path.to_owned(),
            rule: raw.clone(),
            source,
        })?;
        policy.rules.push(rule);
    }
    Ok(policy)
}

/// Reads and parses `path` (at most [`MAX_FILE_BYTES`]).
pub fn load(path: &Path) -> Result<Policy, FileError> {
    let read = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(path, &text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_say_the_same_thing() {
        let t = parse(
            Path::new("p.toml"),
            "allow = [\"pypi.org\", \"*.pythonhosted.org:443\"]\n",
        )
        .unwrap();
        let j = parse(
            Path::new("p.json"),
            r#"{"allow": ["pypi.org", "*.pythonhosted.org:443"]}"#,
        )
        .unwrap();
        assert_eq!(t, j);
        assert_eq!(t.describe(), "allow=pypi.org,*.pythonhosted.org:443");
        let sniffed = parse(Path::new("policy"), r#" {"open": true}"#).unwrap();
        assert!(sniffed.open && sniffed.rules.is_empty());
        assert!(parse(Path::new("policy"), "open = true").unwrap().open);
        assert!(parse(Path::new("empty.toml"), "").unwrap().is_none());
    }

    #[test]
    fn mistakes_are_one_line_naming_the_file() {
        let e = parse(Path::new("p.toml"), "alow = [\"pypi.org\"]").unwrap_err();
        assert!(matches!(e, FileError::Syntax { .. }), "{e}");
        assert!(e.to_string().starts_with("--net-policy p.toml: "), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = parse(Path::new("p.json"), r#"{"allow": ["bad name"]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net-policy p.json: rule \"bad name\": bad host name \"bad name\""
        );
        let e = parse(Path::new("p.json"), "{").unwrap_err();
        assert!(matches!(e, FileError::Syntax { .. }));
        let e = parse(Path::new("p.toml"), "allow = \"pypi.org\"").unwrap_err();
        assert!(matches!(e, FileError::Syntax { .. }));
    }

    #[test]
    fn load_reads_bounded_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("p.toml");
        std::fs::write(&ok, "allow = [\"127.0.0.1:8080\"]").unwrap();
        assert_eq!(load(&ok).unwrap().rules.len(), 1);
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(load(&big), Err(FileError::TooLarge { .. })));
        let missing = dir.path().join("missing.toml");
        assert!(matches!(load(&missing), Err(FileError::Read { .. })));
    }
}
