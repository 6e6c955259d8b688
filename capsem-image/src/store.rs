//! The image cache ([`Store`]) under `<home>/images/oci/`:
//!
//! ```text
//! sha256/<manifest hex>/rootfs.erofs   the read-only root (crate::rootfs)
//!                      /config.json    Env, WorkingDir, User, Entrypoint, Cmd (RunConfig)
//!                      /info.json      digest, created, size, layers, devices skipped (ImageInfo)
//!                      /manifest.json  the manifest, as its digest was checked
//!                      /image-config.json  the image config blob, likewise
//! refs.json            reference name -> manifest digest
//! tmp/                 staging: a pull or import builds in tmp/<random>/ and
//!                      renames the finished directory into sha256/
//! lock                 flock held while refs.json or sha256/ changes
//! ```
//!
//! Nothing appears under `sha256/` until it is complete (one rename), and a
//! failed pull or import removes its staging directory.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::auth::AuthSource;
use crate::digest::{self, Digest};
use crate::error::{io_err, ImageError};
use crate::layers::{Compression, Flattener};
use crate::manifest::{self, ConfigFile, Manifest, RunConfig};
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry::Remote;
use crate::rootfs;

/// What `info.json` holds; `capsem image ls --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The manifest digest, `sha256:...`.
    pub digest: String,
    /// The image config's `created` (RFC 3339), if any.
    pub created: Option<String>,
    /// Bytes of the root filesystem image.
    pub rootfs_bytes: u64,
    pub layers: usize,
    /// Device nodes in the layers, which are not made (see crate::layers).
    #[serde(default)]
    pub devices_skipped: u64,
}

/// A cached, converted image: what the CLI boots.
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub digest: Digest,
    /// `sha256/<hex>/`.
    pub dir: PathBuf,
    /// The read-only root filesystem image.
    pub rootfs: PathBuf,
    pub config: RunConfig,
    pub info: ImageInfo,
}

/// An image and the names that point at it (`capsem image ls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub references: Vec<String>,
    #[serde(flatten)]
    pub info: ImageInfo,
}

/// What [`Store::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub digest: Digest,
    /// The names removed.
    pub references: Vec<String>,
    /// Whether the image itself went (no name is left pointing at it).
    pub image: bool,
}

/// Verified inputs of one image, ready to convert.
#[derive(Debug)]
pub(crate) struct Staged {
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    /// Each layer's file and compression, in order, digests checked.
    pub layers: Vec<(PathBuf, Compression)>,
}

/// The cache.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

type Refs = BTreeMap<String, String>;

/// Largest refs.json read.
const MAX_REFS: u64 = 16 << 20;

impl Store {
    /// The cache under `<home>/images/oci/`, created if missing.
    pub fn open(home: &Path) -> Result<Self, ImageError> {
        let dir = home.join("images/oci");
        for d in [dir.join("sha256"), dir.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_err(format!("cannot create {}", d.display())))?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image_dir(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    fn lock(&self) -> Result<Flock<File>, ImageError> {
        let path = self.dir.join("lock");
        let what = format!("cannot lock {}", path.display());
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(what.clone()))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| io_err(what)(e.into()))
    }

    fn read_refs(&self) -> Result<Refs, ImageError> {
        let path = self.dir.join("refs.json");
        match digest::read_bounded(&path, MAX_REFS) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| ImageError::Io {
                what: format!("{} is not valid JSON", path.display()),
                source: e.into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Refs::new()),
            Err(e) => Err(io_err(format!("cannot read {}", path.display()))(e)),
        }
    }

    fn write_refs(&self, refs: &Refs) -> Result<(), ImageError> {
        let text = serde_json::to_vec_pretty(refs).map_err(|e| io_err("refs")(e.into()))?;
        write_atomic(&self.dir.join("refs.json"), &text)
    }

    /// The cached image with this manifest digest, if there is one.
    pub fn get(&self, d: &Digest) -> Result<Option<CachedImage>, ImageError> {
        let dir = self.image_dir(d);
        if !dir.is_dir() {
            return Ok(None);
        }
        let read = |name: &str| -> Result<Vec<u8>, ImageError> {
            let p = dir.join(name);
            digest::read_bounded(&p, manifest::MAX_DOCUMENT)
                .map_err(io_err(format!("cannot read {}", p.display())))
        };
        let parse_err = |name: &str| {
            let what = format!("{} is not valid", dir.join(name).display());
            move |e: serde_json::Error| io_err(what)(e.into())
        };
        let config =
            serde_json::from_slice(&read("config.json")?).map_err(parse_err("config.json"))?;
        let info = serde_json::from_slice(&read("info.json")?).map_err(parse_err("info.json"))?;
        Ok(Some(CachedImage {
            digest: d.clone(),
            rootfs: dir.join(rootfs::FILE_NAME),
            dir,
            config,
            info,
        }))
    }

    /// The cached image a reference names, without the network.
    pub fn lookup(&self, r: &ImageRef) -> Result<Option<CachedImage>, ImageError> {
        let d = match r {
            ImageRef::Local(d) => d.clone(),
            ImageRef::Remote(rem) => match self.read_refs()?.get(&r.name()) {
                Some(d) => Digest::parse(d).map_err(crate::reference::RefError::from)?,
                None => match rem.digest() {
                    Some(d) => Digest::parse(d).map_err(crate::reference::RefError::from)?,
                    None => return Ok(None),
                },
            },
        };
        self.get(&d)
    }

    /// What boot calls: the cached image for `reference`, pulled first only
    /// if it is not in the cache (like `docker run`).
    pub fn resolve_or_pull(
        &self,
        reference: &str,
        auth: &AuthSource,
        progress: &mut dyn Progress,
    ) -> Result<CachedImage, ImageError> {
        let r = ImageRef::parse(reference)?;
        if let Some(img) = self.lookup(&r)? {
            return Ok(img);
        }
        self.pull(reference, auth, progress)
    }

    /// `capsem image pull`: asks the registry for the manifest; downloads
    /// and converts only if that manifest is not cached yet.
    pub fn pull(
        &self,
        reference: &str,
        auth: &AuthSource,
        progress: &mut dyn Progress,
    ) -> Result<CachedImage, ImageError> {
        let r = ImageRef::parse(reference)?;
        let rem = match &r {
            ImageRef::Local(d) => {
                return self.get(d)?.ok_or_else(|| ImageError::NotCached(r.name()));
            }
            ImageRef::Remote(rem) => rem.clone(),
        };
        let auth = auth.for_registry(rem.resolve_registry())?;
        let remote = Remote::new(rem, &auth)?;
        let (digest, manifest_bytes, manifest) = remote.manifest()?;
        let img = match self.get(&digest)? {
            Some(img) => img,
            None => {
                let result = (|| {
                    let config_bytes =
                        remote.small_blob(&manifest.config, manifest::MAX_DOCUMENT)?;
                    let staging = self.staging()?;
                    let total = manifest.layers.iter().map(|l| l.size).sum();
                    progress.resolved(manifest.layers.len(), total);
                    let mut layers = Vec::new();
                    for (i, l) in manifest.layers.iter().enumerate() {
                        let c = manifest::layer_compression(&l.media_type).map_err(|source| {
                            ImageError::Manifest {
                                what: format!("layer {i}"),
                                source,
                            }
                        })?;
                        progress.layer(i, l.size);
                        let path = staging.path().join(format!("layer-{i}"));
                        remote.blob_to_file(l, &path, progress)?;
                        layers.push((path, c));
                    }
                    let staged = Staged {
                        manifest_bytes,
                        manifest,
                        config_bytes,
                        layers,
                    };
                    self.install(&digest, staged, staging, progress)
                })();
                progress.done();
                result?
            }
        };
        self.name(&r.name(), &digest)?;
        Ok(img)
    }

    /// A new staging directory under `tmp/`, removed when dropped.
    pub(crate) fn staging(&self) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.dir.join("tmp"))
            .map_err(io_err("cannot create a staging directory"))
    }

    /// Points `name` at `digest`.
    pub(crate) fn name(&self, name: &str, d: &Digest) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let mut refs = self.read_refs()?;
        if refs.get(name).map(String::as_str) != Some(d.as_str()) {
            refs.insert(name.to_owned(), d.to_string());
            self.write_refs(&refs)?;
        }
        Ok(())
    }

    /// Flattens the staged layers, converts, writes the JSON files and
    /// renames the result into `sha256/`.
    pub(crate) fn install(
        &self,
        d: &Digest,
        staged: Staged,
        staging: tempfile::TempDir,
        progress: &mut dyn Progress,
    ) -> Result<CachedImage, ImageError> {
        progress.converting();
        let config =
            ConfigFile::parse(&staged.config_bytes).map_err(|source| ImageError::Manifest {
                what: "the image config".into(),
                source,
            })?;
        let tree = staging.path().join("tree");
        let out = staging.path().join("image");
        for p in [&tree, &out] {
            fs::create_dir(p).map_err(io_err(format!("cannot create {}", p.display())))?;
        }
        let mut flat = Flattener::new(&tree);
        for (index, ((path, c), desc)) in staged
            .layers
            .iter()
            .zip(&staged.manifest.layers)
            .enumerate()
        {
            let layer_err = |source| ImageError::Layer {
                index,
                digest: desc.digest.clone(),
                source,
            };
            let file =
                File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
            flat.apply(io::BufReader::new(file), *c)
                .map_err(layer_err)?;
            // A downloaded layer is no longer needed: free the space now
            // (an imported layout's files are the user's, left alone).
            if path.starts_with(staging.path()) {
                let _ = fs::remove_file(path);
            }
        }
        let notes = flat.finish().map_err(|source| ImageError::Layer {
            index: staged.layers.len(),
            digest: "directory modes".into(),
            source,
        })?;
        let rootfs_path = out.join(rootfs::FILE_NAME);
        rootfs::build(&tree, &rootfs_path).map_err(ImageError::Rootfs)?;
        let rootfs_bytes = fs::metadata(&rootfs_path)
            .map_err(io_err("cannot stat the root filesystem"))?
            .len();
        let run = config.run_config();
        let info = ImageInfo {
            digest: d.to_string(),
            created: config.created.clone(),
            rootfs_bytes,
            layers: staged.layers.len(),
            devices_skipped: notes.devices_skipped,
        };
        for (name, data) in [
            ("config.json", to_json(&run)),
            ("info.json", to_json(&info)),
            ("manifest.json", staged.manifest_bytes.clone()),
            ("image-config.json", staged.config_bytes.clone()),
        ] {
            let p = out.join(name);
            fs::write(&p, data).map_err(io_err(format!("cannot write {}", p.display())))?;
        }
        File::open(&out)
            .and_then(|f| f.sync_all())
            .map_err(io_err("cannot sync the image"))?;
        let dest = self.image_dir(d);
        let _lock = self.lock()?;
        if !dest.exists() {
            fs::rename(&out, &dest).map_err(io_err(format!("cannot create {}", dest.display())))?;
        }
        drop(staging);
        self.get(d)?
            .ok_or_else(|| ImageError::NotCached(d.to_string()))
    }

    /// Every cached image with its names, by digest.
    pub fn list(&self) -> Result<Vec<Listed>, ImageError> {
        let refs = self.read_refs()?;
        let dir = self.dir.join("sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(format!("cannot read {}", dir.display())))? {
            let e = e.map_err(io_err(format!("cannot read {}", dir.display())))?;
            let Ok(d) = Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy()))
            else {
                continue;
            };
            if let Some(img) = self.get(&d)? {
                let references = refs
                    .iter()
                    .filter(|(_, v)| **v == d.as_str())
                    .map(|(k, _)| k.clone())
                    .collect();
                out.push(Listed {
                    references,
                    info: img.info,
                });
            }
        }
        out.sort_by(|a, b| a.info.digest.cmp(&b.info.digest));
        Ok(out)
    }

    /// `capsem image rm`: a name is removed (and its image, if no other
    /// name points at it); `@sha256:...` removes the image and its names.
    pub fn remove(&self, reference: &str) -> Result<Removed, ImageError> {
        let r = ImageRef::parse(reference)?;
        let _lock = self.lock()?;
        let mut refs = self.read_refs()?;
        let (d, names) = match &r {
            ImageRef::Local(d) => {
                let names: Vec<String> = refs
                    .iter()
                    .filter(|(_, v)| **v == d.as_str())
                    .map(|(k, _)| k.clone())
                    .collect();
                (d.clone(), names)
            }
            ImageRef::Remote(_) => match refs.get(&r.name()) {
                Some(d) => (
                    Digest::parse(d).map_err(crate::reference::RefError::from)?,
                    vec![r.name()],
                ),
                None => return Err(ImageError::NotCached(r.name())),
            },
        };
        let dir = self.image_dir(&d);
        if names.is_empty() && !dir.exists() {
            return Err(ImageError::NotCached(r.name()));
        }
        for n in &names {
            refs.remove(n);
        }
        let image = !refs.values().any(|v| v == d.as_str());
        if image && dir.exists() {
            // Out of sha256/ in one rename, then deleted.
            let trash = self.staging()?;
            let gone = trash.path().join("gone");
            fs::rename(&dir, &gone).map_err(io_err(format!("cannot remove {}", dir.display())))?;
            drop(trash);
        }
        self.write_refs(&refs)?;
        Ok(Removed {
            digest: d,
            references: names,
            image,
        })
    }
}

/// Pretty JSON and a newline.
fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Writes `path` under a temporary name, then renames it into place.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let what = format!("cannot write {}", path.display());
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(what.clone()))?;
    io::Write::write_all(&mut tmp, data).map_err(io_err(what.clone()))?;
    tmp.as_file().sync_all().map_err(io_err(what.clone()))?;
    tmp.persist(path).map_err(|e| io_err(what)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished image directory as `install` leaves it.
    fn fake_image(store: &Store, seed: &[u8]) -> Digest {
        let d = Digest::of(seed);
        let dir = store.image_dir(&d);
        fs::create_dir_all(&dir).unwrap();
        let info = ImageInfo {
            digest: d.to_string(),
            created: None,
            rootfs_bytes: 1,
            layers: 0,
            devices_skipped: 0,
        };
        fs::write(dir.join("info.json"), to_json(&info)).unwrap();
        fs::write(dir.join("config.json"), to_json(&RunConfig::default())).unwrap();
        d
    }

    #[test]
    fn names_list_lookup_and_remove() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let a = fake_image(&store, b"a");
        let b = fake_image(&store, b"b");
        store.name("docker.io/library/a:1", &a).unwrap();
        store.name("docker.io/library/a:2", &a).unwrap();
        store.name("docker.io/library/b:1", &b).unwrap();

        let r = ImageRef::parse("a:1").unwrap();
        assert_eq!(store.lookup(&r).unwrap().unwrap().digest, a);
        let by_digest = ImageRef::parse(&format!("@{b}")).unwrap();
        assert_eq!(store.lookup(&by_digest).unwrap().unwrap().digest, b);
        assert!(store
            .lookup(&ImageRef::parse("c:1").unwrap())
            .unwrap()
            .is_none());
        let list = store.list().unwrap();
        assert_eq!(list.len(), 2);
        let of_a = list.iter().find(|l| l.info.digest == a.as_str()).unwrap();
        assert_eq!(
            of_a.references,
            ["docker.io/library/a:1", "docker.io/library/a:2"]
        );

        // One of two names: the image stays.
        let removed = store.remove("a:1").unwrap();
        assert_eq!((removed.references.len(), removed.image), (1, false));
        assert!(store.image_dir(&a).is_dir());
        // The last name: the image goes.
        let removed = store.remove("a:2").unwrap();
        assert!(removed.image);
        assert!(!store.image_dir(&a).exists());
        // By digest: the image and its names.
        let removed = store.remove(&format!("@{b}")).unwrap();
        assert_eq!(removed.references, ["docker.io/library/b:1"]);
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(store.remove("a:1"), Err(ImageError::NotCached(_))));
        assert!(matches!(
            store.remove(&format!("@{b}")),
            Err(ImageError::NotCached(_))
        ));
        assert_eq!(fs::read_dir(store.dir().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.read_refs().unwrap(), Refs::new());
    }

    #[test]
    fn a_local_digest_not_cached_is_not_pulled() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let d = Digest::of(b"x");
        let err = store
            .resolve_or_pull(&format!("@{d}"), &AuthSource::Anonymous, &mut crate::Quiet)
            .unwrap_err();
        assert!(matches!(err, ImageError::NotCached(_)), "{err}");
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"2");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
