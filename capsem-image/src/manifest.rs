//! The OCI and Docker documents capsem reads: image manifests, indexes
//! (manifest lists), image configs, and which media types it accepts.
//! Parsed from the exact bytes whose digest was checked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layers::Compression;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// The manifest media types asked for from a registry.
pub const ACCEPTED_MANIFESTS: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest manifest, index or config read (real ones are a few KiB).
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// The guest's platform.
pub const OS: &str = "linux";
pub const ARCH: &str = "amd64";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// A manifest or an index: which one is told by `mediaType`, else by
/// which list it has.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// An image manifest, what is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a document turned out to be.
#[derive(Debug, Clone)]
pub enum Parsed {
    Image(Manifest),
    Index(Vec<Descriptor>),
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a valid manifest")]
    Json(#[source] serde_json::Error),
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("no {OS}/{ARCH} image in the index (platforms: {0})")]
    NoPlatform(String),
    #[error("the image is for {0}, not {OS}/{ARCH}")]
    WrongPlatform(String),
}

/// Parses a manifest or an index.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ManifestError> {
    let doc: Document = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
    let media = doc.media_type.clone();
    match (media.as_deref(), doc.manifests, doc.config, doc.layers) {
        (Some(OCI_INDEX | DOCKER_LIST) | None, Some(list), None, _) => Ok(Parsed::Index(list)),
        (m @ (Some(OCI_MANIFEST | DOCKER_MANIFEST) | None), None, Some(config), Some(layers)) => {
            if !matches!(config.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG) {
                return Err(ManifestError::UnsupportedMediaType(config.media_type));
            }
            for l in &layers {
                layer_compression(&l.media_type)?;
            }
            Ok(Parsed::Image(Manifest {
                schema_version: 2,
                media_type: m.unwrap_or(OCI_MANIFEST).to_owned(),
                config,
                layers,
            }))
        }
        (Some(other), ..) => Err(ManifestError::UnsupportedMediaType(other.to_owned())),
        (None, ..) => Err(ManifestError::UnsupportedMediaType("(none)".into())),
    }
}

/// The index entry for this guest's platform.
pub fn choose_platform(entries: &[Descriptor]) -> Result<&Descriptor, ManifestError> {
    entries
        .iter()
        .find(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == OS && p.architecture == ARCH)
        })
        .or_else(|| match entries {
            // One entry without a platform (an OCI layout's index.json).
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            let names: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            ManifestError::NoPlatform(names.join(", "))
        })
}

/// How a layer of this media type is compressed; other types are refused.
pub fn layer_compression(media_type: &str) -> Result<Compression, ManifestError> {
    let base = media_type
        .strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.tar")
        .map(|rest| format!("{OCI_LAYER_TAR}{rest}"));
    match base.as_deref().unwrap_or(media_type) {
        OCI_LAYER_TAR | DOCKER_LAYER_TAR => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
        _ => Err(ManifestError::UnsupportedMediaType(media_type.to_owned())),
    }
}

/// The parts of an image config file capsem uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// How the image wants to run: stored as `config.json` beside the root
/// filesystem, with the OCI field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `KEY=VALUE` entries.
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl RunConfig {
    /// What `docker run IMAGE` with no command runs: Entrypoint then Cmd.
    pub fn default_command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// An empty string is no working directory or user.
    fn normalized(mut self) -> Self {
        self.working_dir = self.working_dir.filter(|s| !s.is_empty());
        self.user = self.user.filter(|s| !s.is_empty());
        self
    }
}

impl ConfigFile {
    /// Parses a config and checks it is for this guest's platform.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let c: ConfigFile = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        let os = c.os.as_deref().unwrap_or(OS);
        let arch = c.architecture.as_deref().unwrap_or(ARCH);
        if os != OS || arch != ARCH {
            return Err(ManifestError::WrongPlatform(format!("{os}/{arch}")));
        }
        Ok(c)
    }

    pub fn run_config(&self) -> RunConfig {
        self.config.clone().unwrap_or_default().normalized()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn manifests_indexes_and_media_types() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D}","size":2}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D}","size":3}}]}}"#
        );
        let Parsed::Image(m) = parse(m.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(
            layer_compression(&m.layers[0].media_type).unwrap(),
            Compression::Gzip
        );
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Parsed::Index(list) = parse(idx.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(choose_platform(&list).unwrap().size, 2);
        let err = choose_platform(&list[..1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no linux/amd64 image in the index (platforms: linux/arm64)"
        );
        let helm = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{D}","size":2}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(helm.as_bytes()),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        assert!(layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").is_ok());
        assert!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")
                .is_ok()
        );
        assert!(layer_compression("application/x-bzip2").is_err());
        assert!(matches!(
            parse(br#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn config_fields_and_platform() {
        let c = ConfigFile::parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"WorkingDir":"/app","User":"","Entrypoint":null,"Cmd":["sh"]}}"#,
        )
        .unwrap();
        let r = c.run_config();
        assert_eq!(r.env, ["A=1"]);
        assert_eq!(r.working_dir.as_deref(), Some("/app"));
        assert_eq!(r.user, None);
        assert_eq!(r.default_command(), ["sh"]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["WorkingDir"], "/app");
        assert!(matches!(
            ConfigFile::parse(br#"{"architecture":"arm64","os":"linux"}"#),
            Err(ManifestError::WrongPlatform(_))
        ));
    }
}
