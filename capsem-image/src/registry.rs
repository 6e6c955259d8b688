//! Talking to a registry ([`Remote`]), with the `oci-client` crate on a
//! current-thread tokio runtime owned here: the manifest (an index is
//! resolved to linux/amd64), then blobs into files. Every document and
//! blob is checked against its digest (and size) before it is used.
//! HTTPS, except plain HTTP for a loopback registry.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::auth::Auth;
use crate::digest::{Digest, Hasher};
use crate::manifest::{self, Descriptor, Manifest, ManifestError, Parsed, ACCEPTED_MANIFESTS};
use crate::progress::Progress;

/// How long to wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a read may stall.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot start the network runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach registry {registry}")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{reference}: not found in the registry")]
    NotFound {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{reference}: not authorized (credentials: --registry-auth FILE, else $DOCKER_CONFIG/config.json or ~/.docker/config.json)")]
    Unauthorized {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{reference}: registry error")]
    Other {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: larger than {max} bytes")]
    TooLarge { what: String, max: u64 },
    #[error("{reference}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot write {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One registry reference, ready to fetch.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("reference", &self.reference.whole())
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub fn new(reference: Reference, auth: &Auth) -> Result<Self, RegistryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("capsem-image-net")
            .build()
            .map_err(RegistryError::Runtime)?;
        // reqwest is built without a default crypto provider; a second
        // install (another Remote) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = reference.resolve_registry().to_owned();
        let protocol = if crate::reference::is_loopback(&registry) {
            ClientProtocol::HttpsExcept(vec![registry])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        });
        let auth = match auth {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { user, password } => RegistryAuth::Basic(user.clone(), password.clone()),
        };
        Ok(Self {
            rt,
            client,
            reference,
            auth,
        })
    }

    fn classify(&self, source: OciDistributionError) -> RegistryError {
        let reference = self.reference.whole();
        let not_found = matches!(&source, OciDistributionError::ImageManifestNotFoundError(_))
            || matches!(&source, OciDistributionError::ServerError { code: 404, .. })
            || matches!(&source, OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| matches!(e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
                    | oci_client::errors::OciErrorCode::BlobUnknown
                    | oci_client::errors::OciErrorCode::NotFound)));
        match &source {
            _ if not_found => RegistryError::NotFound { reference, source },
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                RegistryError::Unreachable {
                    registry: self.reference.resolve_registry().to_owned(),
                    source,
                }
            }
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => {
                RegistryError::Unauthorized { reference, source }
            }
            _ => RegistryError::Other { reference, source },
        }
    }

    fn raw_manifest(&self, r: &Reference) -> Result<Vec<u8>, RegistryError> {
        let (bytes, _) = self
            .rt
            .block_on(
                self.client
                    .pull_manifest_raw(r, &self.auth, &ACCEPTED_MANIFESTS),
            )
            .map_err(|e| self.classify(e))?;
        if bytes.len() as u64 > manifest::MAX_DOCUMENT {
            return Err(RegistryError::TooLarge {
                what: format!("{} manifest", r.whole()),
                max: manifest::MAX_DOCUMENT,
            });
        }
        Ok(bytes.to_vec())
    }

    /// The image manifest for linux/amd64: its digest (checked against the
    /// reference's, or the index entry's), its bytes and its parsed form.
    pub fn manifest(&self) -> Result<(Digest, Vec<u8>, Manifest), RegistryError> {
        let bad = |source| RegistryError::Manifest {
            reference: self.reference.whole(),
            source,
        };
        let bytes = self.raw_manifest(&self.reference)?;
        let digest = Digest::of(&bytes);
        if let Some(want) = self.reference.digest() {
            check(want, &digest, "the manifest")?;
        }
        match manifest::parse(&bytes).map_err(bad)? {
            Parsed::Image(m) => Ok((digest, bytes, m)),
            Parsed::Index(list) => {
                let entry = manifest::choose_platform(&list).map_err(bad)?;
                let r = self.reference.clone_with_digest(entry.digest.clone());
                let bytes = self.raw_manifest(&r)?;
                let digest = Digest::of(&bytes);
                check(&entry.digest, &digest, "the platform manifest")?;
                match manifest::parse(&bytes).map_err(bad)? {
                    Parsed::Image(m) => Ok((digest, bytes, m)),
                    Parsed::Index(_) => Err(bad(ManifestError::UnsupportedMediaType(
                        "an index inside an index".into(),
                    ))),
                }
            }
        }
    }

    /// A blob of at most `max` bytes, in memory, checked.
    pub fn small_blob(&self, desc: &Descriptor, max: u64) -> Result<Vec<u8>, RegistryError> {
        if desc.size > max {
            return Err(RegistryError::TooLarge {
                what: desc.digest.clone(),
                max,
            });
        }
        let mut out = Hasher::new(Vec::new());
        self.blob(
            desc,
            &mut out,
            &mut crate::progress::Quiet,
            Path::new("(memory)"),
        )?;
        finish(desc, out).map(|v| v.0)
    }

    /// A blob into a new file at `path`, checked; progress gets the bytes.
    pub fn blob_to_file(
        &self,
        desc: &Descriptor,
        path: &Path,
        progress: &mut dyn Progress,
    ) -> Result<(), RegistryError> {
        let write_err = |source| RegistryError::Write {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::create_new(path).map_err(write_err)?;
        let mut out = Hasher::new(std::io::BufWriter::new(file));
        self.blob(desc, &mut out, progress, path)?;
        let (w, _) = finish(desc, out)?;
        w.into_inner()
            .map_err(|e| write_err(e.into_error()))?
            .sync_all()
            .map_err(write_err)
    }

    fn blob<W: Write>(
        &self,
        desc: &Descriptor,
        out: &mut Hasher<W>,
        progress: &mut dyn Progress,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let oci = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        self.rt.block_on(async {
            let mut stream = self
                .client
                .pull_blob_stream(&self.reference, &oci)
                .await
                .map_err(|e| self.classify(e))?;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    // oci-client's own check failed: ours, in `finish`,
                    // says which digest the bytes really have.
                    Err(e) if is_digest_error(&e) => break,
                    Err(e) => return Err(self.classify(OciDistributionError::IoError(e))),
                };
                // Never more than the manifest said (a flood is cut short).
                if out_len(out) + chunk.len() as u64 > desc.size {
                    return Err(RegistryError::SizeMismatch {
                        what: desc.digest.clone(),
                        expected: desc.size,
                        actual: out_len(out) + chunk.len() as u64,
                    });
                }
                out.write_all(&chunk)
                    .map_err(|source| RegistryError::Write {
                        path: path.to_owned(),
                        source,
                    })?;
                progress.bytes(chunk.len() as u64);
            }
            Ok(())
        })
    }
}

fn out_len<W>(h: &Hasher<W>) -> u64 {
    h.written()
}

fn is_digest_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

fn check(want: &str, got: &Digest, what: &str) -> Result<(), RegistryError> {
    if want != got.as_str() {
        return Err(RegistryError::DigestMismatch {
            what: what.into(),
            expected: want.into(),
            actual: got.to_string(),
        });
    }
    Ok(())
}

/// Checks a blob's digest and size; returns what it was written to.
fn finish<W>(desc: &Descriptor, out: Hasher<W>) -> Result<(W, u64), RegistryError> {
    let (digest, len, w) = out.finish();
    check(&desc.digest, &digest, &format!("blob {}", desc.digest))?;
    if len != desc.size {
        return Err(RegistryError::SizeMismatch {
            what: desc.digest.clone(),
            expected: desc.size,
            actual: len,
        });
    }
    Ok((w, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: manifest::OCI_LAYER_TAR.into(),
            digest: Digest::of(data).to_string(),
            size: data.len() as u64,
            platform: None,
            annotations: Default::default(),
        }
    }

    #[test]
    fn blobs_are_checked_for_digest_and_size() {
        let d = desc(b"layer");
        let mut h = Hasher::new(Vec::new());
        h.write_all(b"layer").unwrap();
        assert_eq!(finish(&d, h).unwrap().0, b"layer");
        let mut h = Hasher::new(Vec::new());
        h.write_all(b"LAYER").unwrap();
        let err = finish(&d, h).unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let short = Descriptor {
            size: 9,
            ..desc(b"layer")
        };
        let mut h = Hasher::new(Vec::new());
        h.write_all(b"layer").unwrap();
        assert!(matches!(
            finish(&short, h),
            Err(RegistryError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn oci_clients_digest_errors_are_recognized() {
        let e = std::io::Error::other(oci_client::errors::DigestError::VerificationError {
            expected: "a".into(),
            actual: "b".into(),
        });
        assert!(is_digest_error(&e));
        assert!(!is_digest_error(&std::io::Error::other("reset")));
    }
}
