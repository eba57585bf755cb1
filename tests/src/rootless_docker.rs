//! A rootless Docker daemon of a test user ([`crate::rootless::User`]): Debian's
//! `dockerd-rootless.sh` run directly as that user (no systemd user session exists here), with
//! RootlessKit (slirp4netns network, builtin port driver), its API on
//! /run/user/UID/docker.sock. Its docker0 lives in RootlessKit's network namespace and gets a
//! `--bip` of its own, so that it never looks like the host's docker0 in a test.
//!
//! Undone on drop, also when a test panics: every container removed, the daemon's processes
//! ended (RootlessKit and its children by pid), its image with the user's home.
use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{docker::unique_name, rootless::User};

/// Debian's docker.io ships the script here (not on PATH).
pub const DOCKERD_ROOTLESS: &str = "/usr/share/docker.io/contrib/dockerd-rootless.sh";
/// The rootless daemon's bridge address: a range of this test's own (the host's docker0 has
/// 172.17.0.1/16, which rootless Docker would reuse).
pub const BIP: &str = "10.201.0.1/24";

/// What the rootless Docker test needs and is missing (it fails without it under `CI`).
pub fn available() -> Option<&'static str> {
    for (path, what) in [
        ("/usr/sbin/dockerd", "docker.io"),
        (DOCKERD_ROOTLESS, "docker.io (dockerd-rootless.sh)"),
        ("/usr/bin/rootlesskit", "rootlesskit"),
        ("/usr/bin/slirp4netns", "slirp4netns"),
        ("/usr/bin/newuidmap", "uidmap"),
        ("/usr/bin/setfacl", "acl"),
        ("/usr/sbin/useradd", "passwd (useradd)"),
        ("/bin/busybox", "busybox-static"),
    ] {
        if !Path::new(path).exists() {
            return Some(what);
        }
    }
    None
}

/// The user's rootless dockerd; stopped on drop (before the user goes).
pub struct Daemon<'a> {
    user: &'a User,
    pub socket: PathBuf,
    child: Child,
}

impl<'a> Daemon<'a> {
    /// Starts `dockerd-rootless.sh` as `user` and waits until its API answers. overlay2 works
    /// in a user namespace on this kernel; the nofile limit is what this host's hard limit
    /// allows (dockerd's default for containers is higher, and root here lacks
    /// CAP_SYS_RESOURCE).
    pub fn start(user: &'a User) -> Daemon<'a> {
        Self::start_with(user, &[])
    }

    /// [`Daemon::start`] with more dockerd flags (e.g. `--userland-proxy=false`).
    pub fn start_with(user: &'a User, extra: &[&str]) -> Daemon<'a> {
        let socket = user.runtime_dir.join("docker.sock");
        let mut args =
            vec!["--bip", BIP, "--storage-driver", "overlay2", "--default-ulimit", "nofile=1024:1024"];
        args.extend_from_slice(extra);
        let log = fs::File::create(user.home.join("dockerd.log")).unwrap();
        let child = user
            .command(DOCKERD_ROOTLESS, &args)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd-rootless.sh as the test user");
        let mut daemon = Daemon { user, socket, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(&daemon.socket).is_ok() && daemon.docker(&["version"]).status.success() {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("dockerd-rootless.sh exited ({status}): {}", daemon.log());
            }
            assert!(Instant::now() < deadline, "the rootless dockerd never answered: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    pub fn path(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        let text = fs::read_to_string(self.user.home.join("dockerd.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// dockerd's pid, as `$XDG_RUNTIME_DIR/docker.pid` says (a host pid: RootlessKit makes no
    /// pid namespace); its network namespace is RootlessKit's.
    pub fn pid(&self) -> u32 {
        fs::read_to_string(self.user.runtime_dir.join("docker.pid")).unwrap().trim().parse().unwrap()
    }

    /// `docker ARGS` as the user, against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.user
            .command("docker", args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .output()
            .expect("run docker as the test user")
    }

    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {} (rootless, as {}): {}",
            args.join(" "),
            self.user.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Debian's static busybox and a page under /www, imported from a tar built here (no
    /// registry, the machine's own daemon untouched). Goes with the user's home.
    pub fn busybox_image(&self) -> String {
        let tag = format!("{}:busybox", unique_name("rdimg"));
        let root = std::env::temp_dir().join(unique_name("rdrootfs"));
        for dir in ["bin", "www", "tmp"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
        for applet in ["sh", "httpd", "sleep", "wget"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(root.join("www/index.html"), "hello from a bindtrace test\n").unwrap();
        let tar = root.with_extension("tar");
        let out = std::process::Command::new("tar")
            .args(["-C", root.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."])
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&root);
        assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
        fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).unwrap();
        let out = self.docker(&["import", tar.to_str().unwrap(), &tag]);
        let _ = fs::remove_file(&tar);
        assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
        tag
    }

    /// `docker run -d` against this daemon; removed on drop.
    pub fn run(&self, image: &str, opts: &[&str], cmd: &[&str]) -> Container<'_> {
        let name = unique_name("rdctr");
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(opts);
        args.push(image);
        args.extend_from_slice(cmd);
        let id = self.docker_ok(&args);
        Container { daemon: self, name, id }
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds. Containers first (their
        // processes run as subordinate ids, which the user's own clean-up does not end), then
        // RootlessKit, whose end takes dockerd, containerd and its namespaces with it.
        if let Ok(out) = self
            .user
            .command("docker", &["ps", "-aq"])
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .stderr(Stdio::null())
            .output()
        {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("the rootless dockerd did not stop on SIGTERM: killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A container of the rootless daemon, removed on drop.
pub struct Container<'a> {
    daemon: &'a Daemon<'a>,
    pub name: String,
    pub id: String,
}

impl Container<'_> {
    pub fn inspect(&self, format: &str) -> String {
        self.daemon.docker_ok(&["inspect", "--format", format, &self.name])
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Host pid of the main process.
    pub fn pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    /// Waits until the container's main process listens on `port`; panics after 10 s.
    pub fn wait_listening(&self, port: u16) {
        let pid = self.pid();
        let want = format!(":{port:04X} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening = ["tcp", "tcp6"].iter().any(|t| {
                fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.split_whitespace().nth(3) == Some("0A") && l.contains(&want))
            });
            if listening {
                return;
            }
            assert!(Instant::now() < deadline, "{} never listened on {port}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.daemon.docker(&["rm", "-f", &self.name]);
    }
}
