#![no_main]
//! See `bindtrace::fuzzing::netlink_route` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::netlink_route(data));
