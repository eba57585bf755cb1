//! `cargo xtask deploy-check`: the deployment files validate offline, and broken copies of them
//! do not (so the validators really look at what matters).
//!
//! - deploy/kubernetes core kinds: kubernetes-validate `--strict` (unknown fields fail) against
//!   the oldest and newest Kubernetes the manifests are for; any warning fails too (it only
//!   warns, exit 0, for a kind it has no schema for);
//! - deploy/kubernetes/podmonitor.yaml: check-jsonschema against the Prometheus Operator's
//!   PodMonitor schema vendored in deploy/kubernetes/schema;
//! - .github/workflows: check-jsonschema's built-in GitHub-workflow schema, and shellcheck over
//!   every `run:` block;
//! - deploy/systemd/bindtrace.service: `systemd-analyze security --offline=yes` exposure at most
//!   [`MAX_EXPOSURE`].
//!
//! kubernetes-validate and check-jsonschema come from PyPI into a venv under target/ (made on
//! first use, pinned versions); shellcheck and systemd-analyze are Debian's (`./x setup`).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{Tally, root, run_cmd};

const PYPI_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "check-jsonschema==0.39.0"];
/// Kubernetes versions the manifests must be valid for: 1.30 is the first with the
/// securityContext.appArmorProfile field the DaemonSet uses.
const KUBERNETES_VERSIONS: &[&str] = &["1.30", "1.37"];
const CORE_MANIFESTS: &[&str] = &["namespace.yaml", "serviceaccount.yaml", "daemonset.yaml", "service.yaml"];
/// `systemd-analyze security --threshold` is in tenths: 3.0 "OK" at most.
const MAX_EXPOSURE: u32 = 30;

/// Prints each workflow's `run:` blocks as JSON: [{"where", "shell", "run"}].
const RUN_BLOCKS_PY: &str = r#"
import json, sys, yaml
wf = yaml.safe_load(open(sys.argv[1]))
default = ((wf.get("defaults") or {}).get("run") or {}).get("shell", "bash")
out = []
for job_id, job in (wf.get("jobs") or {}).items():
    shell = ((job.get("defaults") or {}).get("run") or {}).get("shell", default)
    for i, step in enumerate(job.get("steps") or []):
        if "run" in step:
            out.append({"where": "%s step %d (%s)" % (job_id, i + 1, step.get("name", "")),
                        "shell": step.get("shell", shell), "run": step["run"]})
json.dump(out, sys.stdout)
"#;

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    let result = check(&mut tally);
    println!("deploy-check: {} passed, {} failed", tally.passed, tally.failed);
    result
}

struct Tools {
    venv: PathBuf,
}

impl Tools {
    fn bin(&self, name: &str) -> Command {
        Command::new(self.venv.join("bin").join(name))
    }
}

/// Runs every check, adding each to `tally`; fails if any failed.
pub fn check(tally: &mut Tally) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let tools = Tools { venv: venv()? };
    let scratch = std::env::temp_dir().join(format!("bindtrace-deploy-check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let result = all_checks(&tools, &scratch, tally);
    let _ = fs::remove_dir_all(&scratch);
    eprintln!("xtask: deploy-check took {:.1?}", started.elapsed());
    result?;
    if tally.failed > 0 {
        bail!("{} deploy check(s) failed", tally.failed);
    }
    Ok(())
}

/// A check's outcome: Ok, or the validator's complaint.
type Verdict = Result<(), String>;

fn record(tally: &mut Tally, name: &str, ok: bool, detail: &str) {
    if ok {
        println!("test deploy-check {name} ... ok");
        tally.passed += 1;
    } else {
        println!("test deploy-check {name} ... FAILED\n{}", detail.trim_end());
        tally.failed += 1;
    }
}

/// A file that must validate.
fn expect_valid(tally: &mut Tally, name: &str, verdict: Verdict) {
    let detail = verdict.as_ref().err().cloned().unwrap_or_default();
    record(tally, name, verdict.is_ok(), &detail);
}

/// A broken copy that must fail, and for the reason planted (`says` in the complaint).
fn expect_invalid(tally: &mut Tally, name: &str, says: &str, verdict: Verdict) {
    match verdict {
        Ok(()) => record(tally, name, false, "the broken copy passed validation"),
        Err(e) if e.contains(says) => record(tally, name, true, ""),
        Err(e) => record(tally, name, false, &format!("failed, but without naming {says:?}:\n{e}")),
    }
}

fn all_checks(tools: &Tools, scratch: &Path, tally: &mut Tally) -> anyhow::Result<()> {
    let k8s = root().join("deploy/kubernetes");
    let workflows = root().join(".github/workflows");
    let unit = root().join("deploy/systemd/bindtrace.service");

    for file in CORE_MANIFESTS {
        for version in KUBERNETES_VERSIONS {
            expect_valid(
                tally,
                &format!("kubernetes {file} {version}"),
                kubernetes(tools, &k8s.join(file), version),
            );
        }
    }
    expect_valid(tally, "podmonitor.yaml schema", podmonitor(tools, &k8s.join("podmonitor.yaml")));
    let mut workflow_files: Vec<PathBuf> = fs::read_dir(&workflows)
        .with_context(|| format!("read {}", workflows.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    workflow_files.sort();
    for wf in &workflow_files {
        let name = wf.file_name().unwrap().to_string_lossy().into_owned();
        expect_valid(tally, &format!("workflow {name} schema"), workflow_schema(tools, wf));
        for (place, verdict) in run_blocks(tools, wf, scratch)? {
            expect_valid(tally, &format!("workflow {name} {place} shellcheck"), verdict);
        }
    }
    expect_valid(tally, "systemd unit exposure", exposure(&unit));

    // Broken copies, each with one planted fault.
    let broken = |file: &Path, from: &str, to: &str| -> anyhow::Result<PathBuf> {
        let text = fs::read_to_string(file)?;
        if !text.contains(from) {
            bail!(
                "{} no longer contains {from:?}: update the broken copy in deploy_check.rs",
                file.display()
            );
        }
        let copy = scratch.join(format!("broken-{}", file.file_name().unwrap().to_string_lossy()));
        fs::write(&copy, text.replacen(from, to, 1))?;
        Ok(copy)
    };
    let latest = KUBERNETES_VERSIONS[KUBERNETES_VERSIONS.len() - 1];
    let ds = k8s.join("daemonset.yaml");
    let copy = broken(&ds, "hostPID: true", "hostPID: \"yes\"")?;
    expect_invalid(
        tally,
        "broken daemonset: a string for a boolean",
        "hostPID",
        kubernetes(tools, &copy, latest),
    );
    let copy =
        broken(&ds, "      hostNetwork: true\n", "      hostNetwork: true\n      hostNetworking: true\n")?;
    expect_invalid(
        tally,
        "broken daemonset: an unknown field",
        "hostNetworking",
        kubernetes(tools, &copy, latest),
    );
    let copy = broken(&k8s.join("service.yaml"), "kind: Service\n", "kind: Servise\n")?;
    expect_invalid(
        tally,
        "broken service: a kind without a schema (a warning)",
        "Servise",
        kubernetes(tools, &copy, latest),
    );
    let pm = k8s.join("podmonitor.yaml");
    let copy = broken(&pm, "  selector:\n    matchLabels:\n      app.kubernetes.io/name: bindtrace\n", "")?;
    expect_invalid(tally, "broken podmonitor: no selector", "selector", podmonitor(tools, &copy));
    let copy = broken(&pm, "podMetricsEndpoints:", "podMetricEndpoints:")?;
    expect_invalid(
        tally,
        "broken podmonitor: a misspelt field",
        "podMetricEndpoints",
        podmonitor(tools, &copy),
    );
    let ci = workflows.join("ci.yml");
    let copy = broken(&ci, "    timeout-minutes: 90\n", "    timeout-minutes: 90\n    time-limit: 90\n")?;
    expect_invalid(tally, "broken workflow: an unknown key", "time-limit", workflow_schema(tools, &copy));
    let copy = broken(&ci, "safe.directory \"$GITHUB_WORKSPACE\"", "safe.directory $GITHUB_WORKSPACE")?;
    let verdicts = run_blocks(tools, &copy, scratch)?;
    let complaint = verdicts.into_iter().find_map(|(_, v)| v.err());
    expect_invalid(
        tally,
        "broken workflow: an unquoted variable in run",
        "SC2086",
        complaint.map_or(Ok(()), Err),
    );
    let copy = broken(&unit, "CapabilityBoundingSet=", "#CapabilityBoundingSet=")?;
    expect_invalid(tally, "broken unit: every capability", "exposure", exposure(&copy));
    Ok(())
}

/// Output of a validator: Ok when it exits 0, else its stdout and stderr.
fn output(mut cmd: Command) -> Verdict {
    let out = cmd.output().map_err(|e| format!("starting {cmd:?}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(()) } else { Err(text) }
}

fn kubernetes(tools: &Tools, file: &Path, version: &str) -> Verdict {
    let mut cmd = tools.bin("kubernetes-validate");
    cmd.args(["--strict", "-k", version]).arg(file);
    let out = cmd.output().map_err(|e| format!("kubernetes-validate: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // It exits 0 after a warning (e.g. a kind it has no schema for): that is a failure here.
    let warned = text.lines().any(|l| !l.starts_with("INFO "));
    if out.status.success() && !warned { Ok(()) } else { Err(text) }
}

fn podmonitor(tools: &Tools, file: &Path) -> Verdict {
    let mut cmd = tools.bin("check-jsonschema");
    cmd.arg("--schemafile").arg(root().join("deploy/kubernetes/schema/podmonitor.json")).arg(file);
    output(cmd)
}

fn workflow_schema(tools: &Tools, file: &Path) -> Verdict {
    let mut cmd = tools.bin("check-jsonschema");
    cmd.args(["--builtin-schema", "vendor.github-workflows"]).arg(file);
    output(cmd)
}

/// shellcheck over each `run:` block of a workflow; (where, verdict) per block. `${{ }}`
/// expressions become a plain word first: GitHub substitutes them before the shell runs.
fn run_blocks(tools: &Tools, workflow: &Path, scratch: &Path) -> anyhow::Result<Vec<(String, Verdict)>> {
    let out = tools.bin("python").args(["-c", RUN_BLOCKS_PY]).arg(workflow).output()?;
    if !out.status.success() {
        bail!("reading the run blocks of {}: {}", workflow.display(), String::from_utf8_lossy(&out.stderr));
    }
    let blocks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut verdicts = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let place = b["where"].as_str().unwrap_or_default().to_owned();
        let shell = b["shell"].as_str().unwrap_or_default();
        if shell != "bash" && shell != "sh" {
            verdicts.push((place, Err(format!("shell {shell:?}: only bash and sh blocks are checked"))));
            continue;
        }
        let script = scratch.join(format!("run-{i}.{shell}"));
        fs::write(&script, without_expressions(b["run"].as_str().unwrap_or_default()))?;
        let mut cmd = Command::new("shellcheck");
        cmd.args(["--shell", shell, "--severity", "style"]).arg(&script);
        verdicts.push((place, output(cmd)));
    }
    Ok(verdicts)
}

fn without_expressions(script: &str) -> String {
    let mut out = String::new();
    let mut rest = script;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        match rest[start..].find("}}") {
            Some(end) => {
                out.push_str("GITHUB_EXPRESSION");
                rest = &rest[start + end + 2..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

fn exposure(unit: &Path) -> Verdict {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["security", "--offline=yes", "--no-pager", &format!("--threshold={MAX_EXPOSURE}")]).arg(unit);
    output(cmd).map_err(|text| {
        let level =
            text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("no exposure level");
        format!("exposure above {:.1}: {level}\n", f64::from(MAX_EXPOSURE) / 10.0)
    })
}

/// The venv with the pinned PyPI validators, made when missing (or when the pins change).
fn venv() -> anyhow::Result<PathBuf> {
    let venv = root().join("target/deploy-venv");
    let stamp = venv.join("bindtrace-pins");
    let pins = PYPI_PACKAGES.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == pins) {
        return Ok(venv);
    }
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let mut make = Command::new(python);
    make.args(["-m", "venv", "--clear"]).arg(&venv);
    run_cmd(make)
        .map_err(|e| e.context("python3 -m venv (Debian package python3-venv; `sudo ./x setup`)"))?;
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check"]).args(PYPI_PACKAGES);
    run_cmd(pip).map_err(|e| e.context("installing the validators from PyPI"))?;
    fs::write(&stamp, pins)?;
    Ok(venv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_become_a_word() {
        assert_eq!(without_expressions("echo ${{ github.ref }} x"), "echo GITHUB_EXPRESSION x");
        assert_eq!(without_expressions("a ${{ b }}${{c}}"), "a GITHUB_EXPRESSIONGITHUB_EXPRESSION");
        assert_eq!(without_expressions("no ${{ end"), "no ${{ end");
    }
}
