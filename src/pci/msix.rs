//! The MSI-X table and Pending Bit Array as they appear in a BAR.
//!
//! The table is stored here; masks and pending bits live in [`Interrupts`] so that
//! any thread can signal a vector. Accesses must be naturally aligned dwords or
//! qwords, as the PCI spec requires; anything else reads as zero and is dropped.

use tracing::debug;

use super::capability::MsixLayout;
use super::irq::Interrupts;

const ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL: u64 = 12;
const VECTOR_CTRL_MASKED: u32 = 1;

/// Which part of an MSI-X BAR an access falls into.
pub enum MsixPart {
    Table,
    Pba,
}

#[derive(Clone)]
pub struct MsixTable {
    layout: MsixLayout,
    /// Four dwords per vector: address low, address high, data, vector control.
    entries: Vec<[u32; 4]>,
}

impl MsixTable {
    pub fn new(layout: MsixLayout) -> Self {
        let mut t = MsixTable {
            layout,
            entries: Vec::new(),
        };
        t.reset();
        t
    }

    pub fn layout(&self) -> &MsixLayout {
        &self.layout
    }

    /// Power-on state: every vector masked, addresses and data zero.
    pub fn reset(&mut self) {
        self.entries = vec![[0, 0, 0, VECTOR_CTRL_MASKED]; self.layout.vectors as usize];
    }

    /// Whether `[offset, offset+len)` of `bar` touches the table or the PBA.
    pub fn claims(&self, bar: usize, offset: u64, len: usize) -> Option<MsixPart> {
        if bar != self.layout.bar {
            return None;
        }
        let end = offset.saturating_add(len as u64);
        let overlaps = |start: u64, size: u64| offset < start + size && end > start;
        if overlaps(self.layout.table_offset, self.layout.table_size()) {
            Some(MsixPart::Table)
        } else if overlaps(self.layout.pba_offset, self.layout.pba_size()) {
            Some(MsixPart::Pba)
        } else {
            None
        }
    }

    fn aligned(offset: u64, len: usize) -> bool {
        (len == 4 || len == 8) && offset.is_multiple_of(len as u64)
    }

    pub fn read(&self, part: MsixPart, offset: u64, data: &mut [u8], irqs: &Interrupts) {
        data.fill(0);
        if !Self::aligned(offset, data.len()) {
            debug!(
                offset,
                len = data.len(),
                "unaligned MSI-X access reads as zero"
            );
            return;
        }
        match part {
            MsixPart::Table => {
                for (i, chunk) in data.chunks_mut(4).enumerate() {
                    let rel = offset - self.layout.table_offset + 4 * i as u64;
                    if let Some(word) = self.word(rel) {
                        chunk.copy_from_slice(&word.to_le_bytes());
                    }
                }
            }
            MsixPart::Pba => {
                let rel = offset - self.layout.pba_offset;
                let qword = irqs.msix_pending_qword(((rel & !7) * 8) as u32);
                let bytes = qword.to_le_bytes();
                let start = (rel & 7) as usize;
                let n = data.len().min(8 - start);
                data[..n].copy_from_slice(&bytes[start..start + n]);
            }
        }
    }

    pub fn write(&mut self, part: MsixPart, offset: u64, data: &[u8], irqs: &Interrupts) {
        if !Self::aligned(offset, data.len()) {
            debug!(offset, len = data.len(), "unaligned MSI-X write dropped");
            return;
        }
        // The PBA is read-only.
        if let MsixPart::Table = part {
            for (i, chunk) in data.chunks(4).enumerate() {
                let rel = offset - self.layout.table_offset + 4 * i as u64;
                let value = u32::from_le_bytes(chunk.try_into().unwrap_or_default());
                let (vector, word) = ((rel / ENTRY_SIZE) as usize, (rel % ENTRY_SIZE) / 4);
                if let Some(entry) = self.entries.get_mut(vector) {
                    entry[word as usize] = value;
                    if rel % ENTRY_SIZE == VECTOR_CTRL {
                        irqs.update_msix_table_mask(vector as u32, value & VECTOR_CTRL_MASKED != 0);
                    }
                }
            }
        }
    }

    /// The table's entries (four dwords per vector), for a state snapshot.
    pub fn save(&self, s: &mut crate::state::SectionWriter) {
        s.u64(self.entries.len() as u64);
        for e in &self.entries {
            e.iter().for_each(|&w| s.u32(w));
        }
    }

    /// Entries as [`save`](Self::save) wrote them, for a table of the same
    /// size; nothing changes unless all of them read.
    pub fn restore(
        &mut self,
        r: &mut crate::state::SectionReader<'_>,
    ) -> Result<(), crate::state::StateError> {
        let n = r.count(16)?;
        if n != self.entries.len() {
            return Err(crate::state::StateError::Invalid(
                "MSI-X table of another size",
            ));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push([r.u32()?, r.u32()?, r.u32()?, r.u32()?]);
        }
        self.entries = entries;
        Ok(())
    }

    fn word(&self, rel: u64) -> Option<u32> {
        let entry = self.entries.get((rel / ENTRY_SIZE) as usize)?;
        Some(entry[((rel % ENTRY_SIZE) / 4) as usize])
    }
}
