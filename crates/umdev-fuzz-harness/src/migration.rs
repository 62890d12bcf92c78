//! Migration streams as MIG_DATA_WRITE delivers them to a destination in
//! RESUMING, cut into pieces of any size, then the arc to STOP that restores
//! the image. Whatever the bytes: an error (the device in RESUMING or ERROR)
//! or a restored device that migrates out again; never a panic, never an
//! allocation past the image limit.
//!
//! Input: one byte choosing the PCI model (modulo 3), one byte the piece
//! size (0 counts as 1), then the stream.

use umdev::migration::{DeviceMigration, MigrationState, MIGRATION_FLAGS};

use crate::device_state::pci;

/// The largest image the fuzzed destination accepts.
const MAX_IMAGE: u64 = 16 << 20;

pub fn run(data: &[u8]) {
    let [model, piece, stream @ ..] = data else {
        return;
    };
    let mut f = pci(*model % 3);
    let mut m = DeviceMigration::new(MIGRATION_FLAGS, MAX_IMAGE);
    m.set_state(MigrationState::Resuming, &mut f)
        .expect("RUNNING -> RESUMING");
    for p in stream.chunks(usize::from(*piece).max(1)) {
        if m.write(p).is_err() {
            assert_eq!(m.state(), MigrationState::Error);
            return;
        }
    }
    match m.set_state(MigrationState::Stop, &mut f) {
        Ok(()) => {
            m.set_state(MigrationState::StopCopy, &mut f)
                .expect("a restored device saves");
            let out = m.read(usize::MAX, &f).expect("STOP_COPY data");
            assert!(out.len() > 8, "a stream with the restored state");
        }
        Err(_) => assert!(matches!(
            m.state(),
            MigrationState::Resuming | MigrationState::Error
        )),
    }
}

/// A complete stream per PCI model, as its source sends it.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    [(0u8, "null"), (1, "edu"), (2, "vgpu")]
        .into_iter()
        .map(|(model, name)| {
            let mut f = pci(model);
            let mut m = DeviceMigration::default();
            m.set_state(MigrationState::StopCopy, &mut f).expect("save");
            let mut input = vec![model, 200];
            input.extend(m.read(usize::MAX, &f).expect("stream"));
            (name, input)
        })
        .collect()
}
