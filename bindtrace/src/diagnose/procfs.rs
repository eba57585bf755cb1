//! The processes behind a socket, from /proc: who holds which socket inode (by walking
//! `/proc/PID/fd` of the processes of one namespace), their pid inside the container, command
//! line and executable. Read by hand: a few files and symlinks per process, not worth the procfs
//! crate.
//!
//! Race-free: a pid can be reused between two reads of `/proc/PID/...`, and then the advice
//! would name another program. Each process's directory is opened once ([`ProcDir`]) and
//! everything is read through that descriptor: once the process is gone, reads through it
//! fail (the directory belongs to the process, not to the number), so a reused pid can never
//! answer for it. The start time is checked at the end as well.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::PathBuf,
};

use serde::Serialize;

use crate::{bounds, netns};

/// A process holding a socket, as seen from the host's pid namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) struct Holder {
    pub(crate) pid: u32,
    pub(crate) comm: String,
    /// The pid inside the process's own pid namespace (the container's), from `NSpid`; absent
    /// when it is the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container_pid: Option<u32>,
    /// The command line, arguments joined by spaces (at most [`bounds::CMDLINE_BYTES`]).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) cmdline: String,
    /// Bytes of the command line not kept.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) cmdline_truncated: usize,
    /// The arguments one by one, and the executable's file name (`busybox` for its applets).
    #[serde(skip)]
    pub(crate) argv: Vec<String>,
    #[serde(skip)]
    pub(crate) exe: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
            cmdline_truncated: 0,
            argv: Vec::new(),
            exe: String::new(),
        }
    }
}

/// One process's `/proc/PID` directory, open: every read goes through it.
pub(crate) struct ProcDir {
    pid: u32,
    dir: File,
    /// `starttime` from `stat`, in clock ticks since boot: with the pid, it names one process.
    start_time: u64,
}

impl ProcDir {
    pub(crate) fn open(pid: u32) -> io::Result<ProcDir> {
        let path = CString::new(format!("/proc/{pid}")).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated path; the fd is owned by the File below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let dir = unsafe { File::from_raw_fd(fd) };
        let mut p = ProcDir { pid, dir, start_time: 0 };
        p.start_time = p.read_start_time()?;
        Ok(p)
    }

    /// Opens `name` below the process's directory.
    fn open_at(&self, name: &str, flags: libc::c_int) -> io::Result<File> {
        let c = CString::new(name).map_err(io::Error::other)?;
        // SAFETY: a valid directory fd and a NUL-terminated relative path.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Up to `max` bytes of the file `name`, and how many more it had.
    fn read_bounded(&self, name: &str, max: usize) -> io::Result<(Vec<u8>, usize)> {
        let mut f = self.open_at(name, libc::O_RDONLY)?;
        let mut kept = Vec::new();
        (&mut f).take(max as u64).read_to_end(&mut kept)?;
        let rest = io::copy(&mut f, &mut io::sink())? as usize;
        Ok((kept, rest))
    }

    fn read_string(&self, name: &str) -> io::Result<String> {
        let (bytes, _) = self.read_bounded(name, 16 * 1024)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn read_link(&self, name: &str) -> io::Result<PathBuf> {
        let c = CString::new(name).map_err(io::Error::other)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: valid directory fd, NUL-terminated path, buffer of the length given.
        let n =
            unsafe { libc::readlinkat(self.dir.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&buf)))
    }

    fn read_start_time(&self) -> io::Result<u64> {
        let stat = self.read_string("stat")?;
        parse_start_time(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no starttime in stat"))
    }

    /// Whether the process this directory was opened for still runs (a pid reused meanwhile
    /// belongs to another directory, so reads through this one fail).
    pub(crate) fn still_same(&self) -> bool {
        self.read_start_time().is_ok_and(|t| t == self.start_time)
    }

    /// Inode of the process's network namespace.
    pub(crate) fn netns_inode(&self) -> Option<u64> {
        self.namespace_inode("net")
    }

    /// Inode of one of the process's namespaces (`net`, `mnt`, `pid`, ...).
    pub(crate) fn namespace_inode(&self, kind: &str) -> Option<u64> {
        let f = self.open_at(&format!("ns/{kind}"), libc::O_RDONLY).ok()?;
        f.metadata().ok().map(|m| m.ino())
    }

    /// (device, inode) of the file the process runs, whatever its path says: the executable
    /// is opened through `exe`, which names it in the process's own mount namespace.
    pub(crate) fn exe_identity(&self) -> Option<(u64, u64)> {
        let f = self.open_at("exe", libc::O_PATH).ok()?;
        f.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// The parent's pid (`PPid` in `status`).
    pub(crate) fn parent(&self) -> Option<u32> {
        let status = self.read_string("status").ok()?;
        status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()
    }

    /// The socket inodes among the process's open files.
    pub(crate) fn socket_inodes(&self) -> Vec<u64> {
        let Ok(fd_dir) = self.open_at("fd", libc::O_RDONLY | libc::O_DIRECTORY) else { return Vec::new() };
        // The directory is read through our own descriptor of it.
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", fd_dir.as_raw_fd())) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let link = self.read_link(&format!("fd/{}", e.file_name().to_str()?)).ok()?;
                link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
    }

    /// The command line split at NULs (at most [`bounds::CMDLINE_BYTES`]), and the bytes cut.
    pub(crate) fn argv(&self) -> (Vec<String>, usize) {
        let Ok((raw, cut)) = self.read_bounded("cmdline", bounds::CMDLINE_BYTES) else {
            return (Vec::new(), 0);
        };
        (split_cmdline(&raw), cut)
    }

    pub(crate) fn comm(&self) -> String {
        self.read_string("comm").map(|s| s.trim_end().to_owned()).unwrap_or_default()
    }

    /// Everything /proc says about the process that helps a reader: comm, the pid inside its
    /// namespace, the command line and the executable.
    pub(crate) fn describe(&self) -> Holder {
        let (argv, cmdline_truncated) = self.argv();
        Holder {
            pid: self.pid,
            comm: self.comm(),
            container_pid: self.read_string("status").ok().as_deref().and_then(parse_nspid),
            cmdline: argv.join(" "),
            cmdline_truncated,
            argv,
            exe: self
                .read_link("exe")
                .ok()
                .and_then(|p| {
                    p.file_name().map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_owned())
                })
                .unwrap_or_default(),
        }
    }
}

/// Field 22 of `/proc/PID/stat`, counted after the command name (which may hold spaces and
/// parentheses: the last `)` ends it).
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The words of a `/proc/PID/cmdline`: split at NULs, empty words dropped.
pub(crate) fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `/proc/PID/cmdline` split at NULs (bounded as [`ProcDir::argv`]).
pub(crate) fn argv_of(pid: u32) -> Vec<String> {
    ProcDir::open(pid).map(|p| p.argv().0).unwrap_or_default()
}

pub(crate) fn parse_nspid(status: &str) -> Option<u32> {
    let fields: Vec<&str> =
        status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().collect();
    if fields.len() < 2 {
        return None;
    }
    fields.last()?.parse().ok()
}

/// The processes holding each of `inodes`, among the processes of the namespace `netns_inode`
/// (all of them share one listening socket when a server pre-forks). Sorted by pid. A process
/// that ended (or whose pid was reused) while it was being read is left out.
pub(crate) fn holders(inodes: &[u64], netns_inode: u64) -> BTreeMap<u64, Vec<Holder>> {
    let mut found: BTreeMap<u64, Vec<Holder>> = BTreeMap::new();
    if inodes.is_empty() {
        return found;
    }
    let wanted: HashMap<u64, ()> = inodes.iter().map(|i| (*i, ())).collect();
    for pid in netns::pids() {
        let Ok(proc) = ProcDir::open(pid) else { continue };
        if proc.netns_inode() != Some(netns_inode) {
            continue;
        }
        let held: Vec<u64> = proc.socket_inodes().into_iter().filter(|i| wanted.contains_key(i)).collect();
        if held.is_empty() {
            continue;
        }
        let holder = proc.describe();
        if !proc.still_same() {
            continue;
        }
        for inode in held {
            let holders = found.entry(inode).or_default();
            if !holders.iter().any(|h| h.pid == pid) {
                holders.push(holder.clone());
            }
        }
    }
    for holders in found.values_mut() {
        holders.sort();
    }
    found
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
    fn start_time_survives_odd_command_names() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 777 1000 10";
        assert_eq!(parse_start_time(stat), Some(777));
        assert_eq!(parse_start_time("42 (x"), None);
    }

    #[test]
    fn describe_reads_our_own_process() {
        let me = ProcDir::open(std::process::id()).unwrap().describe();
        assert!(!me.argv.is_empty());
        assert_eq!(me.cmdline, me.argv.join(" "));
        assert!(!me.exe.is_empty());
    }

    /// A child running `prog arg` under exactly host pid `pid` (clone3 with set_tid; needs root),
    /// or None when that pid is taken.
    fn spawn_with_pid(pid: Option<u32>, prog: &str, arg: &str) -> Option<u32> {
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs {
            flags: u64,
            pidfd: u64,
            child_tid: u64,
            parent_tid: u64,
            exit_signal: u64,
            stack: u64,
            stack_size: u64,
            tls: u64,
            set_tid: u64,
            set_tid_size: u64,
            cgroup: u64,
        }
        let tid = pid.map(|p| p as libc::pid_t);
        let mut args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..Default::default() };
        if let Some(t) = &tid {
            args.set_tid = std::ptr::from_ref(t) as u64;
            args.set_tid_size = 1;
        }
        let path = CString::new(prog).unwrap();
        let arg = CString::new(arg).unwrap();
        let argv = [path.as_ptr(), arg.as_ptr(), std::ptr::null()];
        // SAFETY: clone3 without CLONE_VM: the child has its own copy of memory and only calls
        // execv (async-signal-safe) or _exit.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, &raw mut args, size_of::<CloneArgs>()) };
        match rc {
            0 => unsafe {
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(127)
            },
            n if n > 0 => Some(n as u32),
            _ => None,
        }
    }

    fn kill_and_reap(pid: u32) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
        }
    }

    /// Test 3, a pid reused for real: the directory opened for the first process never answers for
    /// the second one, which gets the same pid.
    #[test]
    fn a_reused_pid_never_answers_for_the_process_it_replaced() {
        if !crate::testing::root_or_skip("clone3 with set_tid") {
            return;
        }
        for _ in 0..20 {
            let first = spawn_with_pid(None, "/bin/sleep", "60").expect("spawn sleep");
            // Wait until it has exec'd, so its command line is its own.
            let opened = loop {
                let p = ProcDir::open(first).unwrap();
                if p.argv().0 == ["/bin/sleep", "60"] {
                    break p;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            kill_and_reap(first);
            // The same host pid for another program; retry if something else took it.
            let Some(second) = spawn_with_pid(Some(first), "/bin/sleep", "61") else { continue };
            assert_eq!(second, first);
            let fresh = loop {
                let p = ProcDir::open(second).unwrap();
                if p.argv().0 == ["/bin/sleep", "61"] {
                    break p;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            assert_eq!(opened.comm(), "", "the old directory reads nothing of the new process");
            assert!(opened.argv().0.is_empty());
            assert_eq!(opened.netns_inode(), None);
            assert!(!opened.still_same());
            assert!(fresh.still_same());
            kill_and_reap(second);
            return;
        }
        panic!("the pid was taken by another process 20 times in a row");
    }
}
