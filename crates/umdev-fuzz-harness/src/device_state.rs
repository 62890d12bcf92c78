//! Device state blobs as a migration stream delivers them: any bytes, restored
//! into each model (null, edu, vGPU through their PCI function, virtio-gpu).
//! A restore must refuse or accept without panicking; what it accepts must
//! save again, and that blob must restore again (the state is one the device
//! can carry on from).
//!
//! Input: one byte choosing the model (modulo 4), then the blob.

use umdev::memory::GuestMemory;
use umdev::pci::PciFunction;
use umdev::vhost_user::VirtioDevice;
use umdev_virtio_gpu::{GpuConfig, VirtioGpu};

pub(crate) fn pci(model: u8) -> PciFunction {
    let memory = GuestMemory::new(4);
    match model {
        0 => umdev_null::new_function(memory).expect("null"),
        1 => umdev_edu::new_function(memory, 28).expect("edu"),
        _ => {
            let config = umdev_vgpu::VgpuConfig {
                vram_mib: 1,
                ..Default::default()
            };
            umdev_vgpu::new_function(memory, config).expect("vgpu").0
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&model, blob)) = data.split_first() else {
        return;
    };
    match model % 4 {
        3 => {
            let gpu = VirtioGpu::new(GpuConfig {
                num_scanouts: 2,
                max_hostmem: 1 << 20,
                max_resources: 16,
                ..GpuConfig::default()
            });
            if gpu.restore(blob).is_ok() {
                let again = gpu.save().expect("a restored virtio-gpu saves");
                gpu.restore(&again).expect("its own blob restores");
            }
        }
        m => {
            let mut f = pci(m);
            if f.restore(blob).is_ok() {
                let again = f.save().expect("a restored device saves");
                f.restore(&again).expect("its own blob restores");
            }
        }
    }
}

/// One valid blob per model, as seeds.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (m, name) in [(0u8, "null"), (1, "edu"), (2, "vgpu")] {
        let blob = pci(m).save().expect("save");
        let mut input = vec![m];
        input.extend(blob);
        out.push((name, input));
    }
    let gpu = VirtioGpu::new(GpuConfig {
        num_scanouts: 2,
        ..GpuConfig::default()
    });
    let mut input = vec![3];
    input.extend(gpu.save().expect("save"));
    out.push(("virtio-gpu", input));
    out
}
