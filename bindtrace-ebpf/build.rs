//! The bpfel target links through bpf-linker, a binary cargo does not know about: rebuild when it
//! changes, and fail with a remedy rather than a linker error when it is missing.
fn main() {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file());
    match found {
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None => panic!(
            "bpf-linker is not on PATH: run `sudo ./x setup` from the repository root \
             (it installs bpf-linker 0.13 built against Debian's LLVM 22)"
        ),
    }
}
