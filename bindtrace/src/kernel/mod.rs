//! The kernel side's loading: the running kernel's BTF, the offsets and enum values the eBPF
//! programs need, which hook to attach, the loaded object and its maps, the tc attachments,
//! and the privileges all that takes.
pub(crate) mod btf;
pub(crate) mod clock;
pub(crate) mod counts;
pub(crate) mod hook;
pub(crate) mod layout;
pub(crate) mod loader;
pub(crate) mod privileges;
pub(crate) mod prog_info;
pub(crate) mod sock_layout;
pub(crate) mod tc;
pub(crate) mod tc_instance;
