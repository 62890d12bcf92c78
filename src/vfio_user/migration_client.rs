//! The client's migration calls (DEVICE_FEATURE migration and DMA logging,
//! MIG_DATA_READ/WRITE), and [`migrate`]: what a VMM does to move a running
//! device from one server to another.

use std::mem::size_of;
use std::time::{Duration, Instant};

use super::client::{Client, ClientError, ProtocolError, Result};
use super::wire::*;
use crate::memory::dirty_log::{LogRange, LOG_PAGE_SIZE};
use crate::migration::MigrationState;

/// Largest piece of migration data one MIG_DATA message carries here.
pub const MIG_CHUNK: u32 = 1 << 20;

fn short(len: usize, what: &'static str) -> ClientError {
    ProtocolError::ShortPayload { len, what }.into()
}

impl Client {
    /// DEVICE_FEATURE with `flags` and `data`, taking up to `room` bytes of
    /// reply data; returns the reply's data (after the head).
    pub fn device_feature(&mut self, flags: u32, data: &[u8], room: usize) -> Result<Vec<u8>> {
        let head = DeviceFeature {
            argsz: (size_of::<DeviceFeature>() + room.max(data.len())) as u32,
            flags,
        };
        let r = self.request(Command::DeviceFeature, &[head.as_bytes(), data], &[])?;
        let at = size_of::<DeviceFeature>();
        if r.payload.len() < at {
            return Err(short(r.payload.len(), "DEVICE_FEATURE reply"));
        }
        Ok(r.payload[at..].to_vec())
    }

    /// Whether the server has `feature` with the GET/SET `ops` (PROBE).
    pub fn probe_feature(&mut self, feature: u32, ops: u32) -> Result<bool> {
        match self.device_feature(feature | ops | FEATURE_PROBE, &[], 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno().is_some() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn get_u64_feature(&mut self, feature: u32, what: &'static str) -> Result<u64> {
        let d = self.device_feature(feature | FEATURE_GET, &[], 8)?;
        let bytes = d.get(..8).ok_or_else(|| short(d.len(), what))?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
    }

    /// The device's `VFIO_MIGRATION_*` flags.
    pub fn migration_flags(&mut self) -> Result<u64> {
        self.get_u64_feature(FEATURE_MIGRATION, "MIGRATION")
    }

    /// The bytes the device expects STOP_COPY to produce.
    pub fn mig_data_size(&mut self) -> Result<u64> {
        self.get_u64_feature(FEATURE_MIG_DATA_SIZE, "MIG_DATA_SIZE")
    }

    pub fn migration_state(&mut self) -> Result<u32> {
        let d = self.device_feature(
            FEATURE_MIG_DEVICE_STATE | FEATURE_GET,
            &[],
            size_of::<MigDeviceState>(),
        )?;
        let s = MigDeviceState::read_from(&d).ok_or_else(|| short(d.len(), "MIG_DEVICE_STATE"))?;
        Ok(s.device_state)
    }

    /// Moves the device to `state` (a raw number, so tests can send any).
    pub fn set_migration_state(&mut self, state: u32) -> Result<()> {
        let s = MigDeviceState {
            device_state: state,
            data_fd: -1,
        };
        self.device_feature(
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            s.as_bytes(),
            size_of::<MigDeviceState>(),
        )?;
        Ok(())
    }

    /// MIG_DATA_READ of up to `size` bytes.
    pub fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>> {
        let ask = MigData {
            argsz: size_of::<MigData>() as u32 + size,
            size,
        };
        let r = self.request(Command::MigDataRead, &[ask.as_bytes()], &[])?;
        let head = MigData::read_from(&r.payload)
            .ok_or_else(|| short(r.payload.len(), "MIG_DATA_READ reply"))?;
        // The reply may carry room past `size` (libvfio-user pads it).
        let data = &r.payload[size_of::<MigData>()..];
        if head.size > size || head.size as usize > data.len() {
            return Err(short(data.len(), "MIG_DATA_READ data"));
        }
        Ok(data[..head.size as usize].to_vec())
    }

    /// Reads migration data until a short read says there is no more for now.
    pub fn mig_data_read_all(&mut self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let piece = self.mig_data_read(MIG_CHUNK)?;
            let more = piece.len() == MIG_CHUNK as usize;
            all.extend_from_slice(&piece);
            if !more {
                return Ok(all);
            }
        }
    }

    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<()> {
        let head = MigData {
            argsz: size_of::<MigData>() as u32,
            size: data.len() as u32,
        };
        self.request(Command::MigDataWrite, &[head.as_bytes(), data], &[])?;
        Ok(())
    }

    /// Writes `data` in MIG_DATA_WRITE pieces of at most [`MIG_CHUNK`].
    pub fn mig_data_write_all(&mut self, data: &[u8]) -> Result<()> {
        data.chunks(MIG_CHUNK as usize)
            .try_for_each(|piece| self.mig_data_write(piece))
    }

    /// Starts logging the device's writes to `ranges` (none: all memory);
    /// returns the page size the device keeps.
    pub fn dma_logging_start(&mut self, page_size: u64, ranges: &[LogRange]) -> Result<u64> {
        let control = DmaLoggingControl {
            page_size,
            num_ranges: ranges.len() as u32,
            reserved: 0,
        };
        let mut data = control.as_bytes().to_vec();
        for r in ranges {
            let range = DmaLoggingRange {
                iova: r.iova,
                length: r.length,
            };
            data.extend_from_slice(range.as_bytes());
        }
        let d = self.device_feature(FEATURE_DMA_LOGGING_START | FEATURE_SET, &data, 0)?;
        let granted = DmaLoggingControl::read_from(&d)
            .ok_or_else(|| short(d.len(), "DMA_LOGGING_START reply"))?;
        Ok(granted.page_size)
    }

    pub fn dma_logging_stop(&mut self) -> Result<()> {
        self.device_feature(FEATURE_DMA_LOGGING_STOP | FEATURE_SET, &[], 0)?;
        Ok(())
    }

    /// The device's dirty bitmap of `[iova, iova+length)` at `page_size` per
    /// bit, cleared by the call.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>> {
        let ask = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let words = length.div_ceil(page_size.max(1)).div_ceil(64) as usize;
        let room = size_of::<DmaLoggingReport>() + words * 8;
        let d = self.device_feature(
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            ask.as_bytes(),
            room,
        )?;
        let bitmap = &d[size_of::<DmaLoggingReport>().min(d.len())..];
        if bitmap.len() != words * 8 {
            return Err(short(bitmap.len(), "DMA_LOGGING_REPORT bitmap"));
        }
        Ok(bitmap
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect())
    }
}

/// What [`migrate`] did.
#[derive(Debug, Default, Clone)]
pub struct MigrationReport {
    /// Device state bytes sent while the device ran.
    pub precopy_bytes: usize,
    /// Device state bytes sent after it stopped.
    pub stop_copy_bytes: usize,
    /// Guest pages the device dirtied while memory was copied, copied again.
    pub dirty_pages: u64,
    /// From the source's STOP_COPY until the destination runs.
    pub downtime: Duration,
}

/// A migration under way, as a VMM drives it: [`begin`](Self::begin) while
/// the source runs (dirty logging on, PRE_COPY, guest memory copied, the
/// early device state sent), [`finish`](Self::finish) to stop the source and
/// start the destination. The guest keeps running on the source in between.
pub struct Migration {
    memory: Vec<(u64, u64)>,
    page: u64,
    report: MigrationReport,
}

impl Migration {
    /// `memory` lists the guest RAM ranges (gpa, size); `copy(gpa, len)`
    /// copies that guest memory from the source VM to the destination VM.
    pub fn begin(
        src: &mut Client,
        dst: &mut Client,
        memory: &[(u64, u64)],
        copy: &mut dyn FnMut(u64, u64),
    ) -> Result<Migration> {
        let ranges: Vec<LogRange> = memory
            .iter()
            .map(|&(iova, length)| LogRange { iova, length })
            .collect();
        let page = src.dma_logging_start(LOG_PAGE_SIZE, &ranges)?;
        src.set_migration_state(MigrationState::PreCopy as u32)?;
        dst.set_migration_state(MigrationState::Resuming as u32)?;
        for &(gpa, size) in memory {
            copy(gpa, size);
        }
        let mut m = Migration {
            memory: memory.to_vec(),
            page,
            report: MigrationReport::default(),
        };
        m.precopy(src, dst)?;
        Ok(m)
    }

    /// Another pre-copy round: what changed in the device's state since the
    /// last one. Returns the bytes sent.
    pub fn precopy(&mut self, src: &mut Client, dst: &mut Client) -> Result<usize> {
        let data = src.mig_data_read_all()?;
        dst.mig_data_write_all(&data)?;
        self.report.precopy_bytes += data.len();
        Ok(data.len())
    }

    /// Stops the source (STOP_COPY), sends the rest of its state and copies
    /// the pages its device dirtied, then starts the destination.
    pub fn finish(
        mut self,
        src: &mut Client,
        dst: &mut Client,
        copy: &mut dyn FnMut(u64, u64),
    ) -> Result<MigrationReport> {
        let stopped = Instant::now();
        src.set_migration_state(MigrationState::StopCopy as u32)?;
        let last = src.mig_data_read_all()?;
        self.report.stop_copy_bytes = last.len();
        dst.mig_data_write_all(&last)?;
        let page = self.page;
        for &(gpa, size) in &self.memory {
            let bitmap = src.dma_logging_report(gpa, size, page)?;
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let at = gpa + (w as u64 * 64 + bit) * page;
                    copy(at, page.min(gpa + size - at));
                    self.report.dirty_pages += 1;
                }
            }
        }
        dst.set_migration_state(MigrationState::Running as u32)?;
        self.report.downtime = stopped.elapsed();
        src.dma_logging_stop()?;
        src.set_migration_state(MigrationState::Stop as u32)?;
        Ok(self.report)
    }
}

/// [`Migration::begin`] then [`Migration::finish`]: the whole move, with
/// nothing running on the guest's side in between.
pub fn migrate(
    src: &mut Client,
    dst: &mut Client,
    memory: &[(u64, u64)],
    copy: &mut dyn FnMut(u64, u64),
) -> Result<MigrationReport> {
    Migration::begin(src, dst, memory, copy)?.finish(src, dst, copy)
}
