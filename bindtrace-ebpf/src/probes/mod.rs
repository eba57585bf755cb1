//! One file per kernel hook.
mod kfree_skb;
mod receive_reset;
mod sock_set_state;
mod tc;
mod tcp_send_reset;
mod udp_connect;
