//! A VNC viewer sending anything: handshake and session on the server's
//! side; an error ends the viewer, nothing panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::vnc::run(data);
});
