//! The crate's one public error, [`ImageError`]: every cause kept as a
//! `#[source]`, so the CLI prints it as one line.

use std::io;
use std::path::PathBuf;

use crate::auth::AuthError;
use crate::layers::LayerError;
use crate::manifest::ManifestError;
use crate::reference::RefError;
use crate::registry::RegistryError;
use crate::rootfs::RootfsError;

/// Why an image could not be pulled, imported, listed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] RefError),
    #[error("no image {0} in the cache (see capsem image ls)")]
    NotCached(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{what}")]
    Manifest {
        what: String,
        #[source]
        source: ManifestError,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("layer {index} ({digest})")]
    Layer {
        index: usize,
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error("cannot make the root filesystem")]
    Rootfs(#[source] RootfsError),
    #[error("{path}: {why}")]
    BadArchive { path: PathBuf, why: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// `ImageError::Io` with a description.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}
