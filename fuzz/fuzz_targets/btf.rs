#![no_main]
//! See `bindtrace::fuzzing::btf` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::btf(data));
