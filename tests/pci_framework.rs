//! The PCI framework through the wire: a test device with every BAR kind, a
//! sparse-mmapped BAR, PCI Express, Power Management and MSI-X, served in-process
//! by `umdev::vfio_user::Server` on a real UNIX socket.

use umdev_testkit as common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::InProcessServer;
use umdev::memory::GuestMemory;
use umdev::pci::{
    BarDef, BarIndex, BarMapping, DeviceContext, MsixLayout, PciDevice, PciDeviceDescription,
    PciFunction, PciIds,
};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::{Client, Server, ServerConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const MSIX_TABLE: u64 = 0x800;
const MSIX_PBA: u64 = 0xc00;
const VECTORS: u16 = 8;

/// BAR0: scratch registers; a write to offset 0 fires message vector `value`.
/// BAR2: 1 MiB, its upper half backend memory mapped by the guest directly.
/// BAR4: I/O ports echoing what was written.
struct TestDevice {
    ctx: DeviceContext,
    regs: [u8; 0x800],
    ports: [u8; 0x100],
    vram: Arc<File>,
}

impl PciDevice for TestDevice {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        match bar {
            0 => data.copy_from_slice(&self.regs[o..o + data.len()]),
            4 => data.copy_from_slice(&self.ports[o..o + data.len()]),
            // The mmapped half, if read by message: the backend memory itself.
            2 if offset >= 0x8_0000 => {
                use std::os::unix::fs::FileExt;
                if self.vram.read_exact_at(data, offset).is_err() {
                    data.fill(0xff);
                }
            }
            _ => data.fill(0x5a),
        }
    }
    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) {
        let o = offset as usize;
        match bar {
            0 if offset == 0 => self.ctx.irq.notify(u32::from(data[0])),
            0 => self.regs[o..o + data.len()].copy_from_slice(data),
            4 => self.ports[o..o + data.len()].copy_from_slice(data),
            _ => {}
        }
    }
    fn reset(&mut self) {
        self.regs.fill(0);
    }
    fn bar_mapping(&self, bar: BarIndex) -> Option<BarMapping> {
        (bar == 2).then(|| BarMapping {
            file: self.vram.clone(),
            file_offset: 0,
            areas: vec![(0x8_0000, 0x8_0000)],
        })
    }
}

fn description() -> PciDeviceDescription {
    PciDeviceDescription {
        ids: PciIds {
            vendor_id: 0x1b36,
            device_id: 0x00ff,
            class_code: 0x120000,
            interrupt_pin: 1,
            ..Default::default()
        },
        bars: [
            Some(BarDef::memory32(0x1000, false)),
            None,
            Some(BarDef::memory64(0x10_0000, true)),
            None,
            Some(BarDef::io(0x100)),
            None,
        ],
        msi_vectors: 0,
        msix: Some(MsixLayout {
            vectors: VECTORS,
            bar: 0,
            table_offset: MSIX_TABLE,
            pba_offset: MSIX_PBA,
        }),
        pcie: true,
        power_management: true,
        ..Default::default()
    }
}

struct Running {
    /// First, so that it stops before the client goes.
    _server: InProcessServer,
    client: Client,
}

fn start() -> Running {
    let vram = umdev::memory::memfd("vram", 0x10_0000).unwrap();
    let vram = Arc::new(vram);
    let function = PciFunction::new(description(), GuestMemory::new(16), |ctx| {
        Box::new(TestDevice {
            ctx,
            regs: [0; 0x800],
            ports: [0; 0x100],
            vram: vram.clone(),
        })
    })
    .unwrap();
    let server = InProcessServer::start(Server::new(function, ServerConfig::default()));
    let client = Client::connect(&server.path).unwrap();
    Running {
        _server: server,
        client,
    }
}

fn cfg_u32(c: &mut Client, at: u64) -> u32 {
    c.read_u32(CONFIG, at).unwrap()
}

/// Walks the capability list: (id, offset) pairs.
fn capabilities(c: &mut Client) -> Vec<(u8, u64)> {
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    let mut at = cfg[0x34] as usize;
    let mut caps = Vec::new();
    while at != 0 && caps.len() < 16 {
        caps.push((cfg[at], at as u64));
        at = cfg[at + 1] as usize;
    }
    caps
}

#[test]
fn bar_sizing_for_every_kind() {
    let mut r = start();
    let c = &mut r.client;
    for bar in 0..6u64 {
        c.write_u32(CONFIG, 0x10 + 4 * bar, u32::MAX).unwrap();
    }
    assert_eq!(cfg_u32(c, 0x10), 0xffff_f000, "32-bit 4 KiB");
    assert_eq!(cfg_u32(c, 0x14), 0);
    assert_eq!(
        cfg_u32(c, 0x18),
        0xfff0_000c,
        "64-bit prefetchable 1 MiB, low"
    );
    assert_eq!(cfg_u32(c, 0x1c), 0xffff_ffff, "64-bit, high");
    assert_eq!(cfg_u32(c, 0x20), 0xffff_ff01, "I/O 256 bytes");
    assert_eq!(cfg_u32(c, 0x24), 0);
    assert_eq!(
        c.region_info(CONFIG).unwrap().info.size,
        4096,
        "PCIe config space"
    );
    let ids: Vec<u8> = capabilities(c).iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [0x01, 0x11, 0x10], "PM, MSI-X, PCIe");
}

#[test]
fn decoding_follows_the_command_register() {
    let mut r = start();
    let c = &mut r.client;
    c.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
    assert_eq!(c.region_read(0, 0x10, 4).unwrap(), [0xff; 4]);
    c.region_write(4, 0, &[9]).unwrap();
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    c.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
    assert_eq!(c.region_read(0, 0x10, 4).unwrap(), [1, 2, 3, 4]);
    assert_eq!(
        c.region_read(4, 0, 1).unwrap(),
        [0xff],
        "I/O space still off"
    );
    c.region_write(CONFIG, 0x04, &0x0003u16.to_le_bytes())
        .unwrap();
    c.region_write(4, 0, &[9]).unwrap();
    assert_eq!(c.region_read(4, 0, 1).unwrap(), [9]);
    // Read-only bits stay put; the command register keeps only writable bits.
    c.region_write(CONFIG, 0x00, &[0, 0, 0, 0]).unwrap();
    assert_eq!(cfg_u32(c, 0), 0x00ff_1b36);
    c.region_write(CONFIG, 0x04, &0xffffu16.to_le_bytes())
        .unwrap();
    assert_eq!(c.read_u32(CONFIG, 0x04).unwrap() & 0xffff, 0x0547);
}

#[test]
fn sparse_mmap_region_hands_out_its_fd() {
    let mut r = start();
    let c = &mut r.client;
    let bar2 = c.region_info(2).unwrap();
    assert_eq!(bar2.info.size, 0x10_0000);
    let want = REGION_INFO_FLAG_READ
        | REGION_INFO_FLAG_WRITE
        | REGION_INFO_FLAG_MMAP
        | REGION_INFO_FLAG_CAPS;
    assert_eq!(bar2.info.flags, want);
    assert_eq!(
        bar2.sparse_areas,
        [SparseMmapArea {
            offset: 0x8_0000,
            size: 0x8_0000
        }]
    );
    let fd = bar2.fd.expect("fd with the reply");
    // The area maps: what we write there is backend memory.
    // SAFETY: maps 4 KiB of the region's fd at the sparse area's offset; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0x8_0000,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping([0x42u8, 0x43, 0x44, 0x45].as_ptr(), p as *mut u8, 4);
        libc::munmap(p, 4096);
    }
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    // Read back by REGION_READ (which the server gives to the device): the
    // bytes written through the mapping, in the backend's memory.
    assert_eq!(
        c.region_read(2, 0x8_0000, 4).unwrap(),
        [0x42, 0x43, 0x44, 0x45]
    );
    // The trapped half goes to the model.
    assert_eq!(c.region_read(2, 0x10, 2).unwrap(), [0x5a, 0x5a]);
}

fn set_vector_fds(c: &mut Client) -> Vec<EventFd> {
    let fds: Vec<EventFd> = (0..VECTORS)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raw: Vec<i32> = fds.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(
        2,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        0,
        VECTORS as u32,
        &raw,
        &[],
    )
    .unwrap();
    fds
}

fn msix_control(c: &mut Client, value: u16) {
    let (_, at) = capabilities(c)
        .into_iter()
        .find(|&(id, _)| id == 0x11)
        .unwrap();
    c.region_write(CONFIG, at + 2, &value.to_le_bytes())
        .unwrap();
}

fn pba(c: &mut Client) -> u64 {
    c.read_u64(0, MSIX_PBA).unwrap()
}

#[test]
fn msix_vectors_masks_and_pending_bits() {
    let mut r = start();
    let c = &mut r.client;
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    let info = c.irq_info(2).unwrap();
    assert_eq!(info.count, VECTORS as u32);
    assert!(info.flags & IRQ_INFO_MASKABLE != 0);
    let fds = set_vector_fds(c);
    // Disabled: nothing is delivered.
    c.region_write(0, 0, &[3]).unwrap();
    assert!(fds[3].read().is_err());
    msix_control(c, 0x8000);
    c.region_write(0, 0, &[3]).unwrap();
    assert_eq!(fds[3].read().unwrap(), 1);

    // Per-vector mask through SET_IRQS (how a table-emulating VMM masks).
    c.set_irqs(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 3, 1, &[], &[])
        .unwrap();
    c.region_write(0, 0, &[3]).unwrap();
    assert!(fds[3].read().is_err());
    assert_eq!(pba(c), 1 << 3);
    c.unmask_irq(2, 3).unwrap();
    assert_eq!(fds[3].read().unwrap(), 1, "pending vector fires on unmask");
    assert_eq!(pba(c), 0);

    // Function mask in the capability.
    msix_control(c, 0xc000);
    c.region_write(0, 0, &[6]).unwrap();
    assert!(fds[6].read().is_err());
    assert_eq!(pba(c), 1 << 6);
    msix_control(c, 0x8000);
    assert_eq!(fds[6].read().unwrap(), 1);

    // A client that programs our table is bound by its Vector Control bits.
    let entry = MSIX_TABLE + 16 * 5;
    c.write_u32(0, entry, 0xfee0_0000).unwrap();
    c.write_u32(0, entry + 8, 0x4025).unwrap();
    c.write_u32(0, entry + 12, 1).unwrap();
    assert_eq!(c.read_u32(0, entry + 8).unwrap(), 0x4025);
    c.region_write(0, 0, &[5]).unwrap();
    assert!(fds[5].read().is_err());
    assert_eq!(pba(c), 1 << 5);
    c.write_u32(0, entry + 12, 0).unwrap();
    assert_eq!(fds[5].read().unwrap(), 1);
    // PBA writes are ignored; unaligned table accesses read zero.
    c.write_u64(0, MSIX_PBA, u64::MAX).unwrap();
    assert_eq!(pba(c), 0);
    assert_eq!(c.region_read(0, entry + 1, 2).unwrap(), [0, 0]);

    // De-assigning with no fds: the vector stays quiet.
    let trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
    c.set_irqs(2, trigger, 1, 1, &[], &[]).unwrap();
    c.region_write(0, 0, &[1]).unwrap();
    assert!(fds[1].read().is_err());
    // DATA_BOOL trigger loops back through the eventfd.
    c.set_irqs(
        2,
        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
        6,
        2,
        &[],
        &[1, 0],
    )
    .unwrap();
    assert_eq!(fds[6].read().unwrap(), 1);
    assert!(fds[7].read().is_err());
}

#[test]
fn reset_masks_everything_again() {
    let mut r = start();
    let c = &mut r.client;
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    let fds = set_vector_fds(c);
    msix_control(c, 0x8000);
    c.reset().unwrap();
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    c.region_write(0, 0, &[2]).unwrap();
    assert!(fds[2].read().is_err(), "MSI-X disabled by reset");
    assert_eq!(c.read_u32(CONFIG, 0x04).unwrap() & 0xffff, 0x0002);
}
