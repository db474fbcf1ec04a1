//! `cargo +nightly fuzz run checkpoint`: the checkpoint loader.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    paramd::fuzzing::checkpoint(data);
});
