//! bindtrace: finds connections to containers refused because the service inside listens on
//! loopback (or the wrong address, family or port), as they happen, and says how to fix it.
//!
//! One module per concern; `main.rs` only parses arguments and calls [`run`].
pub mod audit;
pub mod btf;
pub mod check;
pub mod cli;
pub mod connect;
pub mod conntrack;
pub mod docker;
pub mod enrich;
pub mod fold;
pub mod framework;
pub mod hint;
pub mod hook;
pub mod kernel_layout;
pub mod listen_diag;
pub mod loader;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod output;
pub mod privileges;
pub mod prog_info;
pub mod report;
pub mod run;
pub mod scope;
pub mod sock_layout;
pub mod sockets;
pub mod tc;
pub mod timer;
pub mod verdict;
pub mod via;
