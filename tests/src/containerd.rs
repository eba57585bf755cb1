//! A private containerd for tests: its own root, state, sockets and plugin directories under a
//! temporary directory (the machine's containerd and Docker's are never touched), an image
//! imported from a busybox rootfs as an OCI archive (no registry), tasks run with `ctr`, and a
//! CNI network of the test's own. Everything is removed on drop, also when a test panics.
//!
//! `ctr run --cni` reads its network from /etc/cni/net.d and its plugins from /opt/cni/bin, with
//! no flag to say otherwise (ctr 1.6), while Debian installs the plugins in /usr/lib/cni. So each
//! `ctr run --cni` runs in a mount namespace of its own where a tmpfs covers /opt (holding a
//! link to /usr/lib/cni) and the test's network directory covers /etc/cni/net.d: nothing is
//! written there, and nothing outside that one command sees it.
use std::{
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Whether containerd, ctr and the CNI plugins are installed (tests fail without them under `CI`).
pub fn available() -> bool {
    let ok = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok("containerd") && ok("ctr") && Path::new("/usr/lib/cni/bridge").exists()
}

/// containerd's namespace for Kubernetes, where the kubelet's tasks live.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// A containerd daemon of the test's own.
pub struct Daemon {
    pub dir: PathBuf,
    child: Child,
    tasks: Vec<String>,
    images: Vec<String>,
    bridges: Vec<String>,
}

impl Daemon {
    /// Starts containerd with everything under a new temporary directory, and waits until its
    /// socket accepts. The CRI plugin is disabled: these tests are the kubelet, through `ctr`.
    pub fn start() -> Daemon {
        let dir = std::env::temp_dir().join(crate::net::unique("containerd-bt"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let daemon = Daemon { dir, child, tasks: Vec::new(), images: Vec::new(), bridges: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(daemon.socket()).is_err() {
            assert!(Instant::now() < deadline, "containerd never opened its socket:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Where this daemon's runtime v2 shims keep their tasks (bindtrace's --containerd-state).
    pub fn task_state_dir(&self) -> PathBuf {
        self.dir.join("state/io.containerd.runtime.v2.task")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr_command(&self, namespace: &str) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket()).args(["--namespace", namespace]).stdin(Stdio::null());
        cmd
    }

    /// `ctr ARGS` in `namespace`, panicking with its stderr on failure; stdout, trimmed.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> String {
        let out = self.ctr_command(namespace).args(args).output().expect("run ctr");
        checked("ctr", args, out)
    }

    /// Imports an image holding Debian's static busybox and a page under /www, named `name`,
    /// from an OCI archive made here; removed with the daemon.
    pub fn import_busybox(&mut self, namespace: &str, name: &str) {
        let archive = self.dir.join("busybox-oci.tar");
        oci_archive(&self.dir.join("image"), name, &archive);
        self.ctr(namespace, &["images", "import", archive.to_str().unwrap()]);
        self.images.push(format!("{namespace}/{name}"));
    }

    /// A CNI bridge network named `name` on bridge `bridge`, addresses from `subnet` (host-local
    /// IPAM keeping its leases under the daemon's directory; no masquerade rule).
    pub fn cni_bridge(&mut self, name: &str, bridge: &str, subnet: &str) {
        let conf = format!(
            r#"{{"cniVersion": "1.0.0", "name": "{name}", "plugins": [{{"type": "bridge", "bridge": "{bridge}",
  "isGateway": true, "ipMasq": false, "ipam": {{"type": "host-local", "subnet": "{subnet}",
  "dataDir": "{}"}}}}]}}"#,
            self.dir.join("ipam").display()
        );
        std::fs::write(self.dir.join("net.d").join("10-test.conflist"), conf).unwrap();
        self.bridges.push(bridge.to_owned());
    }

    /// `ctr run -d [--cni] ARGS IMAGE ID CMD...` in `namespace`: the task is removed on drop.
    pub fn run(&mut self, namespace: &str, cni: bool, args: &[&str], image: &str, id: &str, cmd: &[&str]) {
        let mut all: Vec<&str> = vec!["run", "-d", "--null-io"];
        if cni {
            all.push("--cni");
        }
        all.extend_from_slice(args);
        all.push(image);
        all.push(id);
        all.extend_from_slice(cmd);
        self.tasks.push(format!("{namespace}/{id}"));
        if !cni {
            self.ctr(namespace, &all);
            return;
        }
        // ctr looks for the network and plugins where no test may write: see the module's notes.
        let mut ctr: Vec<String> = vec![
            "ctr".into(),
            "--address".into(),
            self.socket().display().to_string(),
            "--namespace".into(),
            namespace.into(),
        ];
        ctr.extend(all.iter().map(|s| s.to_string()));
        let script = format!(
            "set -e; mount -t tmpfs containerd-bt-opt /opt; mkdir -p /opt/cni; ln -s /usr/lib/cni /opt/cni/bin; \
             mount --bind {} /etc/cni/net.d; exec \"$@\"",
            self.dir.join("net.d").display()
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
            .args(&ctr)
            .stdin(Stdio::null())
            .output()
            .expect("run unshare");
        checked("ctr (in a mount namespace of its own)", &all, out);
    }

    /// The host pid of task `id`'s init process.
    pub fn pid(&self, namespace: &str, id: &str) -> u32 {
        let out = self.ctr(namespace, &["tasks", "ls"]);
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no task {id} in:\n{out}"))
    }

    /// The IPv4 address of `dev` inside task `id`'s network namespace.
    pub fn address(&self, namespace: &str, id: &str, dev: &str) -> IpAddr {
        let pid = self.pid(namespace, id).to_string();
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-n", "ip", "-4", "-o", "addr", "show", "dev", dev])
            .output();
        let text = String::from_utf8_lossy(&out.expect("nsenter").stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 address on {dev} of task {id}: {text:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for task in self.tasks.iter().rev() {
            let (ns, id) = task.split_once('/').unwrap();
            let ctr = |args: &[&str]| {
                let _ = self.ctr_command(ns).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
            };
            ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
            // `delete -f` waits for the task to exit before removing it.
            ctr(&["tasks", "delete", "-f", id]);
            ctr(&["containers", "delete", id]);
        }
        for image in &self.images {
            let (ns, name) = image.split_once('/').unwrap();
            let _ = self.ctr_command(ns).args(["images", "rm", name]).output();
        }
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        for bridge in &self.bridges {
            let _ = Command::new("ip").args(["link", "del", bridge]).stderr(Stdio::null()).status();
        }
        // Snapshot mounts left behind (a task that would not die) would keep the tree busy.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut under: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| Path::new(m).starts_with(&self.dir))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn checked(what: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An OCI image archive (`oci-layout`, `index.json`, blobs) of one uncompressed layer: Debian's
/// static busybox with a few applets and /www/index.html. `name` is what `ctr images import`
/// calls it (the `io.containerd.image.name` annotation).
fn oci_archive(work: &Path, name: &str, archive: &Path) {
    let root = work.join("rootfs");
    let blobs = work.join("layout/blobs/sha256");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
    for applet in ["sh", "httpd", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello from a bindtrace test\n").unwrap();
    let layer = work.join("layer.tar");
    let tar = Command::new("tar")
        .args(["--owner=0", "--group=0", "-C", root.to_str().unwrap(), "-cf", layer.to_str().unwrap(), "."])
        .status()
        .expect("tar");
    assert!(tar.success(), "tar of the rootfs");
    let layer_digest = store(&blobs, &std::fs::read(&layer).unwrap());
    let layer_size = std::fs::metadata(&layer).unwrap().len();
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#,
        oci_arch()
    );
    let config_digest = store(&blobs, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{layer_size}}}]}}"#,
        config.len()
    );
    let manifest_digest = store(&blobs, manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
        manifest.len()
    );
    let layout = work.join("layout");
    std::fs::write(layout.join("index.json"), index).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let tar = Command::new("tar")
        .args([
            "-C",
            layout.to_str().unwrap(),
            "-cf",
            archive.to_str().unwrap(),
            "oci-layout",
            "index.json",
            "blobs",
        ])
        .status()
        .expect("tar");
    assert!(tar.success(), "tar of the OCI layout");
}

/// Writes `data` as a blob named by its SHA-256 (computed by sha256sum); the hex digest.
fn store(blobs: &Path, data: &[u8]) -> String {
    use std::io::Write as _;
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    let digest = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned();
    std::fs::write(blobs.join(&digest), data).unwrap();
    digest
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    }
}
