//! Dirty logging of the device's own writes to guest memory, for migration
//! (vfio-user DEVICE_FEATURE DMA_LOGGING_START/STOP/REPORT): the VMM copies
//! the guest memory the device wrote since it last asked.
//!
//! Every device write lands here through [`GuestMemory`](super::GuestMemory)
//! (fd-mapped copies and DMA_WRITE messages alike), marked before the write's
//! result is known, so a write that failed half-way is still reported: a page
//! reported clean must be clean, a page reported dirty may not be. Reads, and
//! the backend's own bookkeeping reads (the page tracker's snapshots), are
//! never marked.
//!
//! Pages are 4 KiB, kept as a sparse bitmap (one u64 per 64 pages that were
//! written), so a log costs nothing for memory the device never writes.

use std::collections::BTreeMap;

/// The page size the log keeps.
pub const LOG_PAGE_SIZE: u64 = 4096;
/// Most ranges one START may name (as Linux: one 4 KiB page of ranges).
pub const MAX_LOG_RANGES: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyLogError {
    #[error("dirty logging is already on")]
    AlreadyStarted,
    #[error("dirty logging is off")]
    NotStarted,
    #[error("{0} ranges to log, at most {MAX_LOG_RANGES}")]
    TooManyRanges(usize),
    #[error("page size {0:#x} is not a power of two of at least 4 KiB")]
    PageSize(u64),
    #[error("range {iova:#x}+{length:#x} is empty, not page-aligned or wraps")]
    BadRange { iova: u64, length: u64 },
    #[error("ranges overlap at {0:#x}")]
    Overlap(u64),
    #[error("a bitmap of {bytes} bytes is over the limit of {limit}")]
    ReportTooLarge { bytes: u64, limit: usize },
}

/// One range to log (`vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRange {
    pub iova: u64,
    pub length: u64,
}

/// The pages the device wrote while logging is on.
#[derive(Debug)]
pub struct DirtyLog {
    /// Sorted, disjoint; empty means everything is logged.
    ranges: Vec<LogRange>,
    /// Page frame / 64 -> which of those 64 pages were written.
    words: BTreeMap<u64, u64>,
}

fn check_page_size(page_size: u64) -> Result<(), DirtyLogError> {
    if page_size < LOG_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(DirtyLogError::PageSize(page_size));
    }
    Ok(())
}

impl DirtyLog {
    /// A log of `ranges` (none: all of guest memory), each aligned to the
    /// client's `page_size`.
    pub fn new(mut ranges: Vec<LogRange>, page_size: u64) -> Result<Self, DirtyLogError> {
        check_page_size(page_size)?;
        if ranges.len() > MAX_LOG_RANGES {
            return Err(DirtyLogError::TooManyRanges(ranges.len()));
        }
        for &LogRange { iova, length } in &ranges {
            let aligned = iova % page_size == 0 && length % page_size == 0;
            if length == 0 || !aligned || iova.checked_add(length).is_none() {
                return Err(DirtyLogError::BadRange { iova, length });
            }
        }
        ranges.sort_by_key(|r| r.iova);
        for pair in ranges.windows(2) {
            if pair[0].iova + pair[0].length > pair[1].iova {
                return Err(DirtyLogError::Overlap(pair[1].iova));
            }
        }
        Ok(DirtyLog {
            ranges,
            words: BTreeMap::new(),
        })
    }

    /// Marks the pages of `[gpa, gpa+len)` that lie in logged ranges.
    pub fn mark(&mut self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len as u64);
        if self.ranges.is_empty() {
            self.mark_pages(gpa, end);
            return;
        }
        let ranges = std::mem::take(&mut self.ranges);
        for r in &ranges {
            let (s, e) = (gpa.max(r.iova), end.min(r.iova + r.length));
            if s < e {
                self.mark_pages(s, e);
            }
        }
        self.ranges = ranges;
    }

    fn mark_pages(&mut self, start: u64, end: u64) {
        let (first, last) = (start / LOG_PAGE_SIZE, (end - 1) / LOG_PAGE_SIZE);
        for pfn in first..=last {
            *self.words.entry(pfn / 64).or_default() |= 1 << (pfn % 64);
        }
    }

    /// The bitmap of `[iova, iova+length)` at `page_size` per bit (u64 words,
    /// bit `i` for the page at `iova + i*page_size`), and clears what it
    /// reported: log pages wholly inside the range. A bitmap over
    /// `max_bytes` is refused before anything is allocated or cleared.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        max_bytes: usize,
    ) -> Result<Vec<u64>, DirtyLogError> {
        check_page_size(page_size)?;
        let end = iova
            .checked_add(length)
            .filter(|_| length > 0)
            .ok_or(DirtyLogError::BadRange { iova, length })?;
        let bits = length.div_ceil(page_size);
        let bytes = bits.div_ceil(64) * 8;
        if bytes > max_bytes as u64 {
            return Err(DirtyLogError::ReportTooLarge {
                bytes,
                limit: max_bytes,
            });
        }
        let mut bitmap = vec![0u64; bits.div_ceil(64) as usize];
        let (first, last) = (iova / LOG_PAGE_SIZE, (end - 1) / LOG_PAGE_SIZE);
        for (&word, set) in self.words.range_mut(first / 64..=last / 64) {
            let mut left = *set;
            while left != 0 {
                let bit = u64::from(left.trailing_zeros());
                left &= left - 1;
                let pfn = word * 64 + bit;
                if pfn < first || pfn > last {
                    continue;
                }
                let (page, page_end) = (pfn * LOG_PAGE_SIZE, (pfn + 1) * LOG_PAGE_SIZE);
                let (s, e) = (page.max(iova), page_end.min(end));
                for b in (s - iova) / page_size..=(e - 1 - iova) / page_size {
                    bitmap[(b / 64) as usize] |= 1 << (b % 64);
                }
                if page >= iova && page_end <= end {
                    *set &= !(1 << bit);
                }
            }
        }
        self.words.retain(|_, set| *set != 0);
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(iova: u64, length: u64) -> LogRange {
        LogRange { iova, length }
    }

    #[test]
    fn writes_in_ranges_are_reported_once_at_any_page_size() {
        let mut log = DirtyLog::new(vec![r(0x10_0000, 0x10_0000)], 4096).unwrap();
        log.mark(0x10_1ffc, 8); // straddles pages 0x101 and 0x102
        log.mark(0x5000, 4); // outside every range
        log.mark(0x1f_f000, 0x2000); // half outside
        let bm = log.report(0x10_0000, 0x10_0000, 4096, 1 << 20).unwrap();
        assert_eq!(bm.len(), 4);
        assert_eq!(bm[0], 0b110);
        assert_eq!(bm[3], 1 << 63);
        // Reported means cleared.
        assert!(log
            .report(0x10_0000, 0x10_0000, 4096, 1 << 20)
            .unwrap()
            .iter()
            .all(|&w| w == 0));
        log.mark(0x10_3000, 1);
        let bm = log.report(0x10_0000, 0x10_0000, 0x10000, 1 << 20).unwrap();
        assert_eq!(bm, vec![1]);
        assert_eq!(log.report(0, 0x1000, 4096, 1 << 20).unwrap(), vec![0]);
    }

    #[test]
    fn no_ranges_logs_everything_and_edges_stay_until_wholly_reported() {
        let mut log = DirtyLog::new(vec![], 4096).unwrap();
        log.mark(u64::MAX - 10, 100);
        log.mark(0x3000, 0x1000);
        // A report starting mid-page shows the page but keeps it logged.
        assert_eq!(
            log.report(0x3800, 0x1000, 4096, 1 << 20).unwrap(),
            vec![0b1]
        );
        assert_eq!(
            log.report(0x3000, 0x1000, 4096, 1 << 20).unwrap(),
            vec![0b1]
        );
        assert_eq!(log.report(0x3000, 0x1000, 4096, 1 << 20).unwrap(), vec![0]);
    }

    #[test]
    fn bad_starts_and_reports_are_errors() {
        assert!(matches!(
            DirtyLog::new(vec![r(0, 0x1000), r(0x800, 0x1000)], 0x800),
            Err(DirtyLogError::PageSize(0x800))
        ));
        assert_eq!(
            DirtyLog::new(vec![r(0, 0x2000), r(0x1000, 0x1000)], 4096).unwrap_err(),
            DirtyLogError::Overlap(0x1000)
        );
        assert!(DirtyLog::new(vec![r(0x1000, 0)], 4096).is_err());
        assert!(DirtyLog::new(vec![r(0x1800, 0x1000)], 4096).is_err());
        assert!(DirtyLog::new(vec![r(!0xfff, 0x2000)], 4096).is_err());
        assert!(DirtyLog::new(vec![r(0, 0x1000); MAX_LOG_RANGES + 1], 4096).is_err());
        let mut log = DirtyLog::new(vec![], 4096).unwrap();
        assert!(log.report(0, 0, 4096, 1 << 20).is_err());
        assert!(log.report(u64::MAX, 2, 4096, 1 << 20).is_err());
        assert!(log.report(0, 0x1000, 3 * 4096, 1 << 20).is_err());
        assert_eq!(
            log.report(0, 1 << 62, 4096, 1 << 20),
            Err(DirtyLogError::ReportTooLarge {
                bytes: 1 << 47,
                limit: 1 << 20
            })
        );
    }
}
