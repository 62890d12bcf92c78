//! Command encoders: the dwords of each command of SPEC.md "Command stream".
//!
//! Addresses are GPU virtual addresses of the context; each encoder returns the
//! whole command, header first.

use super::regs::*;

/// Low dword of a 64-bit address (the "lo" of an address pair).
pub const fn lo(addr: u64) -> u32 {
    addr as u32
}

/// High dword of a 64-bit address (the "hi" of an address pair).
pub const fn hi(addr: u64) -> u32 {
    (addr >> 32) as u32
}

/// A page-table or GGTT entry (SPEC.md "Page-table entries"): present,
/// mapping the page at `addr` (a guest-physical address, or a VRAM offset when
/// `vram`), writable or read-only.
pub const fn pte(addr: u64, vram: bool, writable: bool) -> u64 {
    (addr & PTE_ADDR_MASK)
        | if vram { PTE_VRAM } else { 0 }
        | PTE_PRESENT
        | if writable { PTE_WRITABLE } else { 0 }
}

/// NOP (`0x00`, 1 dword): does nothing.
pub fn nop() -> Vec<u32> {
    vec![header(OP_NOP, 0)]
}

/// STORE_DWORD (`0x01`, 4 dwords): writes `value` to `addr`.
pub fn store_dword(addr: u64, value: u32) -> Vec<u32> {
    vec![header(OP_STORE_DWORD, 0), lo(addr), hi(addr), value]
}

/// FILL (`0x02`, 5 dwords): writes the 32-bit `pattern` over `bytes` bytes at
/// `dst` (address and size multiples of 4; 0 bytes does nothing).
pub fn fill(dst: u64, bytes: u32, pattern: u32) -> Vec<u32> {
    vec![header(OP_FILL, 0), lo(dst), hi(dst), bytes, pattern]
}

/// COPY (`0x03`, 6 dwords): copies `bytes` bytes from `src` to `dst`.
pub fn copy(src: u64, dst: u64, bytes: u32) -> Vec<u32> {
    vec![
        header(OP_COPY, 0),
        lo(src),
        hi(src),
        lo(dst),
        hi(dst),
        bytes,
    ]
}

/// BLIT (`0x04`, 9 dwords): copies `height` lines of `width_bytes` bytes from
/// `src` (lines `src_pitch` bytes apart) to `dst` (lines `dst_pitch` apart).
/// Counts as one command per line against the submission budget.
pub fn blit(
    src: u64,
    src_pitch: u32,
    dst: u64,
    dst_pitch: u32,
    width_bytes: u32,
    height: u32,
) -> Vec<u32> {
    vec![
        header(OP_BLIT, 0),
        lo(src),
        hi(src),
        src_pitch,
        lo(dst),
        hi(dst),
        dst_pitch,
        width_bytes,
        height,
    ]
}

/// FENCE (`0x05`, 4 dwords): writes the sequence number `seq` to `addr` and
/// sets FENCE_SEQNO; with `irq` (flag bit 0) it also raises the context's
/// interrupt.
pub fn fence(addr: u64, seq: u32, irq: bool) -> Vec<u32> {
    let flags = if irq { FENCE_FLAG_IRQ } else { 0 };
    vec![header(OP_FENCE, flags), lo(addr), hi(addr), seq]
}

/// BATCH_START (`0x06`, 3 dwords): runs the batch buffer at `addr`, then
/// continues after this command (batches nest at most 4 deep).
pub fn batch_start(addr: u64) -> Vec<u32> {
    vec![header(OP_BATCH_START, 0), lo(addr), hi(addr)]
}

/// BATCH_END (`0x07`, 1 dword): ends a batch buffer (in the ring: a fault).
pub fn batch_end() -> Vec<u32> {
    vec![header(OP_BATCH_END, 0)]
}

/// TLB_INVALIDATE (`0x08`, 1 dword): a sync point between the commands before
/// and after it.
pub fn tlb_invalidate() -> Vec<u32> {
    vec![header(OP_TLB_INVALIDATE, 0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_match_the_spec() {
        let a = 0x1234_5678_9abc_def0;
        for c in [
            nop(),
            store_dword(a, 1),
            fill(a, 4, 2),
            copy(a, a, 4),
            blit(a, 4, a, 4, 4, 1),
            fence(a, 3, true),
            batch_start(a),
            batch_end(),
            tlb_invalidate(),
        ] {
            let op = (c[0] >> 24) as u8;
            assert_eq!(command_len(op), Some(c.len()), "opcode {op:#x}");
            assert_eq!((c[0] & 0xffff) as usize, c.len());
        }
        assert_eq!(store_dword(a, 7)[1..], [0x9abc_def0, 0x1234_5678, 7]);
        assert_eq!(fence(a, 3, true)[0] >> 16 & 0xff, u32::from(FENCE_FLAG_IRQ));
        assert_eq!(fence(a, 3, false)[0] >> 16 & 0xff, 0);
    }
}
