//! `capsem image ls [--json] | pull REF [--registry-auth FILE] | rm REF |
//! import FILE`: the OCI image cache under `<home>/images/oci/`
//! ([`capsem_image::Store`]).
//!
//! * `pull` prints the manifest digest (one line on stdout); progress
//!   (layers and bytes) goes to stderr on a terminal only. A manifest
//!   already cached is not downloaded again.
//! * `import` prints the digest and the names it recorded, on one line.
//! * `ls` prints `REFERENCE DIGEST SIZE CREATED` (one row per name, an
//!   image without a name as `<none>`); `--json` one array of
//!   [`capsem_image::Listed`] (`references`, `digest`, `created`,
//!   `rootfs_bytes`, `layers`), documented in docs/images.md.
//! * `rm` prints `untagged NAME` per name removed and `deleted DIGEST` when
//!   the image itself went.
//!
//! Every failure (a missing image, a digest mismatch, an unsupported media
//! type, an unreachable registry) is one line and exit 125.

use std::path::PathBuf;

use capsem_image::{AuthSource, ImageInfo, Listed, Store};
use clap::Subcommand;

use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;
use crate::pullbar::PullBar;

/// `capsem image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List cached images: reference, digest, size, created.
    Ls {
        /// One JSON array (see docs/images.md)
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry, check every blob's digest, and
    /// convert it to a read-only root filesystem (cached by manifest
    /// digest: an image already there is not downloaded again).
    Pull {
        /// e.g. docker.io/library/python:3.12-slim, 127.0.0.1:5000/team/tool:1.0
        reference: String,
        /// A Docker config file with the registry's credentials [default:
        /// $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
        #[arg(long, value_name = "FILE")]
        registry_auth: Option<PathBuf>,
    },
    /// Remove a name (and its image when no other name points at it), or
    /// an image and all its names by @sha256:DIGEST.
    Rm { reference: String },
    /// Import an OCI image layout (directory or tar) or a `docker save`
    /// archive.
    Import { file: PathBuf },
}

/// Runs one `capsem image` command.
pub fn run(ctx: &Ctx, command: ImageCommand) -> Result<Exit, CliError> {
    let store = Store::open(&ctx.home)?;
    match command {
        ImageCommand::Ls { json } => {
            let images = store.list()?;
            let text = if json {
                to_json(&images)
            } else {
                table(&images)
            };
            write_stdout(text.as_bytes())?;
        }
        ImageCommand::Pull {
            reference,
            registry_auth,
        } => {
            let auth = registry_auth.map_or(AuthSource::DockerConfig, AuthSource::File);
            let img = store.pull(&reference, &auth, &mut PullBar::new())?;
            note_devices(&img.info);
            write_stdout(format!("{}\n", img.digest).as_bytes())?;
        }
        ImageCommand::Rm { reference } => {
            let removed = store.remove(&reference)?;
            let mut out = String::new();
            for r in &removed.references {
                out.push_str(&format!("untagged {r}\n"));
            }
            if removed.image {
                out.push_str(&format!("deleted {}\n", removed.digest));
            }
            write_stdout(out.as_bytes())?;
        }
        ImageCommand::Import { file } => {
            let imported = store.import(&file, &mut PullBar::new())?;
            note_devices(&imported.image.info);
            let mut line = imported.image.digest.to_string();
            for r in &imported.references {
                line.push(' ');
                line.push_str(r);
            }
            line.push('\n');
            write_stdout(line.as_bytes())?;
        }
    }
    Ok(Exit::OK)
}

/// Device nodes are not made in the root (its /dev is the guest's own):
/// said once, on stderr.
fn note_devices(info: &ImageInfo) {
    if info.devices_skipped > 0 {
        eprintln!(
            "capsem: note: {} device nodes in the layers were skipped",
            info.devices_skipped
        );
    }
}

/// The `--json` text: a pretty array and a newline.
pub fn to_json(images: &[Listed]) -> String {
    // Strings and numbers always serialize.
    let mut text = serde_json::to_string_pretty(images).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

/// Bytes as `12.3 MB` (decimal, like `docker images`).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The table: one row per name, `<none>` for an image without one.
pub fn table(images: &[Listed]) -> String {
    let mut rows: Vec<[String; 4]> = vec![[
        "REFERENCE".into(),
        "DIGEST".into(),
        "SIZE".into(),
        "CREATED".into(),
    ]];
    for img in images {
        let short = img
            .info
            .digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>();
        let created = img.info.created.clone().unwrap_or_else(|| "-".into());
        let none = ["<none>".to_owned()];
        let names = if img.references.is_empty() {
            &none[..]
        } else {
            &img.references[..]
        };
        for n in names {
            rows.push([
                n.clone(),
                short.clone(),
                human(img.info.rootfs_bytes),
                created.clone(),
            ]);
        }
    }
    crate::output::columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let images = vec![
            Listed {
                references: vec![
                    "127.0.0.1:5000/t/a:1".into(),
                    "docker.io/library/a:latest".into(),
                ],
                info: ImageInfo {
                    digest: d.clone(),
                    created: Some("2026-01-02T03:04:05Z".into()),
                    rootfs_bytes: 12_345_678,
                    layers: 3,
                    devices_skipped: 0,
                },
            },
            Listed {
                references: vec![],
                info: ImageInfo {
                    digest: d.clone(),
                    created: None,
                    rootfs_bytes: 999,
                    layers: 1,
                    devices_skipped: 0,
                },
            },
        ];
        assert_eq!(
            table(&images),
            "\
REFERENCE                   DIGEST        SIZE     CREATED
127.0.0.1:5000/t/a:1        abababababab  12.3 MB  2026-01-02T03:04:05Z
docker.io/library/a:latest  abababababab  12.3 MB  2026-01-02T03:04:05Z
<none>                      abababababab  999 B    -
"
        );
        let json: serde_json::Value = serde_json::from_str(&to_json(&images)).unwrap();
        assert_eq!(
            json[1],
            serde_json::json!({"references": [], "digest": d, "created": null, "rootfs_bytes": 999, "layers": 1, "devices_skipped": 0})
        );
        assert_eq!(to_json(&[]), "[]\n");
    }
}
