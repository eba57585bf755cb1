//! Reading containerd's task state directory: `<dir>/<namespace>/<id>/config.json` (the OCI
//! spec, for its annotations) and `init.pid`, for every namespace but `moby` (Docker's own
//! containerd: its containers are named by Docker's API, which says more).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use crate::bounds;

/// containerd's namespace for Docker's containers.
const MOBY: &str = "moby";
/// More than any one host runs; a directory past it is not read (a hostile or broken tree
/// cannot make bindtrace read without end).
const MAX_TASKS: usize = 4096;
/// An OCI spec is a few KiB; one this large is not read.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// A running task, as its state directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Task {
    /// containerd namespace (`k8s.io`, `default`, nerdctl's).
    pub(crate) namespace: String,
    pub(crate) id: String,
    /// `init.pid`: the task's first process, in the host's pid namespace.
    pub(crate) pid: u32,
    pub(crate) annotations: BTreeMap<String, String>,
}

/// What one read found: the tasks, and every directory to watch for the next change.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    pub(crate) tasks: Vec<Task>,
    pub(crate) dirs: Vec<PathBuf>,
}

/// Reads the whole tree under `dir`; a missing or unreadable part is simply not there (a task
/// being made or removed meanwhile is read at the next change).
pub(crate) fn read(dir: &Path) -> Tasks {
    let mut out = Tasks::default();
    for ns in subdirs(dir) {
        let Some(namespace) = ns.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        if namespace == MOBY {
            continue;
        }
        out.dirs.push(ns.clone());
        for task_dir in subdirs(&ns) {
            if out.tasks.len() >= MAX_TASKS {
                log::debug!(
                    "containerd: more than {MAX_TASKS} tasks under {}: the rest not read",
                    dir.display()
                );
                return out;
            }
            out.dirs.push(task_dir.clone());
            if let Some(task) = read_task(&namespace, &task_dir) {
                out.tasks.push(task);
            }
        }
    }
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> =
        entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
    dirs.sort();
    dirs
}

/// One task, once its pid file is there (before it, the task is not running yet).
fn read_task(namespace: &str, dir: &Path) -> Option<Task> {
    let id = dir.file_name()?.to_str()?.to_owned();
    let pid: u32 = fs::read_to_string(dir.join("init.pid")).ok()?.trim().parse().ok().filter(|&p| p > 0)?;
    let spec = dir.join("config.json");
    let annotations = match fs::metadata(&spec) {
        Ok(m) if m.len() <= MAX_SPEC_BYTES => {
            fs::read(&spec).ok().map(|b| annotations(&b)).unwrap_or_default()
        }
        _ => BTreeMap::new(),
    };
    Some(Task { namespace: namespace.to_owned(), id: cut(id), pid, annotations })
}

/// The OCI spec's `annotations` (strings only; anything else in the spec is not read).
pub(crate) fn annotations(spec: &[u8]) -> BTreeMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Spec {
        #[serde(default)]
        annotations: BTreeMap<String, serde_json::Value>,
    }
    let Ok(spec) = serde_json::from_slice::<Spec>(spec) else { return BTreeMap::new() };
    spec.annotations
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            _ => None,
        })
        .collect()
}

/// Names and values are the workload owner's to choose: kept within bounds.
pub(crate) fn cut(s: String) -> String {
    bounds::cut(s, bounds::LABEL_BYTES).0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree as containerd 1.6 lays it out, with Docker's namespace beside it.
    #[test]
    fn tasks_of_every_namespace_but_docker_s() {
        let root = std::env::temp_dir().join(format!("bt-ctrd-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let task = |ns: &str, id: &str, pid: Option<&str>, spec: &str| {
            let d = root.join(ns).join(id);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("config.json"), spec).unwrap();
            if let Some(p) = pid {
                fs::write(d.join("init.pid"), p).unwrap();
            }
        };
        task(
            "k8s.io",
            "aaa",
            Some("41"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-name":"web","n":1}}"#,
        );
        task("k8s.io", "bbb", None, "{}");
        task("moby", "ccc", Some("43"), "{}");
        task("default", "ddd", Some("44\n"), "not json");
        let found = read(&root);
        let _ = fs::remove_dir_all(&root);
        let ids: Vec<(&str, &str, u32)> =
            found.tasks.iter().map(|t| (t.namespace.as_str(), t.id.as_str(), t.pid)).collect();
        assert_eq!(ids, vec![("default", "ddd", 44), ("k8s.io", "aaa", 41)]);
        assert_eq!(
            found.tasks[1].annotations.get("io.kubernetes.cri.sandbox-name").map(String::as_str),
            Some("web")
        );
        assert_eq!(found.tasks[1].annotations.len(), 1, "a number is not a string annotation");
        assert!(found.tasks[0].annotations.is_empty());
        assert!(!found.dirs.iter().any(|d| d.ends_with("moby")), "{:?}", found.dirs);
        assert!(
            found.dirs.iter().any(|d| d.ends_with("k8s.io/bbb")),
            "a task without its pid yet is watched"
        );
    }
}
