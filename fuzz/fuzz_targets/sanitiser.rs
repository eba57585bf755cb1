#![no_main]
//! See `bindtrace::fuzzing::sanitiser` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::sanitiser(data));
