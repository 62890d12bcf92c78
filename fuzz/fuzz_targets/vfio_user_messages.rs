//! A valid VERSION, then well-framed messages built from the input
//! (`umdev_fuzz::session::messages_to_bytes`), against a whole server session.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::session::run_messages(data);
});
