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
