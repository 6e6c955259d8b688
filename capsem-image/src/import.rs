//! `capsem image import FILE`: an OCI image layout (a directory, or a tar
//! of one, as `docker save` of Docker 25+ and `skopeo copy oci-archive:`
//! write) or a classic `docker save` archive (`manifest.json` with
//! `Config`, `RepoTags` and `Layers`). An archive is unpacked into the
//! staging directory with the same path rules as a layer, so it cannot
//! write outside it; every file is read through [`crate::safepath`] and
//! checked against its digest before use: blobs against their names,
//! classic layers against the config's `rootfs.diff_ids`.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{self, Digest};
use crate::error::{io_err, ImageError};
use crate::layers::{self, Flattener};
use crate::manifest::{self, ConfigFile, Descriptor, Manifest, Parsed};
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::safepath::{self, Missing};
use crate::store::{CachedImage, Staged, Store};

/// Annotations that may carry an image's full name in an OCI layout.
const NAME_ANNOTATIONS: [&str; 2] = [
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
];

/// What an import produced.
#[derive(Debug, Clone)]
pub struct Imported {
    pub image: CachedImage,
    /// The names recorded for it (from `RepoTags` or the layout's
    /// annotations); it is always reachable as `@<digest>`.
    pub references: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default, deserialize_with = "null_vec")]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

fn null_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

struct Source<'a> {
    root: &'a Path,
    archive: &'a Path,
}

impl Source<'_> {
    fn bad(&self, why: impl Into<String>) -> ImageError {
        ImageError::BadArchive {
            path: self.archive.to_owned(),
            why: why.into(),
        }
    }

    /// A file of the layout, symlinks followed inside it only.
    fn path(&self, name: &str) -> Result<PathBuf, ImageError> {
        let p = safepath::resolve(
            self.root,
            &safepath::clean(Path::new(name)),
            true,
            Missing::Stop,
        )
        .map_err(|e| self.bad(format!("{name}: {e}")))?;
        if !p.is_file() {
            return Err(self.bad(format!("{name} is missing")));
        }
        Ok(p)
    }

    fn small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.path(name)?;
        digest::read_bounded(&p, manifest::MAX_DOCUMENT)
            .map_err(|e| self.bad(format!("{name}: {e}")))
    }

    fn blob_name(&self, d: &str) -> Result<String, ImageError> {
        let d = Digest::parse(d).map_err(|e| self.bad(e.to_string()))?;
        Ok(format!("blobs/sha256/{}", d.hex()))
    }

    /// A blob's path, its digest and size checked.
    fn blob(&self, desc: &Descriptor) -> Result<PathBuf, ImageError> {
        let p = self.path(&self.blob_name(&desc.digest)?)?;
        check_file(&p, &desc.digest, Some(desc.size), &desc.digest)?;
        Ok(p)
    }

    fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let data = self.small(&self.blob_name(&desc.digest)?)?;
        check(&desc.digest, &Digest::of(&data), &desc.digest)?;
        Ok(data)
    }
}

fn check(want: &str, got: &Digest, what: &str) -> Result<(), ImageError> {
    if want != got.as_str() {
        return Err(ImageError::DigestMismatch {
            what: what.into(),
            expected: want.into(),
            actual: got.to_string(),
        });
    }
    Ok(())
}

fn check_file(p: &Path, want: &str, size: Option<u64>, what: &str) -> Result<(), ImageError> {
    let len = fs::metadata(p)
        .map_err(io_err(format!("cannot read {}", p.display())))?
        .len();
    if let Some(size) = size.filter(|s| *s != len) {
        return Err(ImageError::DigestMismatch {
            what: what.into(),
            expected: format!("{size} bytes"),
            actual: format!("{len} bytes"),
        });
    }
    let got = Digest::of_file(p).map_err(io_err(format!("cannot read {}", p.display())))?;
    check(want, &got, what)
}

/// A full image name from an annotation or a RepoTag, normalized.
fn full_name(s: &str) -> Option<String> {
    if !s.contains('/') && !s.contains(':') {
        return None; // A bare tag, like "1.0": not a name.
    }
    match ImageRef::parse(s).ok()? {
        r @ ImageRef::Remote(_) => Some(r.name()),
        ImageRef::Local(_) => None,
    }
}

fn oci_layout(src: &Source<'_>) -> Result<(Digest, Staged, Vec<String>), ImageError> {
    let index = src.small("index.json")?;
    let mut names = Vec::new();
    let mut list = match manifest::parse(&index).map_err(|e| src.bad(format!("index.json: {e}")))? {
        Parsed::Index(list) => list,
        Parsed::Image(_) => return Err(src.bad("index.json is not an index")),
    };
    // One level of nesting: index.json -> an index -> the manifest.
    for _ in 0..2 {
        let entry = manifest::choose_platform(&list)
            .map_err(|e| src.bad(e.to_string()))?
            .clone();
        names.extend(
            NAME_ANNOTATIONS
                .iter()
                .filter_map(|a| entry.annotations.get(*a))
                .filter_map(|n| full_name(n)),
        );
        let bytes = src.small_blob(&entry)?;
        match manifest::parse(&bytes).map_err(|source| ImageError::Manifest {
            what: entry.digest.clone(),
            source,
        })? {
            Parsed::Index(inner) => list = inner,
            Parsed::Image(m) => {
                let config_bytes = src.small_blob(&m.config)?;
                let layers = m
                    .layers
                    .iter()
                    .map(|l| {
                        let c = manifest::layer_compression(&l.media_type).map_err(|source| {
                            ImageError::Manifest {
                                what: l.digest.clone(),
                                source,
                            }
                        })?;
                        Ok((src.blob(l)?, c))
                    })
                    .collect::<Result<_, ImageError>>()?;
                // Docker 25+ writes manifest.json (with RepoTags) beside the layout.
                if let Ok(text) = src.small("manifest.json") {
                    if let Ok(entries) = serde_json::from_slice::<Vec<SaveEntry>>(&text) {
                        names.extend(
                            entries
                                .iter()
                                .flat_map(|e| &e.repo_tags)
                                .filter_map(|t| full_name(t)),
                        );
                    }
                }
                let staged = Staged {
                    manifest_bytes: bytes,
                    manifest: m,
                    config_bytes,
                    layers,
                };
                return Ok((
                    Digest::parse(&entry.digest).map_err(|e| src.bad(e.to_string()))?,
                    staged,
                    names,
                ));
            }
        }
    }
    Err(src.bad("indexes nested too deep"))
}

fn docker_save(src: &Source<'_>) -> Result<(Digest, Staged, Vec<String>), ImageError> {
    let text = src.small("manifest.json")?;
    let entries: Vec<SaveEntry> =
        serde_json::from_slice(&text).map_err(|e| src.bad(format!("manifest.json: {e}")))?;
    let [entry] = &entries[..] else {
        return Err(src.bad(format!(
            "{} images in manifest.json; import takes one",
            entries.len()
        )));
    };
    let config_bytes = src.small(&entry.config)?;
    let config_digest = Digest::of(&config_bytes);
    // The config's name is its digest: `<hex>.json` or `blobs/sha256/<hex>`.
    let stem = Path::new(&entry.config)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("");
    if stem.len() == 64 && stem != config_digest.hex() {
        return Err(ImageError::DigestMismatch {
            what: entry.config.clone(),
            expected: format!("sha256:{stem}"),
            actual: config_digest.to_string(),
        });
    }
    let config = ConfigFile::parse(&config_bytes).map_err(|source| ImageError::Manifest {
        what: entry.config.clone(),
        source,
    })?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(src.bad(format!(
            "{} layers but the config lists {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let p = src.path(name)?;
        check_file(&p, diff_id, None, name)?;
        let size = fs::metadata(&p)
            .map_err(io_err(format!("cannot read {}", p.display())))?
            .len();
        layers.push((p, layers::Compression::None));
        descs.push(Descriptor {
            media_type: manifest::DOCKER_LAYER_TAR.into(),
            digest: diff_id.clone(),
            size,
            platform: None,
            annotations: Default::default(),
        });
    }
    // A manifest made from what was checked: its digest names the image.
    let m = Manifest {
        schema_version: 2,
        media_type: manifest::DOCKER_MANIFEST.into(),
        config: Descriptor {
            media_type: manifest::DOCKER_CONFIG.into(),
            digest: config_digest.to_string(),
            size: config_bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        },
        layers: descs,
    };
    let manifest_bytes = serde_json::to_vec(&m).map_err(|e| io_err("manifest")(e.into()))?;
    let names = entry
        .repo_tags
        .iter()
        .filter_map(|t| full_name(t))
        .collect();
    let staged = Staged {
        manifest: m,
        manifest_bytes: manifest_bytes.clone(),
        config_bytes,
        layers,
    };
    Ok((Digest::of(&manifest_bytes), staged, names))
}

impl Store {
    /// Imports an OCI layout (directory or tar) or a `docker save` archive.
    pub fn import(&self, path: &Path, progress: &mut dyn Progress) -> Result<Imported, ImageError> {
        let staging = self.staging()?;
        let unpacked = staging.path().join("archive");
        let root = if path.is_dir() {
            path.to_path_buf()
        } else {
            let (file, c) = layers::open_sniffed(path)
                .map_err(io_err(format!("cannot read {}", path.display())))?;
            fs::create_dir(&unpacked).map_err(io_err("cannot create a staging directory"))?;
            let mut flat = Flattener::new(&unpacked);
            flat.apply(BufReader::new(file), c)
                .and_then(|()| flat.finish().map(drop))
                .map_err(|e| ImageError::BadArchive {
                    path: path.to_owned(),
                    why: format!("not a tar archive: {}", crate::error_line(&e)),
                })?;
            unpacked
        };
        let src = Source {
            root: &root,
            archive: path,
        };
        let (digest, staged, mut names) = if root.join("index.json").is_file() {
            oci_layout(&src)?
        } else if root.join("manifest.json").is_file() {
            docker_save(&src)?
        } else {
            return Err(src.bad(
                "neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
            ));
        };
        names.sort();
        names.dedup();
        let total = staged
            .layers
            .iter()
            .filter_map(|(p, _)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        progress.resolved(staged.layers.len(), total);
        let result = match self.get(&digest)? {
            Some(img) => Ok(img),
            None => self.install(&digest, staged, staging, progress),
        };
        progress.done();
        let image = result?;
        for n in &names {
            self.name(n, &digest)?;
        }
        Ok(Imported {
            image,
            references: names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_names_become_references() {
        assert_eq!(
            full_name("test/saved:2.0").as_deref(),
            Some("docker.io/test/saved:2.0")
        );
        assert_eq!(
            full_name("127.0.0.1:5000/a/b:1").as_deref(),
            Some("127.0.0.1:5000/a/b:1")
        );
        assert_eq!(full_name("1.0"), None);
        assert_eq!(full_name("latest"), None);
        assert_eq!(full_name("bad name:1"), None);
    }

    #[test]
    fn files_are_checked_against_their_digest_and_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("blob");
        fs::write(&p, b"abc").unwrap();
        let good = Digest::of(b"abc");
        check_file(&p, good.as_str(), Some(3), "blob").unwrap();
        assert!(matches!(
            check_file(&p, good.as_str(), Some(4), "blob"),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(matches!(
            check_file(&p, Digest::of(b"abd").as_str(), None, "blob"),
            Err(ImageError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_layout_path_cannot_leave_the_layout() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.path().join("index.json"),
        )
        .unwrap();
        let src = Source {
            root: root.path(),
            archive: Path::new("x.tar"),
        };
        // The absolute link is taken inside the layout, where nothing is.
        assert!(matches!(
            src.small("index.json"),
            Err(ImageError::BadArchive { .. })
        ));
        assert!(matches!(
            src.small("../../secret"),
            Err(ImageError::BadArchive { .. })
        ));
    }
}
