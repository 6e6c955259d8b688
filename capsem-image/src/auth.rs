//! Registry credentials ([`Auth`]): from a Docker config file
//! (`--registry-auth FILE`, else `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`), its `auths.<registry>.auth` (base64 of
//! `user:password`) or `username`/`password` entries. Credential helpers
//! (`credsStore`, `credHelpers`) are not run.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// How to authenticate to a registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    // Never print a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
        }
    }
}

/// Where credentials come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuthSource {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; a
    /// missing file means anonymous.
    #[default]
    DockerConfig,
    /// This Docker-config-format file, which must exist.
    File(PathBuf),
    Anonymous,
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read registry credentials {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("registry credentials {path} are not a Docker config file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "registry credentials {path}: the entry for {registry} is not base64 of user:password"
    )]
    BadEntry { path: PathBuf, registry: String },
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The keys a registry may be stored under (Docker Hub's is historic).
fn keys(registry: &str) -> Vec<String> {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ],
        r => vec![r.into(), format!("https://{r}"), format!("http://{r}")],
    }
}

/// The credentials for `registry` in a Docker config's text.
pub fn from_docker_config(text: &[u8], path: &Path, registry: &str) -> Result<Auth, AuthError> {
    let cfg: DockerConfig = serde_json::from_slice(text).map_err(|source| AuthError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let Some(entry) = keys(registry)
        .iter()
        .find_map(|k| cfg.auths.get(k).or_else(|| cfg.auths.get(&format!("{k}/"))))
    else {
        return Ok(Auth::Anonymous);
    };
    let bad = || AuthError::BadEntry {
        path: path.to_owned(),
        registry: registry.to_owned(),
    };
    if let Some(b64) = entry.auth.as_deref().filter(|s| !s.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, password) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Auth::Basic {
            user: user.into(),
            password: password.into(),
        });
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Auth::Basic {
            user: u.clone(),
            password: p.clone(),
        }),
        _ => Ok(Auth::Anonymous),
    }
}

impl AuthSource {
    /// The credentials for `registry`.
    pub fn for_registry(&self, registry: &str) -> Result<Auth, AuthError> {
        let (path, required) = match self {
            AuthSource::Anonymous => return Ok(Auth::Anonymous),
            AuthSource::File(p) => (p.clone(), true),
            AuthSource::DockerConfig => {
                let dir = match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
                    Some(d) => PathBuf::from(d),
                    None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                        Some(h) => PathBuf::from(h).join(".docker"),
                        None => return Ok(Auth::Anonymous),
                    },
                };
                (dir.join("config.json"), false)
            }
        };
        match crate::digest::read_bounded(&path, 1 << 20) {
            Ok(text) => from_docker_config(&text, &path, registry),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(Auth::Anonymous),
            Err(source) => Err(AuthError::Read { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries() {
        let p = Path::new("/c.json");
        let text = br#"{"auths":{
            "127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "https://index.docker.io/v1/":{"username":"hub","password":"pw"},
            "bad.example":{"auth":"!!"}}}"#;
        assert_eq!(
            from_docker_config(text, p, "127.0.0.1:5000").unwrap(),
            Auth::Basic {
                user: "user".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(
            from_docker_config(text, p, "docker.io").unwrap(),
            Auth::Basic {
                user: "hub".into(),
                password: "pw".into()
            }
        );
        assert_eq!(
            from_docker_config(text, p, "ghcr.io").unwrap(),
            Auth::Anonymous
        );
        assert!(matches!(
            from_docker_config(text, p, "bad.example"),
            Err(AuthError::BadEntry { .. })
        ));
        assert!(matches!(
            from_docker_config(b"[", p, "x"),
            Err(AuthError::Parse { .. })
        ));
        let shown = format!(
            "{:?}",
            Auth::Basic {
                user: "u".into(),
                password: "secret".into()
            }
        );
        assert!(!shown.contains("secret"));
    }

    #[test]
    fn a_named_file_must_exist_the_default_need_not() {
        let d = tempfile::tempdir().unwrap();
        let missing = AuthSource::File(d.path().join("nope.json"));
        assert!(matches!(
            missing.for_registry("x"),
            Err(AuthError::Read { .. })
        ));
        assert_eq!(
            AuthSource::Anonymous.for_registry("x").unwrap(),
            Auth::Anonymous
        );
    }
}
