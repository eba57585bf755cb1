#![no_main]
//! See `bindtrace::fuzzing::proc_files` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::proc_files(data));
