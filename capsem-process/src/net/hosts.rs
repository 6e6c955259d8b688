//! `$CAPSEM_NET_HOSTS`: a hosts file (`/etc/hosts` syntax) consulted
//! before the system resolver. Meant for tests, which need names that
//! resolve to 127.0.0.1 without editing the host's `/etc/hosts`; a name it
//! lists is never asked of the system resolver.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The environment variable naming the file.
pub const HOSTS_ENV: &str = "CAPSEM_NET_HOSTS";
/// A larger file is refused.
const MAX_HOSTS_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read {HOSTS_ENV} file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{HOSTS_ENV} file {path} is larger than {MAX_HOSTS_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{HOSTS_ENV} file {path} line {line}: {ip:?} is not an IP address")]
    Address {
        path: PathBuf,
        line: usize,
        ip: String,
    },
}

/// Names (lowercase, no trailing dot) and their addresses, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hosts(HashMap<String, Vec<IpAddr>>);

impl Hosts {
    /// From [`HOSTS_ENV`], empty when it is unset or empty.
    pub fn from_env() -> Result<Self, HostsError> {
        match std::env::var_os(HOSTS_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Self::load(Path::new(&path)),
            None => Ok(Self::default()),
        }
    }

    pub fn load(path: &Path) -> Result<Self, HostsError> {
        let read = |source| HostsError::Read {
            path: path.into(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_HOSTS_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_HOSTS_BYTES {
            return Err(HostsError::TooLarge { path: path.into() });
        }
        Self::parse(path, &text)
    }

    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, HostsError> {
        let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_ascii_whitespace();
            let Some(ip) = words.next() else { continue };
            let ip: IpAddr = ip.parse().map_err(|_| HostsError::Address {
                path: path.into(),
                line: i + 1,
                ip: ip.to_owned(),
            })?;
            for name in words {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let list = map.entry(name).or_default();
                if !list.contains(&ip) {
                    list.push(ip);
                }
            }
        }
        Ok(Self(map))
    }

    /// The addresses listed for `name`, if it is listed.
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.0.get(&name).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_syntax() {
        let text =
            "# test names\n127.0.0.1 test.capsem Other.Capsem.  # comment\n\n::1 test.capsem\n";
        let h = Hosts::parse(Path::new("h"), text).unwrap();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(h.lookup("TEST.capsem."), Some(&[v4, v6][..]));
        assert_eq!(h.lookup("other.capsem"), Some(&[v4][..]));
        assert_eq!(h.lookup("nope.capsem"), None);
        let err = Hosts::parse(Path::new("h"), "x.y.z a\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn load_bounds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "127.0.0.1 a.b\n").unwrap();
        assert!(Hosts::load(&path).unwrap().lookup("a.b").is_some());
        std::fs::write(&path, vec![b'#'; MAX_HOSTS_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            Hosts::load(&path),
            Err(HostsError::TooLarge { .. })
        ));
        assert!(matches!(
            Hosts::load(&dir.path().join("missing")),
            Err(HostsError::Read { .. })
        ));
    }
}
