//! Register map, memory formats and command encoding of SPEC.md, as constants.

/// PCI identity defaults.
pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x5547;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1234;
pub const SUBSYSTEM_ID: u16 = 0x0001;
pub const REVISION: u8 = 0x01;
pub const CLASS_CODE: u32 = 0x038000;

/// BAR0 (registers, MSI-X, GGTT) and BAR2 (VRAM).
pub const MMIO_BAR: usize = 0;
pub const VRAM_BAR: usize = 2;
pub const MMIO_BAR_SIZE: u64 = 2 << 20;
pub const DEFAULT_VRAM_MIB: u32 = 64;

pub const CONTEXTS: usize = 4;
pub const MSIX_VECTORS: u16 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x10000;
pub const MSIX_PBA_OFFSET: u64 = 0x18000;

pub const ID_VALUE: u32 = 0x5547_0001;

// Global registers.
pub const REG_ID: u64 = 0x00;
pub const REG_CAPS: u64 = 0x04;
pub const REG_STATUS: u64 = 0x08;
pub const REG_RESET: u64 = 0x0c;
pub const REG_IRQ_STATUS: u64 = 0x10;
pub const REG_IRQ_ENABLE: u64 = 0x14;
pub const REG_GLOBAL_ERROR: u64 = 0x18;
pub const REG_GGTT_SIZE: u64 = 0x20;
pub const IRQ_GLOBAL_ERROR: u32 = 1 << 8;
pub const GLOBAL_ERROR_BAD_GGTT_ENTRY: u32 = 1;
pub const GLOBAL_ERROR_BAD_SCANOUT: u32 = 2;

// Context registers, at CTX_BASE + n * CTX_STRIDE.
pub const CTX_BASE: u64 = 0x1000;
pub const CTX_STRIDE: u64 = 0x100;
pub const CTX_PT_ROOT: u64 = 0x00;
pub const CTX_RING_BASE: u64 = 0x08;
pub const CTX_RING_SIZE: u64 = 0x10;
pub const CTX_RING_HEAD: u64 = 0x14;
pub const CTX_RING_TAIL: u64 = 0x18;
pub const CTX_STATUS: u64 = 0x1c;
pub const CTX_FAULT_ADDR: u64 = 0x20;
pub const CTX_FENCE_SEQNO: u64 = 0x28;
pub const CTX_TLB_INVALIDATE: u64 = 0x2c;
pub const CTX_INV_START: u64 = 0x30;
pub const CTX_INV_PAGES: u64 = 0x38;
pub const CTX_CONTROL: u64 = 0x40;
pub const CTX_MSIX_VECTOR: u64 = 0x44;
pub const CTX_STATUS_ENABLED: u32 = 1 << 0;
pub const CTX_STATUS_BUSY: u32 = 1 << 1;
pub const CTX_STATUS_FAULTED: u32 = 1 << 2;
pub const CTX_CONTROL_ENABLE: u32 = 1 << 0;
pub const CTX_CONTROL_CLEAR_FAULT: u32 = 1 << 1;
pub const TLB_INVALIDATE_ALL: u32 = 1;
pub const TLB_INVALIDATE_RANGE: u32 = 2;
pub const RING_SIZE_MIN: u32 = 4096;
pub const RING_SIZE_MAX: u32 = 1 << 20;

/// Offset of context `n`'s register `reg`.
pub const fn ctx_reg(n: usize, reg: u64) -> u64 {
    CTX_BASE + n as u64 * CTX_STRIDE + reg
}

// Scanout registers.
pub const SCANOUT_BASE: u64 = 0x2000;
pub const SCANOUT_FB_ADDR: u64 = 0x00;
pub const SCANOUT_FB_WIDTH: u64 = 0x08;
pub const SCANOUT_FB_HEIGHT: u64 = 0x0c;
pub const SCANOUT_FB_STRIDE: u64 = 0x10;
pub const SCANOUT_FB_FORMAT: u64 = 0x14;
pub const SCANOUT_FB_ENABLE: u64 = 0x18;
pub const FB_FORMAT_XRGB8888: u32 = 1;
pub const FB_MAX_DIM: u32 = 4096;

// GGTT.
pub const GGTT_OFFSET: u64 = 0x100000;
pub const GGTT_ENTRIES: u64 = 1 << 17;

// Page-table and GGTT entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_VRAM: u64 = 1 << 2;
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
pub const PT_LEVELS: u8 = 4;
pub const PT_ENTRIES: usize = 512;
pub const PAGE_SIZE: u64 = 4096;
/// Highest GPU virtual address + 1.
pub const VA_LIMIT: u64 = 1 << 48;

/// Index into the table of `level` (4 = root ... 1 = leaf) for `va`.
pub const fn pt_index(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (level as u64 - 1))) & 0x1ff) as usize
}

// Commands.
pub const OP_NOP: u8 = 0x00;
pub const OP_STORE_DWORD: u8 = 0x01;
pub const OP_FILL: u8 = 0x02;
pub const OP_COPY: u8 = 0x03;
pub const OP_BLIT: u8 = 0x04;
pub const OP_FENCE: u8 = 0x05;
pub const OP_BATCH_START: u8 = 0x06;
pub const OP_BATCH_END: u8 = 0x07;
pub const OP_TLB_INVALIDATE: u8 = 0x08;
pub const FENCE_FLAG_IRQ: u8 = 1 << 0;
pub const MAX_BATCH_DEPTH: usize = 4;
pub const MAX_COMMANDS_PER_SUBMISSION: usize = 65536;
pub const MAX_BYTES_PER_SUBMISSION: u64 = 256 << 20;

/// Length in dwords of each opcode's command, header included.
pub const fn command_len(opcode: u8) -> Option<usize> {
    match opcode {
        OP_NOP | OP_BATCH_END | OP_TLB_INVALIDATE => Some(1),
        OP_BATCH_START => Some(3),
        OP_STORE_DWORD | OP_FENCE => Some(4),
        OP_FILL => Some(5),
        OP_COPY => Some(6),
        OP_BLIT => Some(9),
        _ => None,
    }
}

/// A command header dword.
pub const fn header(opcode: u8, flags: u8) -> u32 {
    let len = match command_len(opcode) {
        Some(l) => l as u32,
        None => 0,
    };
    (opcode as u32) << 24 | (flags as u32) << 16 | len
}

// Fault reasons (CTX_STATUS bits 8-15).
pub const FAULT_NOT_PRESENT: u8 = 1;
pub const FAULT_READ_ONLY: u8 = 2;
pub const FAULT_BAD_TABLE: u8 = 3;
pub const FAULT_BAD_TARGET: u8 = 4;
pub const FAULT_RING_WRITE: u8 = 5;
pub const FAULT_MALFORMED: u8 = 6;
pub const FAULT_NESTING: u8 = 7;
pub const FAULT_BUDGET: u8 = 8;
pub const FAULT_BAD_RING: u8 = 9;
pub const FAULT_DMA_ERROR: u8 = 10;
pub const FAULT_NO_ROOT: u8 = 11;
