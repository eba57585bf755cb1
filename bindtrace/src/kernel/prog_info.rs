//! What the kernel knows about our loaded program that aya 0.14 does not expose:
//! `recursion_misses`, the number of times the program was skipped because it was already
//! running on that CPU (a tracing program does not nest). Refusals among those skips are not
//! counted, so bindtrace reports this number rather than let the counts look exact when they
//! are not.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Larger than any kernel's `struct bpf_prog_info`; the tail stays zero, as the kernel requires.
const INFO_BUF: usize = 512;

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Reads `recursion_misses` at `offset` (from BTF) in the program's `bpf_prog_info`.
pub(crate) fn recursion_misses(prog: BorrowedFd<'_>, offset: u32) -> io::Result<u64> {
    let mut info = [0u8; INFO_BUF];
    let mut attr = InfoByFdAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: INFO_BUF as u32,
        info: info.as_mut_ptr() as u64,
    };
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoByFdAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let start = offset as usize;
    let end = start + 8;
    if end > attr.info_len as usize {
        return Err(io::Error::other("bpf_prog_info is shorter than BTF says"));
    }
    let bytes: [u8; 8] = info[start..end].try_into().expect("8 bytes");
    Ok(u64::from_ne_bytes(bytes))
}
