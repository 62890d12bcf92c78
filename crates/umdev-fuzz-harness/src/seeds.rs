//! The hand-made seed inputs in `fuzz/corpus/<target>/`, built from the wire
//! structs so that they are valid sessions. `examples/write_seeds.rs` writes them;
//! `tests/fuzz_corpus.rs` (root workspace) replays them with everything else.

use umdev::vfio_user::wire::*;

use crate::session::{messages_to_bytes, record};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;

fn access(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(data);
    p
}

/// A command record that asks for a reply.
fn request(command: Command, payload: &[u8]) -> Vec<u8> {
    record(command as u16, 0, payload)
}

fn read(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let access = RegionAccess {
        offset,
        region,
        count,
    };
    request(Command::RegionRead, access.as_bytes())
}

fn write(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    request(Command::RegionWrite, &access(region, offset, data))
}

fn posted(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    record(
        Command::RegionWrite as u16,
        1,
        &access(region, offset, data),
    )
}

fn enable() -> Vec<u8> {
    // Memory space and bus master.
    write(CONFIG, 4, &0x0006u16.to_le_bytes())
}

fn dma_map(address: u64, size: u64) -> Vec<u8> {
    let m = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        address,
        size,
    };
    request(Command::DmaMap, m.as_bytes())
}

fn dma_unmap(address: u64, size: u64, flags: u32) -> Vec<u8> {
    let u = DmaUnmap {
        argsz: 24,
        flags,
        address,
        size,
    };
    request(Command::DmaUnmap, u.as_bytes())
}

fn set_irqs(index: u32, flags: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = IrqSet {
        argsz: (20 + data.len()) as u32,
        flags,
        index,
        start,
        count,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(data);
    request(Command::DeviceSetIrqs, &p)
}

/// Structured records (`vfio_user_messages` inputs), by name.
pub fn message_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    seeds.push(("empty", Vec::new()));

    let info = DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    let mut discovery = request(Command::DeviceGetInfo, info.as_bytes());
    for index in 0..9 {
        let ri = RegionInfo {
            argsz: 32,
            index,
            ..Default::default()
        };
        discovery.extend(request(Command::DeviceGetRegionInfo, ri.as_bytes()));
        let io = RegionIoFds {
            argsz: 16,
            index,
            ..Default::default()
        };
        discovery.extend(request(Command::DeviceGetRegionIoFds, io.as_bytes()));
    }
    for index in 0..5 {
        let ii = IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        discovery.extend(request(Command::DeviceGetIrqInfo, ii.as_bytes()));
    }
    discovery.extend(read(CONFIG, 0, 256));
    seeds.push(("discovery", discovery));

    let mut registers = enable();
    registers.extend(read(BAR0, 0, 4));
    registers.extend(write(BAR0, 4, &0x1234_5678u32.to_le_bytes()));
    registers.extend(read(BAR0, 4, 4));
    registers.extend(write(BAR0, 0x20, &0x80u32.to_le_bytes()));
    registers.extend(write(BAR0, 8, &5u32.to_le_bytes()));
    registers.extend(read(BAR0, 0x20, 4));
    registers.extend(read(BAR0, 8, 4));
    registers.extend(posted(BAR0, 0x60, &1u32.to_le_bytes()));
    registers.extend(posted(BAR0, 0x64, &1u32.to_le_bytes()));
    registers.extend(read(BAR0, 0x24, 4));
    let mut multi = (2u64).to_le_bytes().to_vec();
    for (offset, value) in [(4u64, 7u32), (0x60, 0x100)] {
        let mut data = [0u8; WRITE_MULTI_DATA];
        data[..4].copy_from_slice(&value.to_le_bytes());
        let e = WriteMultiEntry {
            offset,
            region: BAR0,
            count: 4,
            data,
        };
        multi.extend_from_slice(e.as_bytes());
    }
    registers.extend(record(Command::RegionWriteMulti as u16, 1, &multi));
    registers.extend(record(Command::DeviceReset as u16, 0, &[]));
    registers.extend(read(BAR0, 4, 4));
    seeds.push(("registers", registers));

    // DMA through message-backed memory: the server sends DMA_WRITE/DMA_READ,
    // which nobody answers; a reply-typed record answers a request id.
    let mut dma = enable();
    dma.extend(dma_map(0x10_0000, 0x10_0000));
    dma.extend(dma_map(0x30_0000, 0x1000));
    dma.extend(write(BAR0, 0x80, &0x4_0000u64.to_le_bytes()));
    dma.extend(write(BAR0, 0x88, &0x10_0000u64.to_le_bytes()));
    dma.extend(write(BAR0, 0x90, &0x100u64.to_le_bytes()));
    dma.extend(write(BAR0, 0x98, &7u64.to_le_bytes()));
    dma.extend(record(Command::DmaWrite as u16, 2, &[0; 16]));
    dma.extend(read(BAR0, 0x98, 8));
    dma.extend(dma_unmap(0x30_0000, 0x1000, 0));
    dma.extend(dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL));
    seeds.push(("dma", dma));

    let mut irqs = enable();
    irqs.extend(set_irqs(
        0,
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
    ));
    irqs.extend(set_irqs(
        1,
        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[1],
    ));
    irqs.extend(set_irqs(
        1,
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
        0,
        1,
        &[],
    ));
    irqs.extend(set_irqs(
        1,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    ));
    // MSI enable in the capability, then an interrupt raised by the device.
    irqs.extend(write(CONFIG, 0x42, &0x0001u16.to_le_bytes()));
    irqs.extend(write(BAR0, 0x60, &1u32.to_le_bytes()));
    irqs.extend(set_irqs(
        1,
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
    ));
    seeds.push(("irqs", irqs));

    // Refusals: unknown and server-only commands, short payloads, a second
    // VERSION, a reply nobody asked for, an invalid type.
    let mut refused = record(30, 0, &[0xab; 40]);
    refused.extend(record(14, 0, &[]));
    refused.extend(record(Command::DmaRead as u16, 0, &[0; 16]));
    refused.extend(record(Command::RegionRead as u16, 0, &[0; 8]));
    refused.extend(record(Command::Version as u16, 0, b"\0\0\x01\0{}"));
    refused.extend(record(Command::RegionRead as u16, 2, &[0; 16]));
    refused.extend(record(Command::RegionRead as u16, 8, &[0; 16]));
    refused.extend(read(BAR0, 0, crate::session::MAX_DATA_XFER + 1));
    refused.extend(record(Command::DeviceFeature as u16, 0, &[0; 8]));
    seeds.push(("refused", refused));
    seeds
}

/// Raw byte streams (`vfio_user_session` inputs): the structured seeds rendered,
/// plus framing errors the structured format cannot express.
pub fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds: Vec<(&'static str, Vec<u8>)> = message_seeds()
        .into_iter()
        .map(|(name, records)| (name, messages_to_bytes(&records)))
        .collect();
    let version = crate::session::version_message();
    // A header announcing less than a header.
    let mut small = version.clone();
    small.extend_from_slice(
        Header {
            msg_id: 1,
            command: 4,
            size: 8,
            ..Default::default()
        }
        .as_bytes(),
    );
    seeds.push(("size-below-header", small));
    // A payload larger than the server keeps, then a command that must still work.
    let mut big = version.clone();
    big.extend_from_slice(
        Header {
            msg_id: 1,
            command: Command::RegionWrite as u16,
            size: (HEADER_SIZE + crate::session::MAX_DATA_XFER as usize + 4097) as u32,
            ..Default::default()
        }
        .as_bytes(),
    );
    big.extend(std::iter::repeat_n(
        0u8,
        crate::session::MAX_DATA_XFER as usize + 4097,
    ));
    big.extend(messages_to_bytes(&read(CONFIG, 0, 4))[version.len()..].iter());
    seeds.push(("oversized-drained", big));
    // The stream ends in the middle of a header, and of a payload.
    let mut cut = version.clone();
    cut.extend_from_slice(&[1, 0, 4, 0, 32]);
    seeds.push(("cut-header", cut));
    let mut cut = version.clone();
    cut.extend_from_slice(
        Header {
            msg_id: 1,
            command: 4,
            size: 32,
            ..Default::default()
        }
        .as_bytes(),
    );
    cut.extend_from_slice(&[16, 0, 0]);
    seeds.push(("cut-payload", cut));
    seeds.push(("no-version", read(CONFIG, 0, 4)));
    seeds
}

fn op_cfg_write(offset: u16, data: &[u8]) -> Vec<u8> {
    let len_code = match data.len() {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        _ => panic!("seed lengths are 1, 2, 4 or 8"),
    };
    let mut v = vec![1];
    v.extend_from_slice(&offset.to_le_bytes());
    v.push(len_code);
    v.extend_from_slice(data);
    v
}

fn op_bar(op: u8, region: u8, offset: u32, data: &[u8]) -> Vec<u8> {
    let len_code = match data.len() {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        _ => panic!("seed lengths are 1, 2, 4 or 8"),
    };
    let mut v = vec![op, region];
    v.extend_from_slice(&offset.to_le_bytes());
    v.push(len_code);
    if op == 3 {
        v.extend_from_slice(data);
    }
    v
}

/// `pci_config` operation sequences.
pub fn pci_config_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::pci_config::{MSIX_PBA, MSIX_TABLE};
    let mut seeds = Vec::new();
    // Sizing, then programming addresses, then reading the whole header.
    let mut sizing = vec![6];
    sizing.extend(op_cfg_write(0x10, &0xfebf_0000u32.to_le_bytes()));
    sizing.extend(op_cfg_write(0x18, &0xfe00_000cu32.to_le_bytes()));
    sizing.extend(op_cfg_write(0x1c, &0x0000_0001u32.to_le_bytes()));
    sizing.extend(op_cfg_write(0x14, &0x0000_c001u32.to_le_bytes()));
    sizing.extend([0, 0x00, 0x00, 3]);
    sizing.extend([0, 0x10, 0x00, 0x7 | (5 << 3)]);
    sizing.push(6);
    seeds.push(("sizing", sizing));

    // Decoding on, BAR accesses of every kind, MSI-X table and PBA.
    let mut bars = vec![7, 0x03, 0x00];
    bars.extend(op_bar(3, 0, 0x10, &[1, 2, 3, 4]));
    bars.extend(op_bar(2, 0, 0x10, &[0; 4]));
    bars.extend(op_bar(3, 1, 0xfc, &[9, 9, 9, 9]));
    bars.extend(op_bar(2, 2, 0xf_fff8, &[0; 8]));
    bars.extend(op_bar(2, 4, 0x7fff_fffc, &[0; 4]));
    bars.extend(op_bar(3, 5, 0, &[0xaa; 4]));
    bars.extend(op_bar(
        3,
        0,
        MSIX_TABLE as u32 + 16 * 3,
        &0xfee0_0000u32.to_le_bytes(),
    ));
    bars.extend(op_bar(
        3,
        0,
        MSIX_TABLE as u32 + 16 * 3 + 12,
        &0u32.to_le_bytes(),
    ));
    bars.extend(op_bar(2, 0, MSIX_TABLE as u32 + 16 * 3, &[0; 8]));
    bars.extend(op_bar(2, 0, MSIX_PBA as u32, &[0; 8]));
    bars.extend(op_bar(2, 0, MSIX_TABLE as u32 + 1, &[0; 2]));
    bars.extend(op_bar(8, 2, 1, &[0; 4]));
    bars.push(4);
    seeds.push(("bars", bars));

    // Interrupts: eventfds for MSI-X vectors, MSI-X on, device fires vectors,
    // masks, PBA, function mask, INTx with an unmask eventfd, MSI.
    let mut irqs = vec![7, 0x02, 0x00];
    irqs.extend([
        5,
        2,
        (IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER) as u8,
        0,
        8,
        0xff,
    ]);
    // MSI-X capability is the third: PM at 0x40 (8), MSI at 0x48 (14 -> 16).
    irqs.extend(op_cfg_write(0x5a, &0x8000u16.to_le_bytes()));
    irqs.extend(op_bar(3, 0, 0, &[3, 0, 0, 0]));
    irqs.extend([5, 2, (IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK) as u8, 3, 1]);
    irqs.extend(op_bar(3, 0, 0, &[3, 0, 0, 0]));
    irqs.extend(op_bar(2, 0, MSIX_PBA as u32, &[0; 8]));
    irqs.extend([
        5,
        2,
        (IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK) as u8,
        3,
        1,
        1,
    ]);
    irqs.extend(op_cfg_write(0x5a, &0xc000u16.to_le_bytes()));
    irqs.extend(op_bar(3, 0, 0, &[39, 0, 0, 0]));
    irqs.extend(op_cfg_write(0x5a, &0x0000u16.to_le_bytes()));
    irqs.extend([
        5,
        0,
        (IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER) as u8,
        0,
        1,
        1,
    ]);
    irqs.extend([
        5,
        0,
        (IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK) as u8,
        0,
        1,
        1,
    ]);
    irqs.extend(op_bar(3, 0, 4, &[1, 0, 0, 0]));
    irqs.extend(op_cfg_write(0x04, &0x0402u16.to_le_bytes()));
    irqs.extend(op_bar(3, 0, 4, &[0, 0, 0, 0]));
    irqs.extend(op_cfg_write(0x4a, &0x0021u16.to_le_bytes()));
    irqs.extend(op_bar(3, 0, 0, &[1, 0, 0, 0]));
    irqs.extend(op_bar(3, 0, 8, &[1, 0, 0, 0]));
    irqs.push(4);
    seeds.push(("irqs", irqs));

    // Capability registers: PM state, PCIe device control/status, link control.
    let mut caps = op_cfg_write(0x44, &0x0003u16.to_le_bytes());
    // PCIe at 0x64: device control and status, link control.
    caps.extend(op_cfg_write(0x6c, &0xffffu16.to_le_bytes()));
    caps.extend(op_cfg_write(0x6e, &0xffffu16.to_le_bytes()));
    caps.extend(op_cfg_write(0x74, &0xffff_ffffu32.to_le_bytes()));
    caps.extend(op_cfg_write(0x06, &0xffffu16.to_le_bytes()));
    caps.extend(op_cfg_write(0x100, &0xffff_ffffu32.to_le_bytes()));
    caps.extend([0, 0xfc, 0x0f, 2]);
    caps.extend([0, 0xfe, 0x0f, 2]);
    seeds.push(("caps", caps));
    seeds
}

// ---- vGPU ------------------------------------------------------------------

/// Page selectors of the vGPU seeds (see `vgpu::page_gpa`): the root and one
/// table per level below it, a second leaf table, a ring, a batch buffer and
/// eight data pages.
mod vgpu_pages {
    pub const ROOT: u8 = 0;
    pub const L3: u8 = 1;
    pub const L2: u8 = 2;
    pub const L1: u8 = 3;
    pub const RING: u8 = 4;
    pub const L1B: u8 = 5;
    pub const BATCH: u8 = 6;
    pub const DATA: u8 = 8;
    pub const MSG: u8 = 16;
    pub const UNMAPPED: u8 = 19;
}

const P: u8 = 1;
const PW: u8 = 3;
const PWV: u8 = 7;

/// A four-level tree: VA `i << 12` (i < 16) is leaf entry i of `L1`: RAM data
/// pages (0-5 writable, 6-7 read-only), VRAM page 1, VRAM past its end, the
/// message-only region, unmapped memory, the batch page (read-only), the ring
/// (writable: the auditor must refuse writes there). Plus a VRAM "table", a
/// message-region "table", a leaf table shared by two entries and an entry of
/// the root pointing back at the root.
fn vgpu_tree() -> crate::vgpu::Ops {
    use vgpu_pages::*;
    let mut o = crate::vgpu::Ops::default()
        .link(ROOT, 0, L3, PW)
        .link(L3, 0, L2, PW)
        .link(L2, 0, L1, PW);
    for i in 0..8u8 {
        o = o.link(L1, u16::from(i), DATA + i, if i < 6 { PW } else { P });
    }
    o.link(L1, 8, 1, PWV)
        .link(L1, 9, 16, PWV)
        .link(L1, 10, MSG, PW)
        .link(L1, 11, UNMAPPED, PW)
        .link(L1, 12, BATCH, P)
        .link(L1, 13, RING, PW)
        .link(L2, 1, L1B, PWV)
        .link(L2, 2, MSG, PW)
        .link(L2, 3, L1, PW)
        .link(L1B, 0, DATA, PW)
        .link(ROOT, 1, ROOT, PW)
        .with(crate::vgpu::OP_ROOT, ROOT)
        .op(crate::vgpu::OP_SYNC)
}

fn vgpu_check_all(mut o: crate::vgpu::Ops) -> crate::vgpu::Ops {
    for i in 0..16u16 {
        o = o.check([0, 0, 0, i], 0x10, i % 2 == 1);
    }
    o.check([0, 0, 1, 0], 0, false)
        .check([0, 0, 2, 0], 0, false)
        .check([0, 0, 3, 5], 4, true)
        .check([1, 0, 0, 0], 0, false)
        .check([1, 1, 0, 0], 8, false)
        .check([2, 0, 0, 0], 0, false)
        .check_va(1 << 48, false)
        .check_va(u64::MAX, true)
}

/// `vgpu_page_tables` inputs.
pub fn vgpu_page_table_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::vgpu::*;
    use vgpu_pages::*;
    let mut seeds = Vec::new();
    seeds.push(("tree", vgpu_check_all(vgpu_tree()).0));

    // Entries rewritten after the shadow exists: unlinks, relinks, a table moved
    // between levels, bits flipped, then sync points and checks.
    let o = vgpu_check_all(vgpu_tree())
        .link(L2, 0, L1B, PW)
        .raw(L1, 0, 0)
        .link(L1, 1, DATA + 7, P)
        .link(L3, 0, L1, PW)
        .raw(L1B, 3, u64::MAX)
        .op(OP_SYNC);
    let o = vgpu_check_all(o)
        .link(L3, 0, L2, PW)
        .link(L2, 0, L1, PW)
        .bytes(L1, 4 * 8 + 3, &[0xff, 0xff, 0x0f])
        .op(OP_SYNC);
    seeds.push(("rewrite", vgpu_check_all(o).0));

    // The memory under the tables goes away and comes back (QEMU's remaps), the
    // shadow is reset, the root moves, a table budget is set.
    let o = vgpu_check_all(vgpu_tree()).with(OP_REMAP, 0).op(OP_SYNC);
    let o = vgpu_check_all(o).with(OP_REMAP, 1);
    let o = vgpu_check_all(o).op(OP_RESET);
    let o = vgpu_check_all(o).with(OP_ROOT, L3).op(OP_SYNC);
    let o = vgpu_check_all(o)
        .with(OP_ROOT, MSG)
        .op(OP_SYNC)
        .with(OP_ROOT, ROOT);
    let o = vgpu_check_all(o).with(OP_MAX_TABLES, 3).op(OP_RESET);
    seeds.push(("remap-reset-budget", vgpu_check_all(o).0));

    // A RAM region away for a while: the second one (data pages, and a table
    // linked in from L2[4]) is unmapped, the guest rewrites entries there and
    // in the first meanwhile, sync points see it missing; then it comes back.
    // Then the first one (the tree itself) goes and comes back.
    let o = vgpu_tree()
        .link(L2, 4, DATA + 1, PW)
        .link(DATA + 1, 0, DATA + 2, PW);
    let o = vgpu_check_all(o)
        .check([0, 0, 4, 0], 0, true)
        .with(OP_REMAP, 0x81)
        .op(OP_SYNC);
    let o = vgpu_check_all(o)
        .check([0, 0, 4, 0], 0, true)
        .link(DATA + 1, 0, DATA + 3, P)
        .link(L1, 2, DATA + 4, P)
        .op(OP_SYNC)
        .with(OP_REMAP, 0x81)
        .op(OP_SYNC);
    let o = vgpu_check_all(o)
        .check([0, 0, 4, 0], 0, false)
        .with(OP_REMAP, 0x80)
        .op(OP_SYNC);
    let o = vgpu_check_all(o).with(OP_REMAP, 0x80).op(OP_SYNC);
    seeds.push(("unmapped-window", vgpu_check_all(o).0));
    seeds
}

fn dwords(cmds: &[Vec<u32>]) -> Vec<u32> {
    cmds.concat()
}

fn le_bytes(d: &[u32]) -> Vec<u8> {
    d.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `vgpu_audit` inputs.
pub fn vgpu_audit_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::vgpu::cmd::*;
    use crate::vgpu::*;
    use vgpu_pages::*;
    let page = |i: u64| i << 12;
    let mut seeds = Vec::new();

    // Every command that moves data, a batch, a TLB invalidate mid-submission
    // with the tables changed before it takes effect.
    let batch = dwords(&[
        store_dword(page(2), 0xb),
        fill(page(3), 64, 0xc),
        batch_end(),
    ]);
    let ring = dwords(&[
        nop(),
        store_dword(page(0) + 8, 0x1234),
        fill(page(1) - 8, 16, 0xa5a5_a5a5),
        copy(page(2), page(8) + 0x100, 0xe00),
        copy(page(10), page(4), 64),
        blit(page(0), 256, page(3), 512, 64, 8),
        fence(page(5) + 0xff0, 7, true),
        batch_start(page(12)),
        tlb_invalidate(),
        store_dword(page(1), 2),
        fence(page(0), 8, false),
    ]);
    let o = vgpu_tree()
        .bytes(BATCH, 0, &le_bytes(&batch))
        .ring(RING, 0, 0)
        .commands(&ring)
        .op(OP_AUDIT)
        .link(L1, 1, DATA + 7, PW)
        .ring(RING, 0, 20)
        .commands(&ring)
        .op(OP_AUDIT);
    seeds.push(("commands", o.0));

    // Submissions that fault: a write through a read-only entry, over the ring,
    // to unmapped memory, a malformed header, a command cut by TAIL, a batch
    // calling itself, a misaligned store, a missing batch end, a bad ring.
    let self_batch = dwords(&[batch_start(page(12)), nop()]);
    let mut o = vgpu_tree().bytes(BATCH, 0, &le_bytes(&self_batch));
    let cases: [Vec<u32>; 8] = [
        store_dword(page(6), 1),
        fill(page(13), 16, 0),
        store_dword(page(11), 1),
        vec![0xff00_0001],
        vec![umdev_vgpu::regs::header(umdev_vgpu::regs::OP_COPY, 0), 0, 0],
        batch_start(page(12)),
        store_dword(2, 0),
        batch_end(),
    ];
    for (i, case) in cases.iter().enumerate() {
        o = o.ring(RING, 0, 64 * i as u16).commands(case).op(OP_AUDIT);
    }
    o = o.ring(RING, 2, 0).commands(&nop()).op(OP_AUDIT);
    o = o.ring(MSG, 0, 0).commands(&nop()).op(OP_AUDIT);
    seeds.push(("faults", o.0));

    // A ring of two pages that wraps, commands across the wrap, VRAM targets.
    let o = vgpu_tree()
        .ring(RING, 1, 2040)
        .commands(&dwords(&[
            copy(page(8), page(0), 256),
            fill(page(8) + 4, 32, 1),
            store_dword(page(8) + 0x40, 3),
            nop(),
        ]))
        .op(OP_AUDIT);
    seeds.push(("wrap-vram", o.0));

    // A submission while the data region is unmapped faults (bad target); the
    // same one after it came back runs.
    let copy_cmds = dwords(&[copy(page(0), page(8) + 0x10, 0x100), nop()]);
    let o = vgpu_tree()
        .with(OP_REMAP, 0x81)
        .ring(RING, 0, 0)
        .commands(&copy_cmds)
        .op(OP_AUDIT)
        .with(OP_REMAP, 0x81)
        .ring(RING, 0, 32)
        .commands(&copy_cmds)
        .op(OP_AUDIT);
    seeds.push(("unmapped-window", o.0));
    seeds
}
