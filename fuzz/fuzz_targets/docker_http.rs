#![no_main]
//! See `bindtrace::fuzzing::docker_http` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::docker_http(data));
