//! `cargo xtask image --oci DIR`: a multi-arch image as an OCI image layout (index.json,
//! oci-layout, blobs/sha256/...), written by hand from `dist`'s static binaries. Docker 20.10
//! cannot hold a manifest list locally, and nothing here needs a registry: the layout is what
//! `skopeo copy oci:DIR:TAG docker://REGISTRY/bindtrace:TAG --all` pushes, or
//! `skopeo copy oci:DIR:TAG docker-daemon:bindtrace:TAG` loads for the host's architecture.
//!
//! Each architecture is one layer (the binary at `/bindtrace`, written like the dist tarball:
//! owner 0, the commit's time, `gzip -n`), a config with the same entrypoint and OCI labels as
//! `./x image`, and a manifest. An inner image index lists the two manifests with their
//! platforms; index.json points to it under the tags VERSION and latest. Every file is a
//! function of the binaries and the commit, so the layout is as reproducible as they are.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::dist::{Artefacts, sha256sum};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A content-addressed blob: what a descriptor says of it.
struct Blob {
    digest: String,
    size: u64,
}

impl Blob {
    fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.size })
    }
}

/// Writes the layout into `dir` (emptied first) for `dists` (one per architecture), with the
/// image's `labels` (`org.opencontainers.image.*`) and `created` time.
pub fn write_layout(
    dir: &Path,
    dists: &[Artefacts],
    labels: &[(String, String)],
    created: &str,
) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("create {}", blobs.display()))?;
    let labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();

    let mut manifests = Vec::new();
    for dist in dists {
        let (layer, diff_id) = layer_blob(&blobs, dist)?;
        let config = json!({
            "created": created,
            "architecture": dist.arch.oci,
            "os": "linux",
            "config": { "Entrypoint": ["/bindtrace"], "Labels": labels },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created": created, "created_by": "cargo xtask image --oci" }],
        });
        let config = json_blob(&blobs, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.descriptor(CONFIG),
            "layers": [layer.descriptor(LAYER)],
        });
        let mut descriptor = json_blob(&blobs, &manifest)?.descriptor(MANIFEST);
        descriptor["platform"] = json!({ "architecture": dist.arch.oci, "os": "linux" });
        manifests.push(descriptor);
    }
    let image_index =
        json_blob(&blobs, &json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": manifests }))?;

    let version = &dists.first().context("no architecture to put in the image")?.version;
    let tagged = |tag: &str| {
        let mut d = image_index.descriptor(INDEX);
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        d
    };
    let index =
        json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": [tagged(version), tagged("latest")] });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// Moves `file` into the blob store under its digest.
fn put_blob(blobs: &Path, file: &Path) -> anyhow::Result<Blob> {
    let hex = sha256sum(file)?;
    let size = fs::metadata(file)?.len();
    fs::rename(file, blobs.join(&hex)).context("store a blob")?;
    Ok(Blob { digest: format!("sha256:{hex}"), size })
}

fn json_blob(blobs: &Path, value: &Value) -> anyhow::Result<Blob> {
    let tmp = blobs.join(".json.tmp");
    fs::write(&tmp, serde_json::to_vec(value)?)?;
    put_blob(blobs, &tmp)
}

/// The gzipped layer holding `/bindtrace`, and the digest of its uncompressed tar (the
/// config's diff_id).
fn layer_blob(blobs: &Path, dist: &Artefacts) -> anyhow::Result<(Blob, String)> {
    let stage = blobs.join(format!(".layer-{}", dist.arch.name));
    fs::create_dir_all(&stage)?;
    fs::copy(&dist.binary, stage.join("bindtrace")).context("copy the binary into the layer")?;
    let tar: PathBuf = blobs.join(".layer.tar");
    let status = Command::new("tar")
        .args(["--format=gnu", "--sort=name", &format!("--mtime=@{}", dist.epoch)])
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&stage)
        .arg("-cf")
        .arg(&tar)
        .arg("bindtrace")
        .status()
        .context("tar")?;
    if !status.success() {
        bail!("tar of the {} layer failed: {status}", dist.arch.name);
    }
    fs::remove_dir_all(&stage)?;
    let diff_id = format!("sha256:{}", sha256sum(&tar)?);
    let gz = blobs.join(".layer.tar.gz");
    let status = Command::new("gzip")
        .args(["-n", "-9", "-c"])
        .arg(&tar)
        .stdout(fs::File::create(&gz)?)
        .stderr(Stdio::inherit())
        .status()
        .context("gzip")?;
    if !status.success() {
        bail!("gzip of the {} layer failed: {status}", dist.arch.name);
    }
    fs::remove_file(&tar)?;
    Ok((put_blob(blobs, &gz)?, diff_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{AARCH64, X86_64};

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// The blob a descriptor names: present, of that size and digest; its JSON if it is JSON.
    fn follow(dir: &Path, d: &Value) -> PathBuf {
        let hex = d["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
        let path = dir.join("blobs/sha256").join(hex);
        assert_eq!(sha256sum(&path).unwrap(), hex);
        assert_eq!(fs::metadata(&path).unwrap().len(), d["size"].as_u64().unwrap());
        path
    }

    #[test]
    fn every_descriptor_matches_its_blob_and_the_layout_is_reproducible() {
        let scratch = std::env::temp_dir().join(format!("xtask-oci-test-{}", std::process::id()));
        fs::create_dir_all(&scratch).unwrap();
        let dists: Vec<Artefacts> = [(X86_64, "amd64 binary"), (AARCH64, "arm64 binary")]
            .into_iter()
            .map(|(arch, content)| {
                let binary = scratch.join(arch.name);
                fs::write(&binary, content).unwrap();
                Artefacts {
                    arch,
                    version: "1.2.3".into(),
                    revision: String::new(),
                    epoch: 1_700_000_000,
                    binary,
                    tarball: PathBuf::new(),
                    sha256: String::new(),
                }
            })
            .collect();
        let labels = [("org.opencontainers.image.version".to_owned(), "1.2.3".to_owned())];
        let (a, b) = (scratch.join("a"), scratch.join("b"));
        write_layout(&a, &dists, &labels, "2023-11-14T22:13:20Z").unwrap();
        write_layout(&b, &dists, &labels, "2023-11-14T22:13:20Z").unwrap();
        assert_eq!(fs::read(a.join("index.json")).unwrap(), fs::read(b.join("index.json")).unwrap());

        let index = read_json(&a.join("index.json"));
        let tags: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap())
            .collect();
        assert_eq!(tags, ["1.2.3", "latest"]);
        let image_index = read_json(&follow(&a, &index["manifests"][0]));
        let mut seen = Vec::new();
        for m in image_index["manifests"].as_array().unwrap() {
            let manifest = read_json(&follow(&a, m));
            let config = read_json(&follow(&a, &manifest["config"]));
            let arch = m["platform"]["architecture"].as_str().unwrap();
            assert_eq!(config["architecture"], arch);
            assert_eq!(config["config"]["Labels"]["org.opencontainers.image.version"], "1.2.3");
            follow(&a, &manifest["layers"][0]);
            seen.push(arch.to_owned());
        }
        assert_eq!(seen, ["amd64", "arm64"]);
        // Nothing but the blobs the descriptors name (2 layers, 2 configs, 2 manifests, 1 index).
        assert_eq!(fs::read_dir(a.join("blobs/sha256")).unwrap().count(), 7);
        let _ = fs::remove_dir_all(&scratch);
    }
}
