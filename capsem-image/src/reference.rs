//! Image references as the command line gives them ([`ImageRef`]): a
//! registry reference (`python:3.12-slim`, `docker.io/library/python:3.12-slim`,
//! `127.0.0.1:5000/team/tool:1.0`, `repo@sha256:...`), normalized the way
//! Docker does, or `@sha256:...` for an image already in the cache.

use crate::digest::{BadDigest, Digest};

pub use oci_client::Reference;

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A cached image by its manifest digest (`@sha256:...`).
    Local(Digest),
    /// An image in a registry; its normalized text ([`ImageRef::name`]) is
    /// what the cache records.
    Remote(Reference),
}

/// A reference that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error("invalid image reference {reference:?}")]
    Invalid {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error(transparent)]
    Digest(#[from] BadDigest),
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, RefError> {
        if let Some(d) = s.strip_prefix('@') {
            return Ok(ImageRef::Local(Digest::parse(d)?));
        }
        if s.starts_with("sha256:") {
            return Ok(ImageRef::Local(Digest::parse(s)?));
        }
        let r: Reference = s.parse().map_err(|source| RefError::Invalid {
            reference: s.chars().take(200).collect(),
            source,
        })?;
        let r = if r.tag().is_none() && r.digest().is_none() {
            Reference::with_tag(r.registry().into(), r.repository().into(), "latest".into())
        } else {
            r
        };
        if let Some(d) = r.digest() {
            Digest::parse(d)?;
        }
        Ok(ImageRef::Remote(r))
    }

    /// The normalized text: `docker.io/library/python:3.12-slim`, or `@sha256:...`.
    pub fn name(&self) -> String {
        match self {
            ImageRef::Local(d) => format!("@{d}"),
            ImageRef::Remote(r) => r.whole(),
        }
    }
}

/// Whether a registry (`host[:port]`) is on this machine, the only case
/// where plain HTTP is used.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        let n = |s: &str| ImageRef::parse(s).unwrap().name();
        assert_eq!(n("python:3.12-slim"), "docker.io/library/python:3.12-slim");
        assert_eq!(
            n("docker.io/library/python:3.12-slim"),
            "docker.io/library/python:3.12-slim"
        );
        assert_eq!(
            n("127.0.0.1:5000/team/tool:1.0"),
            "127.0.0.1:5000/team/tool:1.0"
        );
        assert_eq!(
            n("127.0.0.1:5000/team/tool"),
            "127.0.0.1:5000/team/tool:latest"
        );
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(n(&format!("@{d}")), format!("@{d}"));
        assert!(matches!(
            ImageRef::parse(&format!("@{d}")).unwrap(),
            ImageRef::Local(_)
        ));
        assert!(matches!(
            ImageRef::parse(&format!("x/y@{d}")).unwrap(),
            ImageRef::Remote(_)
        ));
        assert!(ImageRef::parse("@sha256:abc").is_err());
        assert!(ImageRef::parse("has space:1").is_err());
    }

    #[test]
    fn loopback_registries() {
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "10.0.0.1:5000",
            "ghcr.io",
            "[fe80::1]:5000",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
