//! Test harness: network namespaces, veth topologies, listeners, clients and a bindtrace
//! process, each owned by a guard that cleans up on drop (also when a test panics).
//!
//! Every address used lives in namespaces these guards create; nothing leaves the machine.
pub mod bindtrace;
pub mod containerd;
pub mod docker;
pub mod hostile;
pub mod metrics;
pub mod native;
pub mod net;
pub mod podman;
pub mod proc;
pub mod rootless;
pub mod rootless_docker;
pub mod tc_recovery;

pub use bindtrace::{Bindtrace, Hook, listener_pids};
pub use native::NativeListener;
pub use net::{Container, Netns, Topology, connect, snmp_out_rsts};
pub use proc::{Listener, in_ci, is_root, root_or_skip, skip};
