//! Engine sockets that appear after start: rootful podman's `RUN/podman/podman.sock` (a
//! `podman system service` or the `podman.socket` unit started later) and each user's
//! `RUN/user/UID/podman/podman.sock` (rootless podman) and `RUN/user/UID/docker.sock`
//! (rootless Docker); `/run/user/UID` itself appears at the user's login, as a tmpfs mounted
//! there.
//!
//! A thread waits, without a timeout, on two things: inotify on every directory along those
//! paths that exists (a new `podman`, `user/UID` or `podman.sock` entry), and the mount table
//! (`/proc/self/mountinfo` signals POLLPRI when a mount comes or goes: a tmpfs mounted on
//! `/run/user/UID` hides the directory watched until then, so the watches are set again on the
//! new one). After each wake-up it sets the watches again and sends every socket found that it
//! has not sent before. Once sent, a socket is followed by its own follower, which retries
//! while the service is away, so nothing here needs to see it go.
use std::{
    collections::BTreeSet,
    ffi::CString,
    fs,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::FileTypeExt as _},
    },
    path::{Path, PathBuf},
};

use tokio::sync::mpsc;

/// Where runtime sockets live unless `--run-dir` says otherwise.
pub(crate) const DEFAULT_RUN_DIR: &str = "/run";

/// The paths of podman's sockets under one run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Places {
    root: PathBuf,
}

impl Places {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Places {
        Places { root: root.into() }
    }

    /// Rootful podman's socket.
    pub(crate) fn rootful(&self) -> PathBuf {
        self.root.join("podman/podman.sock")
    }

    /// `user/UID` directories that exist now (numeric names only).
    fn users(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.root.join("user")) else { return Vec::new() };
        let mut out: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path())
            .collect();
        out.sort();
        out
    }

    /// Every directory whose new entries may lead to a socket, those that exist now.
    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.root.clone(), self.root.join("podman"), self.root.join("user")];
        for user in self.users() {
            dirs.push(user.join("podman"));
            dirs.push(user);
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// The sockets that exist now: rootful podman's, then each user's podman and rootless
    /// Docker sockets (`dockerd-rootless.sh` serves `$XDG_RUNTIME_DIR/docker.sock`).
    pub(crate) fn sockets(&self) -> Vec<PathBuf> {
        let mut found = vec![self.rootful()];
        for user in self.users() {
            found.push(user.join("podman/podman.sock"));
            found.push(user.join("docker.sock"));
        }
        found.retain(|p| fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()));
        found
    }
}

/// Starts the watching thread; it sends each socket of `places` that appears and is not in
/// `known` (those already followed), including those that exist now.
pub(crate) fn spawn(places: Places, known: Vec<PathBuf>) -> io::Result<mpsc::UnboundedReceiver<PathBuf>> {
    let inotify = Inotify::new()?;
    let mountinfo = fs::File::open("/proc/self/mountinfo")?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("socket-watch".into())
        .spawn(move || watch(places, known.into_iter().collect(), inotify, mountinfo, tx))?;
    Ok(rx)
}

fn watch(
    places: Places,
    mut sent: BTreeSet<PathBuf>,
    inotify: Inotify,
    mut mountinfo: fs::File,
    tx: mpsc::UnboundedSender<PathBuf>,
) {
    loop {
        // Until the set is stable: a directory made between listing and watching its parent
        // would otherwise send no event.
        let mut dirs = places.dirs();
        loop {
            for dir in &dirs {
                // A directory that went away meanwhile is simply not watched.
                let _ = inotify.add(dir);
            }
            let again = places.dirs();
            if again == dirs {
                break;
            }
            dirs = again;
        }
        for socket in places.sockets() {
            if sent.insert(socket.clone()) && tx.send(socket).is_err() {
                return;
            }
        }
        let mut fds = [
            libc::pollfd { fd: inotify.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: mountinfo.as_raw_fd(), events: libc::POLLPRI, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("watching for podman sockets stopped ({e}); a socket made later needs a restart");
            return;
        }
        if fds[0].revents != 0 {
            inotify.drain();
        }
        if fds[1].revents != 0 {
            // The poll itself re-arms the mount table's event; reading keeps the file at a
            // consistent place and costs one small read per mount change.
            let mut sink = Vec::new();
            let _ = io::Seek::seek(&mut mountinfo, io::SeekFrom::Start(0));
            let _ = mountinfo.read_to_end(&mut sink);
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// An inotify instance (non-blocking, so that draining it never waits).
struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    fn new() -> io::Result<Inotify> {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Inotify { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Watches `dir` for new entries (created, moved in) and for its own end. Adding a
    /// directory already watched only refreshes its watch.
    fn add(&self, dir: &Path) -> io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_DELETE_SELF | libc::IN_ONLYDIR;
        // SAFETY: `path` is a valid C string for the duration of the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads every queued event: which one it was does not matter, the caller looks again.
    fn drain(&self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::net::UnixListener, time::Duration};

    fn temp_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("bindtrace-appear-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn places_list_the_rootful_and_each_users_socket() {
        let root = temp_root("places");
        let places = Places::new(&root);
        assert!(places.sockets().is_empty());
        assert_eq!(places.dirs(), vec![root.clone()]);
        fs::create_dir_all(root.join("podman")).unwrap();
        fs::create_dir_all(root.join("user/1000/podman")).unwrap();
        fs::create_dir_all(root.join("user/not-a-uid/podman")).unwrap();
        let _rootful = UnixListener::bind(root.join("podman/podman.sock")).unwrap();
        let _user = UnixListener::bind(root.join("user/1000/podman/podman.sock")).unwrap();
        let _other = UnixListener::bind(root.join("user/not-a-uid/podman/podman.sock")).unwrap();
        let _docker = UnixListener::bind(root.join("user/1000/docker.sock")).unwrap();
        // A plain file of that name is not a socket.
        fs::create_dir_all(root.join("user/1001/podman")).unwrap();
        fs::write(root.join("user/1001/podman/podman.sock"), "").unwrap();
        assert_eq!(
            places.sockets(),
            vec![
                root.join("podman/podman.sock"),
                root.join("user/1000/podman/podman.sock"),
                root.join("user/1000/docker.sock")
            ]
        );
        assert!(places.dirs().contains(&root.join("user/1000/podman")));
        assert!(!places.dirs().contains(&root.join("user/not-a-uid")));
        fs::remove_dir_all(&root).unwrap();
    }

    /// The thread sends a socket made after it started, down a directory chain that did not
    /// exist either, and not one it was told is known.
    #[test]
    fn a_socket_made_later_is_sent() {
        let root = temp_root("later");
        fs::create_dir_all(root.join("podman")).unwrap();
        let known = root.join("podman/podman.sock");
        let _known = UnixListener::bind(&known).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut rx = spawn(Places::new(&root), vec![known.clone()]).unwrap();
            fs::create_dir_all(root.join("user/1234/podman")).unwrap();
            let path = root.join("user/1234/podman/podman.sock");
            let _l = UnixListener::bind(&path).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
            assert_eq!(got, Some(path));
        });
        fs::remove_dir_all(&root).unwrap();
    }
}
