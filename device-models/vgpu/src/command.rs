//! Command parsing and audit, as GVT-g audits workloads: every command of a
//! submission is parsed and every address it touches translated through the
//! shadow page tables *before* anything runs. The result is a plan of memory
//! operations on validated targets; nothing in it can reach memory outside the
//! context's mappings.

use umdev::memory::GuestMemory;
use umdev::pagetrack::Gfn;

use crate::regs::*;
use crate::shadow::{ShadowPageTables, Target};
use crate::vram::Vram;

/// A contiguous run of a validated target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub target: Target,
    pub len: u64,
}

/// One operation of an audited plan. `va` is the GPU address the command named,
/// for fault reports.
#[derive(Debug)]
pub enum Step {
    Store {
        dst: Target,
        value: u32,
        va: u64,
    },
    Fill {
        dst: Vec<Extent>,
        pattern: u32,
        va: u64,
    },
    Copy {
        src: Vec<Extent>,
        dst: Vec<Extent>,
        va: u64,
    },
    Fence {
        dst: Target,
        seqno: u32,
        irq: bool,
        va: u64,
    },
}

/// Why a submission was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub reason: u8,
    pub addr: u64,
}

/// Where parsing stands: a position in the ring and the stack of batches.
#[derive(Debug)]
pub struct Cursor {
    pub ring_pos: u32,
    pub ring_end: u32,
    /// Next command's address in each batch being run, innermost last.
    pub batches: Vec<u64>,
    pub commands: usize,
    pub bytes: u64,
}

impl Cursor {
    pub fn new(head: u32, tail: u32) -> Self {
        Cursor {
            ring_pos: head,
            ring_end: tail,
            batches: Vec::new(),
            commands: 0,
            bytes: 0,
        }
    }
}

/// What the auditor may look at.
pub struct AuditContext<'a> {
    pub shadow: &'a ShadowPageTables,
    pub root: Gfn,
    pub memory: &'a GuestMemory,
    pub vram: &'a Vram,
    pub ring_base: u64,
    pub ring_size: u32,
    /// (base, size) of every enabled context's ring: no command may write there.
    pub rings: &'a [(u64, u64)],
}

impl AuditContext<'_> {
    fn fault(&self, reason: u8, addr: u64) -> Fault {
        Fault { reason, addr }
    }

    /// Reads one dword of the ring at byte offset `pos` (wrapping).
    fn ring_dword(&self, pos: u32) -> Result<u32, Fault> {
        let gpa = self.ring_base + u64::from(pos % self.ring_size);
        let mut b = [0u8; 4];
        self.memory
            .peek(gpa, &mut b)
            .map_err(|_| self.fault(FAULT_BAD_RING, self.ring_base))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads one dword of a batch buffer at GPU address `va`.
    fn batch_dword(&self, va: u64) -> Result<u32, Fault> {
        if !va.is_multiple_of(4) {
            return Err(self.fault(FAULT_MALFORMED, va));
        }
        let t = self
            .shadow
            .translate(self.root, va, false)
            .map_err(|r| self.fault(r, va))?;
        let mut b = [0u8; 4];
        let ok = match t.target {
            Target::Ram(gpa) => self.memory.peek(gpa, &mut b).is_ok(),
            Target::Vram(off) => self.vram.read(off, &mut b).is_ok(),
        };
        if !ok {
            return Err(self.fault(FAULT_DMA_ERROR, va));
        }
        Ok(u32::from_le_bytes(b))
    }

    /// Translates `[va, va+len)` for reading or writing into extents. A fault
    /// names the first address that fails, also past `VA_LIMIT` (which
    /// `translate` refuses: nothing is mapped there).
    fn range(&self, va: u64, len: u64, write: bool) -> Result<Vec<Extent>, Fault> {
        // A range that wraps the address space faults at its start.
        let end = va
            .checked_add(len)
            .ok_or_else(|| self.fault(FAULT_NOT_PRESENT, va))?;
        let mut out: Vec<Extent> = Vec::new();
        // The GPU address where each extent starts (for a RING_WRITE's address).
        let mut starts: Vec<u64> = Vec::new();
        let mut cur = va;
        while cur < end {
            // One leaf table's pages at a time: the upper levels walked once.
            let next = self.shadow.translate_span(
                self.root,
                cur,
                end,
                write,
                |reason, at| self.fault(reason, at),
                |at, t| {
                    let piece = (PAGE_SIZE - at % PAGE_SIZE).min(end - at);
                    match out.last_mut() {
                        Some(last) if last.target.offset(last.len) == t.target => last.len += piece,
                        _ => {
                            out.push(Extent {
                                target: t.target,
                                len: piece,
                            });
                            starts.push(at);
                        }
                    }
                    Ok(())
                },
            );
            match next {
                Ok(n) => cur = n,
                // A ring written before the page that failed is the first fault.
                Err(f) => return Err(self.ring_write(&out, &starts, write).unwrap_or(f)),
            }
        }
        if let Some(f) = self.ring_write(&out, &starts, write) {
            return Err(f);
        }
        Ok(out)
    }
}

impl AuditContext<'_> {
    /// For a write: RING_WRITE at the first page piece of `extents` (which
    /// start at `starts`) that reaches into any context's ring. Other contexts'
    /// ring registers are unchecked until they submit: a ring may reach past
    /// the top of the address space.
    fn ring_write(&self, extents: &[Extent], starts: &[u64], write: bool) -> Option<Fault> {
        if !write {
            return None;
        }
        extents.iter().zip(starts).find_map(|(e, &va)| {
            let Target::Ram(gpa) = e.target else {
                return None;
            };
            let end = gpa.saturating_add(e.len);
            self.rings
                .iter()
                .filter(|&&(base, size)| gpa < base.saturating_add(size) && base < end)
                // The start of the page piece holding the first byte in a ring.
                .map(|&(base, _)| {
                    let first = va + base.saturating_sub(gpa);
                    va.max(first - first % PAGE_SIZE)
                })
                .min()
                .map(|at| self.fault(FAULT_RING_WRITE, at))
        })
    }
}

/// Where the command being parsed came from, for fault addresses.
fn command_addr(cursor: &Cursor) -> u64 {
    cursor
        .batches
        .last()
        .copied()
        .unwrap_or(u64::from(cursor.ring_pos))
}

/// Parses and audits from `cursor` up to the end of the submission or the next
/// TLB_INVALIDATE. Returns the plan and whether a TLB_INVALIDATE stopped it
/// (more follows after a sync point).
pub fn audit_segment(
    ctx: &AuditContext<'_>,
    cursor: &mut Cursor,
) -> Result<(Vec<Step>, bool), Fault> {
    let mut plan = Vec::new();
    loop {
        let from_batch = !cursor.batches.is_empty();
        if !from_batch && cursor.ring_pos == cursor.ring_end {
            return Ok((plan, false));
        }
        let at = command_addr(cursor);
        cursor.commands += 1;
        if cursor.commands > MAX_COMMANDS_PER_SUBMISSION {
            return Err(ctx.fault(FAULT_BUDGET, at));
        }
        // Fetch the header, then the rest of the command.
        let read = |i: usize| -> Result<u32, Fault> {
            if from_batch {
                let va = at
                    .checked_add(4 * i as u64)
                    .ok_or_else(|| ctx.fault(FAULT_NOT_PRESENT, at))?;
                ctx.batch_dword(va)
            } else {
                ctx.ring_dword(cursor.ring_pos.wrapping_add(4 * i as u32))
            }
        };
        let header = read(0)?;
        let opcode = (header >> 24) as u8;
        let flags = (header >> 16) as u8;
        let len = (header & 0xffff) as usize;
        let Some(want) = command_len(opcode) else {
            return Err(ctx.fault(FAULT_MALFORMED, at));
        };
        if len != want {
            return Err(ctx.fault(FAULT_MALFORMED, at));
        }
        if !from_batch {
            // The command must lie wholly between HEAD and TAIL.
            let avail = cursor.ring_end.wrapping_sub(cursor.ring_pos) % ctx.ring_size;
            if (4 * len) as u32 > avail {
                return Err(ctx.fault(FAULT_MALFORMED, at));
            }
        }
        let mut d = [0u32; 9];
        for (i, slot) in d.iter_mut().enumerate().take(len).skip(1) {
            *slot = read(i)?;
        }
        d[0] = header;
        // Advance past the command before acting on it.
        if from_batch {
            if let Some(top) = cursor.batches.last_mut() {
                *top += 4 * len as u64;
            }
        } else {
            cursor.ring_pos = (cursor.ring_pos + 4 * len as u32) % ctx.ring_size;
        }
        let addr = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        let charge = |bytes: u64, cursor: &mut Cursor| -> Result<(), Fault> {
            cursor.bytes = cursor.bytes.saturating_add(bytes);
            if cursor.bytes > MAX_BYTES_PER_SUBMISSION {
                return Err(ctx.fault(FAULT_BUDGET, at));
            }
            Ok(())
        };
        match opcode {
            OP_NOP => {}
            OP_STORE_DWORD => {
                let va = addr(d[1], d[2]);
                if !va.is_multiple_of(4) {
                    return Err(ctx.fault(FAULT_MALFORMED, at));
                }
                let dst = ctx.range(va, 4, true)?;
                plan.push(Step::Store {
                    dst: dst[0].target,
                    value: d[3],
                    va,
                });
            }
            OP_FILL => {
                let va = addr(d[1], d[2]);
                let bytes = u64::from(d[3]);
                if !va.is_multiple_of(4) || !bytes.is_multiple_of(4) {
                    return Err(ctx.fault(FAULT_MALFORMED, at));
                }
                charge(bytes, cursor)?;
                if bytes > 0 {
                    let dst = ctx.range(va, bytes, true)?;
                    plan.push(Step::Fill {
                        dst,
                        pattern: d[4],
                        va,
                    });
                }
            }
            OP_COPY => {
                let (src_va, dst_va, bytes) = (addr(d[1], d[2]), addr(d[3], d[4]), u64::from(d[5]));
                charge(bytes, cursor)?;
                if bytes > 0 {
                    let src = ctx.range(src_va, bytes, false)?;
                    let dst = ctx.range(dst_va, bytes, true)?;
                    plan.push(Step::Copy {
                        src,
                        dst,
                        va: dst_va,
                    });
                }
            }
            OP_BLIT => {
                let (src_va, src_pitch) = (addr(d[1], d[2]), u64::from(d[3]));
                let (dst_va, dst_pitch) = (addr(d[4], d[5]), u64::from(d[6]));
                let (width, height) = (u64::from(d[7]), u64::from(d[8]));
                if width == 0 || height == 0 {
                    // Nothing to move: nothing is translated (SPEC.md).
                    continue;
                }
                charge(width.saturating_mul(height), cursor)?;
                // Every line after the first counts as one more command, which
                // also bounds the plan (one step per line).
                cursor.commands = cursor.commands.saturating_add(height as usize - 1);
                if cursor.commands > MAX_COMMANDS_PER_SUBMISSION {
                    return Err(ctx.fault(FAULT_BUDGET, at));
                }
                let fits = |va: u64| va.checked_add(width * height).is_some();
                if src_pitch == width && dst_pitch == width && fits(src_va) && fits(dst_va) {
                    // Lines back to back on both sides: one range each, as a
                    // COPY of the same bytes. If a page faults, the lines
                    // below find which comes first in line order.
                    let bytes = width * height;
                    let ranges = (
                        ctx.range(src_va, bytes, false),
                        ctx.range(dst_va, bytes, true),
                    );
                    if let (Ok(src), Ok(dst)) = ranges {
                        plan.push(Step::Copy {
                            src,
                            dst,
                            va: dst_va,
                        });
                        continue;
                    }
                }
                for row in 0..height {
                    let s = row
                        .checked_mul(src_pitch)
                        .and_then(|o| src_va.checked_add(o))
                        .ok_or_else(|| ctx.fault(FAULT_NOT_PRESENT, src_va))?;
                    let t = row
                        .checked_mul(dst_pitch)
                        .and_then(|o| dst_va.checked_add(o))
                        .ok_or_else(|| ctx.fault(FAULT_NOT_PRESENT, dst_va))?;
                    let src = ctx.range(s, width, false)?;
                    let dst = ctx.range(t, width, true)?;
                    plan.push(Step::Copy { src, dst, va: t });
                }
            }
            OP_FENCE => {
                let va = addr(d[1], d[2]);
                if !va.is_multiple_of(4) {
                    return Err(ctx.fault(FAULT_MALFORMED, at));
                }
                let dst = ctx.range(va, 4, true)?;
                plan.push(Step::Fence {
                    dst: dst[0].target,
                    seqno: d[3],
                    irq: flags & FENCE_FLAG_IRQ != 0,
                    va,
                });
            }
            OP_BATCH_START => {
                if cursor.batches.len() >= MAX_BATCH_DEPTH {
                    return Err(ctx.fault(FAULT_NESTING, at));
                }
                cursor.batches.push(addr(d[1], d[2]));
            }
            OP_BATCH_END => {
                if cursor.batches.pop().is_none() {
                    return Err(ctx.fault(FAULT_MALFORMED, at));
                }
            }
            OP_TLB_INVALIDATE => return Ok((plan, true)),
            _ => return Err(ctx.fault(FAULT_MALFORMED, at)),
        }
    }
}

#[cfg(test)]
mod tests;
