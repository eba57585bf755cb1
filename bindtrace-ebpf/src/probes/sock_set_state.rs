//! `tp_btf/inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
//!
//! Not a refusal hook: the connect tracker's parking (see `connect.rs`), attached by userspace
//! only once a refused connect's reset was processed outside its connecting task. It runs on
//! every TCP state change of the host, so the first tests are on the two state arguments
//! (registers): only CLOSE -> SYN_SENT (a `connect()`) and SYN_SENT's way out go further.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use bindtrace_common::{TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT};

use crate::connect;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bt_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let old: u32 = ctx.arg(1);
    let new: u32 = ctx.arg(2);
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        connect::started(ctx.arg(0));
    } else if old == TCP_SYN_SENT && new == TCP_CLOSE {
        connect::closed(ctx.arg(0));
    } else if old == TCP_SYN_SENT && new == TCP_ESTABLISHED {
        connect::established(ctx.arg(0));
    }
    0
}
