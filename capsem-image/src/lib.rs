//! capsem-image: OCI images pulled from a registry or imported from a
//! file, every blob checked against its digest, the layers flattened in
//! order (whiteouts, opaque directories) and converted to a read-only root
//! filesystem image, cached under `<capsem home>/images/oci/` by manifest
//! digest with the image's run settings beside it.
//!
//! The API boot uses:
//!
//! ```no_run
//! # fn main() -> Result<(), capsem_image::ImageError> {
//! use capsem_image::{AuthSource, Quiet, Store};
//! let store = Store::open(std::path::Path::new("/home/me/.capsem"))?;
//! // Cached: no network. Else pulled (like `docker run`).
//! let img = store.resolve_or_pull("python:3.12-slim", &AuthSource::DockerConfig, &mut Quiet)?;
//! let _: &std::path::Path = &img.rootfs;     // sha256/<hex>/rootfs.erofs, read-only
//! let _: &[String] = &img.config.env;         // ["PATH=...", ...]
//! let _: Option<&str> = img.config.working_dir.as_deref(); // Some("/app")
//! let _: Option<&str> = img.config.user.as_deref();        // Some("1000:1000")
//! let _: Vec<String> = img.config.default_command();       // Entrypoint + Cmd
//! # Ok(()) }
//! ```
//!
//! Modules:
//!
//! * [`store`]: [`Store`], the cache: `resolve_or_pull`, `pull`, `get`,
//!   `lookup`, `list`, `remove`; staging and the one rename into place.
//! * [`import`]: `Store::import` of an OCI layout or a `docker save` archive.
//! * [`registry`]: [`registry::Remote`], the registry client (oci-client).
//! * [`auth`]: [`AuthSource`] and [`Auth`], credentials from a Docker config.
//! * [`reference`]: [`ImageRef`], references and the loopback rule for HTTP.
//! * [`manifest`]: manifests, indexes, configs, media types, [`RunConfig`].
//! * [`layers`]: [`layers::Flattener`], applying tar layers to a tree.
//! * [`safepath`]: resolving entry paths so nothing escapes the tree.
//! * [`rootfs`]: [`rootfs::build`], the tree to the read-only image (EROFS).
//! * [`digest`]: [`Digest`] and a hashing writer.
//! * [`progress`]: [`Progress`], what a pull reports, and [`Quiet`].
//! * [`error`]: [`ImageError`], the one public error.

pub mod auth;
pub mod digest;
pub mod error;
pub mod import;
pub mod layers;
pub mod manifest;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod safepath;
pub mod store;

pub use auth::{Auth, AuthSource};
pub use digest::Digest;
pub use error::ImageError;
pub use import::Imported;
pub use manifest::RunConfig;
pub use progress::{Progress, Quiet};
pub use reference::ImageRef;
pub use store::{CachedImage, ImageInfo, Listed, Removed, Store};

/// `error: cause: cause` on one line (a cause the text already ends with
/// is not repeated).
pub fn error_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}
