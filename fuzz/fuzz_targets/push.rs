//! `cargo +nightly fuzz run push`: push decoding and validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    paramd::fuzzing::push(data);
});
