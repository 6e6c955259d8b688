//! An OCI image's run settings, as capsem-init hands them over in
//! `CAPSEM_IMAGE_CONFIG` (the image's config JSON: `Env`, `WorkingDir`,
//! `User`). The image came from a registry: every field is bounded and
//! checked, and a bad one stops the agent with a clear reason rather than
//! running with half the settings.

use std::path::PathBuf;

/// The variable capsem-init sets.
pub const ENV: &str = "CAPSEM_IMAGE_CONFIG";
/// Bounds on what an image may ask for.
pub const MAX_TEXT: usize = 64 << 10;
pub const MAX_ENV: usize = 1024;
pub const MAX_PATH: usize = 4096;
pub const MAX_USER: usize = 256;

/// What the shell and every command get from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSettings {
    /// `KEY=VALUE` entries, in order (a later one replaces an earlier).
    pub env: Vec<(String, String)>,
    /// The default working directory (absolute).
    pub working_dir: Option<PathBuf>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image says.
    pub user: Option<String>,
}

/// Why the image's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    #[error("{ENV} is over {MAX_TEXT} bytes")]
    TooLarge,
    #[error("{ENV} is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("the image's {0} is not of the expected type")]
    Type(&'static str),
    #[error("the image's Env has more than {MAX_ENV} entries")]
    TooManyEnv,
    #[error("the image's Env entry {0:?} is not KEY=VALUE with a plain KEY")]
    BadEnv(String),
    #[error("the image's WorkingDir {0:?} is not an absolute path")]
    BadWorkingDir(String),
    #[error("the image's User {0:?} is not a user name or id")]
    BadUser(String),
}

/// Reads [`ENV`]; no variable is no settings.
pub fn from_env() -> Result<ImageSettings, ImageConfigError> {
    match std::env::var(ENV) {
        Ok(text) => parse(&text),
        Err(_) => Ok(ImageSettings::default()),
    }
}

/// Parses and checks the config JSON (the `Env`, `WorkingDir` and `User`
/// of an OCI image config's `config` object, or of that object itself).
pub fn parse(text: &str) -> Result<ImageSettings, ImageConfigError> {
    use serde_json::Value;
    if text.len() > MAX_TEXT {
        return Err(ImageConfigError::TooLarge);
    }
    let v: Value = serde_json::from_str(text).map_err(ImageConfigError::Json)?;
    let obj = v.as_object().ok_or(ImageConfigError::Type("config"))?;
    let string = |name: &'static str| -> Result<Option<String>, ImageConfigError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ImageConfigError::Type(name)),
        }
    };
    let mut env = Vec::new();
    match obj.get("Env") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            if items.len() > MAX_ENV {
                return Err(ImageConfigError::TooManyEnv);
            }
            for item in items {
                let s = item.as_str().ok_or(ImageConfigError::Type("Env"))?;
                env.push(env_entry(s)?);
            }
        }
        Some(_) => return Err(ImageConfigError::Type("Env")),
    }
    let working_dir = match string("WorkingDir")? {
        Some(d) if d.starts_with('/') && d.len() <= MAX_PATH && !d.contains('\0') => {
            Some(PathBuf::from(d))
        }
        Some(d) => return Err(ImageConfigError::BadWorkingDir(d)),
        None => None,
    };
    let user = match string("User")? {
        Some(u) if valid_user(&u) => Some(u),
        Some(u) => return Err(ImageConfigError::BadUser(u)),
        None => None,
    };
    Ok(ImageSettings {
        env,
        working_dir,
        user,
    })
}

/// `KEY=VALUE`: a KEY of `[A-Za-z0-9_.-]`, not starting with a digit, and
/// no NUL anywhere.
fn env_entry(s: &str) -> Result<(String, String), ImageConfigError> {
    let bad = || ImageConfigError::BadEnv(s.chars().take(80).collect());
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let key_ok = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !key_ok || v.contains('\0') || s.len() > MAX_TEXT {
        return Err(bad());
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `name`, `uid`, `name:group` or `uid:gid`, each part of
/// `[A-Za-z0-9_.-]`.
fn valid_user(u: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    };
    u.len() <= MAX_USER
        && match u.split_once(':') {
            Some((a, b)) => part(a) && part(b),
            None => part(u),
        }
}

/// Whom the shell and commands run as: the image's User, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

/// The User resolved against the guest root's `/etc/passwd` and
/// `/etc/group` (read after the root switch), with that user's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub creds: Creds,
    pub home: Option<PathBuf>,
}

/// Largest passwd or group file read.
const MAX_DB: u64 = 4 << 20;

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`) like runc: a
/// name must be in passwd (its primary group unless a group is given), a
/// bare uid not in passwd gets gid 0; a group name must be in group.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<Resolved, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entries = || {
        passwd.lines().filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7).then(|| {
                (
                    f[0],
                    f[2].parse::<u32>().ok(),
                    f[3].parse::<u32>().ok(),
                    f[5],
                )
            })
        })
    };
    let (uid, mut gid, home) = match u.parse::<u32>() {
        Ok(uid) => match entries().find(|e| e.1 == Some(uid)) {
            Some((_, _, g, h)) => (uid, g.unwrap_or(0), Some(h)),
            None => (uid, 0, None),
        },
        Err(_) => match entries().find(|e| e.0 == u) {
            Some((_, Some(uid), Some(g), h)) => (uid, g, Some(h)),
            _ => {
                return Err(format!(
                    "the image's User {user:?}: no user {u:?} in /etc/passwd"
                ))
            }
        },
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse::<u32>().ok())
                        .flatten()
                })
                .next()
                .ok_or_else(|| {
                    format!("the image's User {user:?}: no group {g:?} in /etc/group")
                })?,
        };
    }
    Ok(Resolved {
        creds: Creds { uid, gid },
        home: home.filter(|h| h.starts_with('/')).map(PathBuf::from),
    })
}

/// [`resolve_user`] against this root's files (missing files are empty).
pub fn resolve_here(user: &str) -> Result<Resolved, String> {
    let read = |p: &str| -> Result<String, String> {
        match capsem_read_bounded(p) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(format!("cannot read {p}: {e}")),
        }
    };
    resolve_user(user, &read("/etc/passwd")?, &read("/etc/group")?)
}

fn capsem_read_bounded(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_DB)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `base` with `over` applied: an entry of `over` replaces one of `base`
/// with the same name.
pub fn merge_env<K: AsRef<str>>(
    base: &mut Vec<(std::ffi::OsString, std::ffi::OsString)>,
    over: &[(K, String)],
) {
    for (k, v) in over {
        let k = k.as_ref();
        base.retain(|(name, _)| name.as_os_str() != k);
        base.push((k.into(), v.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_settings() {
        let s = parse(r#"{"Env":["PATH=/bin:/usr/bin","FOO=a=b"],"WorkingDir":"/app","User":"1000:1000","Cmd":["sh"]}"#)
            .unwrap();
        assert_eq!(
            s.env,
            [
                ("PATH".into(), "/bin:/usr/bin".into()),
                ("FOO".into(), "a=b".into())
            ]
        );
        assert_eq!(s.working_dir, Some(PathBuf::from("/app")));
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        assert_eq!(
            parse(r#"{"Env":null,"WorkingDir":""}"#).unwrap(),
            ImageSettings::default()
        );
    }

    #[test]
    fn refuses_bad_fields() {
        for bad in [
            r#"[]"#,
            r#"{"Env":"A=1"}"#,
            r#"{"Env":["NOEQUALS"]}"#,
            r#"{"Env":["=1"]}"#,
            r#"{"Env":["A B=1"]}"#,
            r#"{"Env":["A=x\u0000y"]}"#,
            r#"{"WorkingDir":"rel"}"#,
            r#"{"WorkingDir":"/a\u0000"}"#,
            r#"{"User":"a:b:c"}"#,
            r#"{"User":"../x"}"#,
            r#"{"User":5}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let many = format!(r#"{{"Env":[{}]}}"#, vec![r#""A=1""#; MAX_ENV + 1].join(","));
        assert!(matches!(parse(&many), Err(ImageConfigError::TooManyEnv)));
        let huge = format!(r#"{{"Env":["A={}"]}}"#, "x".repeat(MAX_TEXT));
        assert!(matches!(parse(&huge), Err(ImageConfigError::TooLarge)));
    }

    #[test]
    fn users_resolve_like_runc() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nbad\n";
        let group = "root:x:0:\nstaff:x:50:app\n";
        let r = |u: &str| resolve_user(u, passwd, group);
        assert_eq!(
            r("app").unwrap().creds,
            Creds {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(r("app").unwrap().home, Some(PathBuf::from("/home/app")));
        assert_eq!(
            r("1000").unwrap().creds,
            Creds {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            r("4242").unwrap(),
            Resolved {
                creds: Creds { uid: 4242, gid: 0 },
                home: None
            }
        );
        assert_eq!(r("app:staff").unwrap().creds, Creds { uid: 1000, gid: 50 });
        assert_eq!(r("5:7").unwrap().creds, Creds { uid: 5, gid: 7 });
        assert!(r("nobody").unwrap_err().contains("no user \"nobody\""));
        assert!(r("app:wheel").unwrap_err().contains("no group \"wheel\""));
    }

    #[test]
    fn later_entries_replace_earlier() {
        let mut env = vec![
            ("PATH".into(), "/x".into()),
            ("HOME".into(), "/root".into()),
        ];
        merge_env(&mut env, &[("PATH", "/y".to_owned())]);
        assert_eq!(
            env,
            [
                ("HOME".into(), "/root".into()),
                ("PATH".into(), "/y".into())
            ]
        );
    }
}
