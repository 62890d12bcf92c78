//! Config-space, BAR and interrupt operations against a PciFunction with every
//! capability and BAR kind, with the PCI invariants checked after each step.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::pci_config::run(data);
});
