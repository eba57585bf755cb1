#![no_main]
//! See `bindtrace::fuzzing::sock_diag` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::sock_diag(data));
