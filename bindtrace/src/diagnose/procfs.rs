//! The processes behind a socket, from /proc: who holds which socket inode (by walking
//! `/proc/PID/fd` of the processes of one namespace), their pid inside the container, command
//! line and executable. Read by hand: a few files and symlinks per process, not worth the procfs
//! crate.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
};

use serde::Serialize;

use crate::netns;

/// A process holding a socket, as seen from the host's pid namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) struct Holder {
    pub(crate) pid: u32,
    pub(crate) comm: String,
    /// The pid inside the process's own pid namespace (the container's), from `NSpid`; absent
    /// when it is the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container_pid: Option<u32>,
    /// The command line, arguments joined by spaces.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) cmdline: String,
    /// The arguments one by one, and the executable's file name (`busybox` for its applets).
    #[serde(skip)]
    pub(crate) argv: Vec<String>,
    #[serde(skip)]
    pub(crate) exe: String,
}

impl Holder {
    /// A holder known only by pid and command name (the tests' way to make one).
    #[cfg(test)]
    pub(crate) fn new(pid: u32, comm: impl Into<String>) -> Holder {
        Holder {
            pid,
            comm: comm.into(),
            container_pid: None,
            cmdline: String::new(),
            argv: Vec::new(),
            exe: String::new(),
        }
    }

    /// Everything /proc says about `pid` that helps a reader: comm, the pid inside its
    /// namespace, the command line and the executable.
    pub(crate) fn describe(pid: u32) -> Holder {
        let argv = argv_of(pid);
        Holder {
            pid,
            comm: comm_of(pid),
            container_pid: nspid_of(pid),
            cmdline: argv.join(" "),
            argv,
            exe: fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| {
                    p.file_name().map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_owned())
                })
                .unwrap_or_default(),
        }
    }
}

/// `/proc/PID/cmdline` split at NULs.
pub(crate) fn argv_of(pid: u32) -> Vec<String> {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { return Vec::new() };
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The pid of `pid` in its own pid namespace (last field of `NSpid:` in /proc/PID/status),
/// when that namespace is not the one bindtrace sees it from.
pub(crate) fn nspid_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_nspid(&status)
}

fn parse_nspid(status: &str) -> Option<u32> {
    let fields: Vec<&str> =
        status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().collect();
    if fields.len() < 2 {
        return None;
    }
    fields.last()?.parse().ok()
}

/// The processes holding each of `inodes`, among the processes of the namespace `netns_inode`
/// (all of them share one listening socket when a server pre-forks). Sorted by pid.
pub(crate) fn holders(inodes: &[u64], netns_inode: u64) -> BTreeMap<u64, Vec<Holder>> {
    let mut found: BTreeMap<u64, Vec<Holder>> = BTreeMap::new();
    if inodes.is_empty() {
        return found;
    }
    let wanted: HashMap<String, u64> = inodes.iter().map(|i| (format!("socket:[{i}]"), *i)).collect();
    for pid in netns::pids() {
        if netns::inode_of_pid(pid) != Some(netns_inode) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            if let Some(inode) = target.to_str().and_then(|t| wanted.get(t)) {
                let holders = found.entry(*inode).or_default();
                if !holders.iter().any(|h| h.pid == pid) {
                    holders.push(Holder::describe(pid));
                }
            }
        }
    }
    for holders in found.values_mut() {
        holders.sort();
    }
    found
}

pub(crate) fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_is_the_innermost() {
        assert_eq!(parse_nspid("Name:\thttpd\nNSpid:\t31455\t1\n"), Some(1));
        assert_eq!(parse_nspid("NSpid:\t812\n"), None);
        assert_eq!(parse_nspid("Name: x\n"), None);
    }

    #[test]
    fn describe_reads_our_own_process() {
        let me = Holder::describe(std::process::id());
        assert!(!me.argv.is_empty());
        assert_eq!(me.cmdline, me.argv.join(" "));
        assert!(!me.exe.is_empty());
    }
}
