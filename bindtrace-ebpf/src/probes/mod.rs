//! One file per kernel hook.
mod kfree_skb;
mod sock_set_state;
mod tcp_send_reset;
