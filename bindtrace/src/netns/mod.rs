//! Network namespaces: entering one from a helper thread, telling them apart, finding them.
//!
//! Namespaces are identified by their cookie (`SO_NETNS_COOKIE`, never reused while the machine
//! runs) rather than their inode number (reused as soon as a namespace dies). An open file of a
//! namespace keeps it alive, so while we hold one its inode and cookie stay valid.
//!
//! Kernels before 5.14 have no `SO_NETNS_COOKIE`; there the inode number stands in for the cookie.
//! Only the tc hook runs on those kernels (the tracepoint hooks need 5.17), and it never reads a
//! cookie in the kernel: it gets the value from userspace, which holds every in-scope namespace
//! open, so the inode cannot be reused while it identifies a port.
pub(crate) mod links;
pub(crate) mod loopback;
pub(crate) mod prefixes;
pub(crate) mod rootless;
pub(crate) mod scope;

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

/// `SO_NETNS_COOKIE` (linux/asm-generic/socket.h); libc does not export it on every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Directories where namespace handles live without any process in them: iproute2's
/// `ip netns add` and Docker's sandboxes.
pub(crate) const HANDLE_DIRS: &[&str] = &["/run/netns", "/run/docker/netns", "/var/run/netns"];

/// Runs `f` on a scoped helper thread that has joined the network namespace of `ns`. `setns`
/// changes only the calling thread, so the rest of the process stays where it is.
pub(crate) fn run_in<R: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace helper thread panicked")))
    })
}

/// The cookie of the calling thread's current network namespace.
pub(crate) fn current_cookie() -> io::Result<u64> {
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(cookie)
}

/// An open network namespace: holding it keeps the namespace (and so its inode) alive.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) file: File,
    pub(crate) inode: u64,
    pub(crate) cookie: u64,
}

impl Netns {
    pub(crate) fn open(path: &Path) -> io::Result<Netns> {
        Self::from_file(File::open(path)?)
    }

    /// From a namespace file already open (its identity cannot change under us).
    pub(crate) fn from_file(file: File) -> io::Result<Netns> {
        let inode = file.metadata()?.ino();
        let cookie = match run_in(file.as_fd(), current_cookie) {
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => inode,
            other => other?,
        };
        Ok(Netns { file, inode, cookie })
    }

    /// The namespace this process runs in.
    pub(crate) fn own() -> io::Result<Netns> {
        Self::open(Path::new("/proc/self/ns/net"))
    }

    pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> io::Result<R> + Send) -> io::Result<R> {
        run_in(self.file.as_fd(), f)
    }
}

/// A namespace file found on the system, not yet opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) path: PathBuf,
    pub(crate) inode: u64,
}

/// Every network namespace reachable from here, once each: handles under [`HANDLE_DIRS`]
/// first (they name namespaces with no process), then `/proc/PID/ns/net` of every process.
/// An error only when a directory could not be read for want of resources (EMFILE, ENFILE,
/// ENOMEM): an empty list would then pass for "no such namespace".
pub(crate) fn candidates() -> io::Result<Vec<Candidate>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert(meta.ino())
        {
            out.push(Candidate { path, inode: meta.ino() });
        }
    };
    for dir in HANDLE_DIRS {
        match fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    consider(entry.path());
                }
            }
            Err(e) if out_of_resources(&e) => return Err(e),
            Err(_) => {}
        }
    }
    let pids = match list_pids() {
        Ok(pids) => pids,
        Err(e) if out_of_resources(&e) => return Err(e),
        Err(_) => Vec::new(),
    };
    for pid in pids {
        consider(PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    Ok(out)
}

/// Errors that say "not now" rather than "not there": the process is out of descriptors or
/// memory, so whatever it looked for may well exist.
pub(crate) fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM))
}

/// Numeric entries of /proc (none when /proc cannot be read).
pub(crate) fn pids() -> Vec<u32> {
    list_pids().unwrap_or_default()
}

fn list_pids() -> io::Result<Vec<u32>> {
    Ok(fs::read_dir("/proc")?.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_cookie() {
        if !crate::testing::root_or_skip("setns") {
            return;
        }
        let a = Netns::own().unwrap();
        let b = Netns::own().unwrap();
        assert_eq!(a.cookie, b.cookie);
        assert_eq!(a.inode, b.inode);
        assert_eq!(current_cookie().unwrap(), a.cookie);
    }

    #[test]
    fn candidates_include_our_own_namespace_once() {
        let own = fs::metadata("/proc/self/ns/net").unwrap().ino();
        let found: Vec<_> = candidates().unwrap().into_iter().filter(|c| c.inode == own).collect();
        assert_eq!(found.len(), 1);
    }
}
