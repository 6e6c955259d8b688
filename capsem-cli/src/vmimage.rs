//! A VM's OCI image: `--image REF` resolved for a new VM (cached, else
//! pulled, like `docker run`) and recorded in `vm.json` as reference and
//! digest; at every later boot the recorded digest is looked up in the
//! cache. The image's `rootfs.erofs` replaces the default image's root
//! disk (kernel and initramfs stay the default image's) and its
//! `config.json` (Env, WorkingDir, User, Entrypoint, Cmd) goes to the guest.

use std::path::Path;

use capsem_host::vmstate::{VmConfig, VmImage};
use capsem_image::{AuthSource, CachedImage, Digest, ImageError, Store};

use crate::cli::{NewVmArgs, Vmm};
use crate::pullbar::PullBar;

/// Why a VM's image is not available.
#[derive(Debug, thiserror::Error)]
pub enum VmImageError {
    #[error("--image needs a VM: --vmm none runs the default guest on this host")]
    NeedsVm,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "the VM's image {reference} ({digest}) is no longer cached: capsem image pull {reference}"
    )]
    Gone { reference: String, digest: String },
    #[error("vm.json records an invalid image digest {0:?}")]
    BadDigest(String),
}

/// An image chosen for a VM: what `vm.json` records, and the cache entry.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub record: VmImage,
    pub cached: CachedImage,
}

/// `--image` of a new VM: `None` without it; refused for `--vmm none`.
pub fn resolve_new(home: &Path, new: &NewVmArgs, vmm: Vmm) -> Result<Option<Chosen>, VmImageError> {
    let Some(reference) = new.image.as_deref() else {
        return Ok(None);
    };
    if vmm == Vmm::None {
        return Err(VmImageError::NeedsVm);
    }
    let store = Store::open(home)?;
    let auth = new
        .registry_auth
        .clone()
        .map_or(AuthSource::DockerConfig, AuthSource::File);
    let cached = store.resolve_or_pull(reference, &auth, &mut PullBar::new())?;
    Ok(Some(Chosen {
        record: VmImage {
            reference: reference.to_owned(),
            digest: cached.digest.to_string(),
        },
        cached,
    }))
}

/// The image `vm.json` records, from the cache; `None` for the default.
pub fn recorded(home: &Path, config: &VmConfig) -> Result<Option<CachedImage>, VmImageError> {
    let Some(record) = &config.image else {
        return Ok(None);
    };
    let digest = Digest::parse(&record.digest)
        .map_err(|_| VmImageError::BadDigest(record.digest.clone()))?;
    Store::open(home)?
        .get(&digest)?
        .map(Some)
        .ok_or_else(|| VmImageError::Gone {
            reference: record.reference.clone(),
            digest: record.digest.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_image_is_the_default_and_none_refuses_one() {
        let home = tempfile::tempdir().unwrap();
        let none = NewVmArgs::default();
        assert!(resolve_new(home.path(), &none, Vmm::None)
            .unwrap()
            .is_none());
        let with = NewVmArgs {
            image: Some("127.0.0.1:1/x:1".into()),
            ..Default::default()
        };
        assert!(matches!(
            resolve_new(home.path(), &with, Vmm::None),
            Err(VmImageError::NeedsVm)
        ));
        let mut config = crate::testutil::config("a", false, None);
        assert!(recorded(home.path(), &config).unwrap().is_none());
        config.image = Some(VmImage {
            reference: "r:1".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
        });
        let err = recorded(home.path(), &config).unwrap_err().to_string();
        assert!(
            err.contains("no longer cached: capsem image pull r:1"),
            "{err}"
        );
    }
}
