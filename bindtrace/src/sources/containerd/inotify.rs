//! A small inotify watch on containerd's state directory tree: the directory, each namespace
//! directory, and each task directory (its pid file comes after the directory). Only wake-ups
//! matter: every change re-reads the tree, so what an event says is never parsed.
use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use tokio::io::{Interest, unix::AsyncFd};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;

pub(crate) struct Watcher {
    /// What is watched, for the log.
    label: &'static str,
    fd: AsyncFd<OwnedFd>,
    /// Directories asked for (the kernel drops a watch by itself when its directory goes).
    watched: HashSet<PathBuf>,
}

impl Watcher {
    pub(crate) fn new(label: &'static str) -> io::Result<Watcher> {
        // SAFETY: a plain system call; the descriptor it returns is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns; the AsyncFd owns it from here on,
        // and it stays open while registered.
        let fd = unsafe { AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), Interest::READABLE) }?;
        Ok(Watcher { label, fd, watched: HashSet::new() })
    }

    /// Watches `root` and `dirs` under it; while `root` does not exist, its nearest existing
    /// ancestor (containerd makes the state directory when it first runs a task).
    pub(crate) fn watch_tree(&mut self, root: &Path, dirs: &[PathBuf]) {
        let mut want: Vec<&Path> = vec![root];
        want.extend(dirs.iter().map(PathBuf::as_path));
        if !root.is_dir() {
            want = root.ancestors().skip(1).find(|a| a.is_dir()).into_iter().collect();
        }
        // Watches of directories that are gone went with them; asking again is harmless.
        self.watched.retain(|d| d.is_dir());
        for dir in want {
            if self.watched.contains(dir) {
                continue;
            }
            match self.add(dir) {
                Ok(()) => {
                    self.watched.insert(dir.to_owned());
                }
                Err(e) => log::debug!("{}: watching {}: {e}", self.label, dir.display()),
            }
        }
    }

    /// Watches `dir` if it exists and is not watched yet (a few stat calls when nothing is new).
    pub(crate) fn watch_existing(&mut self, dir: &Path) {
        if self.watched.contains(dir) || !dir.is_dir() {
            return;
        }
        // A symlink to a directory already watched (/var/run -> /run) adds nothing new.
        match self.add(dir) {
            Ok(()) => {
                self.watched.insert(dir.to_owned());
            }
            Err(e) => log::debug!("{}: watching {}: {e}", self.label, dir.display()),
        }
    }

    fn add(&self, dir: &Path) -> io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until something under a watched directory changed.
    pub(crate) async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Reads away the queued events (their content does not matter).
    pub(crate) fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer of the size given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                // EAGAIN: drained. A real error shows again at the next wait.
                return;
            }
        }
    }
}
