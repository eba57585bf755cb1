//! `cargo xtask image`: the container image `bindtrace:VERSION` and `bindtrace:latest`, built
//! offline from `dist`'s static binary with deploy/image/Dockerfile (`FROM scratch`: the binary
//! and nothing else), with the OCI labels, and at most 25 MiB. With `--oci DIR`, instead, the
//! multi-arch (amd64 and arm64) image as an OCI layout in DIR (see [`crate::oci`]); no daemon.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{root, run_cmd};

/// The size the issue allows the image.
const MAX_BYTES: u64 = 25 << 20;
const SOURCE: &str = "https://github.com/bindtrace/bindtrace";

#[derive(clap::Args)]
pub struct Options {
    /// The image's repository name (tags NAME:VERSION and NAME:latest).
    #[arg(long, default_value = "bindtrace")]
    pub name: String,
    /// Write the amd64 + arm64 image as an OCI image layout in this directory (replacing it),
    /// instead of building the docker image.
    #[arg(long, value_name = "DIR")]
    pub oci: Option<PathBuf>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if let Some(dir) = &opts.oci {
        build_oci(dir)?;
        println!("{}", dir.display());
        return Ok(());
    }
    for tag in build(&opts.name)? {
        println!("{tag}");
    }
    Ok(())
}

/// The OCI layout of the image for every architecture `dist` builds.
pub fn build_oci(dir: &std::path::Path) -> anyhow::Result<()> {
    let dists = crate::dist::ARCHES
        .iter()
        .map(|arch| crate::dist::build(None, *arch))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let created = rfc3339(dists[0].epoch)?;
    let labels = labels(&dists[0], &created);
    crate::oci::write_layout(dir, &dists, &labels, &created)
}

/// The `org.opencontainers.image.*` labels of both forms of the image.
fn labels(dist: &crate::dist::Artefacts, created: &str) -> Vec<(String, String)> {
    [
        ("title", "bindtrace".to_owned()),
        (
            "description",
            "Reports connections to containers refused because the service inside listens on loopback"
                .to_owned(),
        ),
        ("version", dist.version.clone()),
        ("revision", dist.revision.clone()),
        ("created", created.to_owned()),
        ("source", SOURCE.to_owned()),
        ("url", SOURCE.to_owned()),
        ("documentation", format!("{SOURCE}/blob/main/docs/install.md")),
        ("licenses", "MIT OR Apache-2.0".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("org.opencontainers.image.{key}"), value))
    .collect()
}

/// Builds the image; returns its two tags.
pub fn build(name: &str) -> anyhow::Result<[String; 2]> {
    let dist = crate::dist::build(None, crate::dist::X86_64)?;
    let context = root().join("target/dist/image");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&dist.binary, context.join("bindtrace"))
        .context("copy the binary into the build context")?;

    let tags = [format!("{name}:{}", dist.version), format!("{name}:latest")];
    let created = rfc3339(dist.epoch)?;
    let mut docker = Command::new("docker");
    // The classic builder: no BuildKit, no buildx, nothing fetched (the base is `scratch`).
    docker.env("DOCKER_BUILDKIT", "0").args(["build", "--quiet", "--pull=false"]);
    for (key, value) in labels(&dist, &created) {
        docker.arg("--label").arg(format!("{key}={value}"));
    }
    for tag in &tags {
        docker.args(["-t", tag]);
    }
    docker.arg("-f").arg(root().join("deploy/image/Dockerfile")).arg(&context);
    run_cmd(docker)?;

    let out =
        Command::new("docker").args(["image", "inspect", "--format", "{{.Size}}", &tags[0]]).output()?;
    let size: u64 =
        String::from_utf8_lossy(&out.stdout).trim().parse().context("docker image inspect: size")?;
    eprintln!("xtask: {} is {:.1} MiB", tags[0], size as f64 / f64::from(1 << 20));
    if size > MAX_BYTES {
        bail!("{} is {size} bytes, more than the 25 MiB allowed", tags[0]);
    }
    Ok(tags)
}

/// Whether a Docker daemon answers.
pub fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Removes the image's tags (what the test suite built).
pub fn remove(tags: &[String]) {
    if tags.is_empty() {
        return;
    }
    let _ = Command::new("docker").arg("rmi").args(tags).output();
}

fn rfc3339(epoch: u64) -> anyhow::Result<String> {
    let out =
        Command::new("date").args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"]).output()?;
    if !out.status.success() {
        bail!("date -d @{epoch} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
