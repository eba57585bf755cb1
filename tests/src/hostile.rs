//! A tenant's program for the hostile-input tests (tests/helpers/hostile.c), built static with
//! the system's C compiler on first use, so it also runs inside a busybox image.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
};

/// The static `hostile` binary (built once per test process).
pub fn helper() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = concat!(env!("CARGO_MANIFEST_DIR"), "/helpers/hostile.c");
            let out = std::env::temp_dir().join(format!("bindtrace-hostile-{}", std::process::id()));
            let cc = Command::new("cc")
                .args(["-static", "-O2", "-o"])
                .arg(&out)
                .arg(src)
                .output()
                .expect("cc (gcc and libc6-dev are installed by ./x setup)");
            assert!(cc.status.success(), "building {src}: {}", String::from_utf8_lossy(&cc.stderr));
            out
        })
        .clone()
}

/// `hostile listen ADDR PORT ARGS...` in namespace `ns`, killed on drop.
pub struct HostileListener {
    child: Child,
}

impl HostileListener {
    pub fn start(ns: &str, addr: &str, port: u16, args: &[&str]) -> HostileListener {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(helper())
            .args(["listen", addr, &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the hostile listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read hostile listener");
        assert_eq!(line.trim(), "listening", "hostile listener on {addr}:{port} did not start");
        HostileListener { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HostileListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
