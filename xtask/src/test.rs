//! The whole test suite, in the order that fails fastest: lint, unit tests (no root), the
//! deploy/ artefacts (promtool; `deploy-check` for Kubernetes, the workflows and the unit),
//! release build, the image (`dist`'s static binary), the aarch64 dist and the OCI layout, the
//! .deb, then the integration tests, which need root and run one at a time because they load
//! eBPF programs and create network namespaces.
use crate::util::{Tally, cargo, root, run_cmd, run_tests};

#[derive(clap::Args)]
pub struct Options {
    /// Skip fmt and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Only integration tests whose name contains this.
    filter: Option<String>,
    /// Skip the kernel matrix (`cargo xtask kernels`), which otherwise runs last.
    #[arg(long)]
    no_kernels: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_lint {
        crate::lint::run()?;
    }
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "bindtrace-tests", "--exclude", "bindtrace-ebpf"]);
    let mut tally = Tally::default();
    run_tests(unit, &mut tally)?;
    deploy_checks()?;
    // The Kubernetes manifests, workflows and unit validate offline; broken copies do not.
    crate::deploy_check::check(&mut tally).inspect_err(|_| {
        println!("{} passed, {} failed", tally.passed, tally.failed);
    })?;

    let mut build = cargo();
    build.args(["build", "--release", "-p", "bindtrace"]);
    run_cmd(build)?;

    // The image (and with it the static dist binary), under a name of this run's own: the
    // image tests run it; it is removed afterwards, also when they fail.
    // Without a Docker daemon (and outside CI) the Docker tests skip: build no image then.
    let image_tags = if crate::image::docker_answers() || std::env::var_os("CI").is_some() {
        crate::image::build(&format!("bindtrace-test-{}", std::process::id()))?.to_vec()
    } else {
        eprintln!("xtask: no Docker daemon answers: not building the image (its tests skip)");
        Vec::new()
    };

    // The aarch64 dist tarball and the amd64 + arm64 OCI layout: tests/tests/dist.rs runs the
    // aarch64 binary under qemu-user and reads the layout with skopeo.
    let oci_started = std::time::Instant::now();
    let oci = root().join("target/dist/oci");
    crate::image::build_oci(&oci)?;
    eprintln!("xtask: the aarch64 dist and the OCI layout took {:.0?}", oci_started.elapsed());

    // The .deb from the same dist binary: tests/tests/deb.rs installs, runs and purges it.
    let deb_started = std::time::Instant::now();
    let deb = crate::deb::build()?;
    eprintln!("xtask: the .deb took {:.0?}", deb_started.elapsed());

    let mut integration = cargo();
    integration
        .args(["test", "--release", "-p", "bindtrace-tests", "--"])
        .arg("--test-threads=1")
        .env("BINDTRACE_BIN", root().join("target/release/bindtrace"))
        .env("BINDTRACE_DEB", &deb)
        .env("BINDTRACE_DIST", root().join("target/dist"))
        .env("BINDTRACE_OCI", &oci)
        .env("BINDTRACE_IMAGE", image_tags.last().map_or("bindtrace:latest", String::as_str));
    if let Some(filter) = &opts.filter {
        integration.arg(filter);
    }
    let integration = run_tests(integration, &mut tally);
    crate::image::remove(&image_tags);
    integration?;
    if opts.filter.is_none() {
        // The benchmark's smoke run: the harness works end to end (exact counts, every phase
        // produces its figures); no timing is asserted.
        bench_smoke(&mut tally)?;
        // The soak's short mode: three minutes of churn, no lost count, nothing growing.
        soak_short(&mut tally)?;
    }
    if !opts.no_kernels && opts.filter.is_none() {
        // Each kernel's checks count as tests; the matrix's table is in target/kernels/report.md.
        let kernels = crate::kernels::in_suite().inspect_err(|_| {
            println!("{} passed, {} failed", tally.passed, tally.failed + 1);
        })?;
        tally.passed += kernels.passed;
        tally.failed += kernels.failed;
        if kernels.failed > 0 {
            println!("{} passed, {} failed", tally.passed, tally.failed);
            anyhow::bail!("the kernel matrix failed (target/kernels/report.md)");
        }
    }
    // One closing line for the whole suite (CI reads the last one).
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

fn bench_smoke(tally: &mut Tally) -> anyhow::Result<()> {
    crate::bench::build()?;
    let mut bench = crate::bench::command();
    bench.arg("--short");
    match run_cmd(bench) {
        Ok(()) => {
            println!("test bench --short ... ok");
            tally.passed += 1;
            Ok(())
        }
        Err(e) => {
            println!("test bench --short ... FAILED");
            tally.failed += 1;
            println!("{} passed, {} failed", tally.passed, tally.failed);
            Err(e.context("the benchmark's smoke run (`sudo ./x bench --short`) failed"))
        }
    }
}

/// `sudo ./x soak --minutes 3`: the first minute is the warm-up, the next two are checked.
fn soak_short(tally: &mut Tally) -> anyhow::Result<()> {
    crate::bench::build()?;
    match run_cmd(crate::soak::command(3, Some(1))) {
        Ok(()) => {
            println!("test soak --minutes 3 ... ok");
            tally.passed += 1;
            Ok(())
        }
        Err(e) => {
            println!("test soak --minutes 3 ... FAILED");
            tally.failed += 1;
            println!("{} passed, {} failed", tally.passed, tally.failed);
            Err(e.context("the soak's short run (`sudo ./x soak --minutes 3`) failed"))
        }
    }
}

/// The Prometheus configuration and alert rules in deploy/: valid, and their unit tests pass.
fn deploy_checks() -> anyhow::Result<()> {
    let dir = root().join("deploy/prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts.test.yml"],
    ] {
        let mut promtool = std::process::Command::new("promtool");
        promtool.args(args).current_dir(&dir);
        run_cmd(promtool).map_err(|e| {
            e.context(
                "promtool (Debian package `prometheus`; `sudo ./x setup` installs it) in deploy/prometheus",
            )
        })?;
    }
    Ok(())
}
