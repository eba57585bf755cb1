#![no_main]
//! See `bindtrace::fuzzing::hint_argv` for the input and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| bindtrace::fuzzing::hint_argv(data));
