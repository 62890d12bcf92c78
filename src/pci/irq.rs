//! Interrupt delivery: INTx, MSI and MSI-X vectors signalled on the eventfds the
//! client installs with SET_IRQS, plus the ERR and REQ indices.
//!
//! Any thread may signal: the device's worker writes the eventfd itself, with no
//! trip through the session loop. Masking follows vfio: INTx is level-triggered and
//! auto-masked after each signal until the client unmasks it; an MSI/MSI-X vector
//! that fires while masked is remembered as pending (the MSI-X PBA) and signalled
//! when it is unmasked.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use tracing::{debug, trace};

use super::irqfd::{IrqFd, IrqFdError};

use crate::vfio_user::wire::{
    IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_MASK_ALL, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_MASK,
};

/// The IRQ indices of a vfio PCI device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqIndex {
    Intx = 0,
    Msi = 1,
    Msix = 2,
    Err = 3,
    Req = 4,
}

impl IrqIndex {
    pub const ALL: [IrqIndex; 5] = [
        IrqIndex::Intx,
        IrqIndex::Msi,
        IrqIndex::Msix,
        IrqIndex::Err,
        IrqIndex::Req,
    ];

    pub fn from_raw(raw: u32) -> Option<IrqIndex> {
        IrqIndex::ALL.get(raw as usize).copied()
    }
}

/// Errors of SET_IRQS.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("IRQ index {0} does not exist")]
    BadIndex(u32),
    #[error("SET_IRQS flags {0:#x} must name exactly one data kind and one action")]
    BadFlags(u32),
    #[error("vectors {start}+{count} exceed the {available} of this index")]
    BadRange {
        start: u32,
        count: u32,
        available: u32,
    },
    #[error("{got} fds arrived for {want} vectors")]
    FdCount { got: usize, want: u32 },
    #[error("{got} bytes of booleans arrived for {want} vectors")]
    BoolCount { got: usize, want: u32 },
    #[error("this action is not supported on IRQ index {0:?}")]
    Unsupported(IrqIndex),
    #[error(transparent)]
    Fd(#[from] IrqFdError),
}

/// What a SET_IRQS request carries for its vectors.
pub enum IrqSetData<'a> {
    None,
    Bool(&'a [u8]),
    /// One entry per vector; `None` de-assigns (the client sent fd -1).
    Eventfds(Vec<Option<OwnedFd>>),
}

#[derive(Default)]
struct Vector {
    eventfd: Option<IrqFd>,
    /// Masked through SET_IRQS.
    masked: bool,
    pending: bool,
}

#[derive(Default)]
struct IrqState {
    vectors: [Vec<Vector>; 5],
    msi_enabled: bool,
    /// Vectors the guest enabled in the MSI capability (Multiple Message Enable).
    msi_vectors: u32,
    msix_enabled: bool,
    msix_function_mask: bool,
    /// Vector Control mask bits of our MSI-X table.
    msix_table_mask: Vec<bool>,
    /// Whether the client has written our MSI-X table since reset. Clients that
    /// emulate the table themselves (QEMU, Cloud Hypervisor) never do and mask
    /// through SET_IRQS; only a client that writes the table is bound by its bits.
    msix_table_in_use: bool,
    intx_level: bool,
    /// INTx signalled and not yet unmasked by the client (vfio auto-masking).
    intx_automasked: bool,
    /// Command register Interrupt Disable.
    intx_disabled: bool,
}

/// The interrupt state of one device, shared by the session and the device.
pub struct Interrupts {
    state: Mutex<IrqState>,
    counts: [u32; 5],
    /// Thread unmasking INTx when the client's resample eventfd fires. Kept out of
    /// `state`: stopping it joins a thread that itself takes the state lock.
    intx_resampler: Mutex<Option<Resampler>>,
}

/// Watches an INTx unmask eventfd (SET_IRQS UNMASK with DATA_EVENTFD): QEMU
/// with KVM hands one over so that a guest EOI unmasks the line without a message.
struct Resampler {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Resampler {
    fn spawn(fd: IrqFd, irqs: Weak<Interrupts>) -> Option<Resampler> {
        let stop = EventFd::new(0).ok()?;
        let stop_fd = stop.try_clone().ok()?;
        let thread = std::thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || loop {
                if crate::wait::wait_readable(fd.as_raw_fd(), stop_fd.as_raw_fd())
                    == crate::wait::Wake::Stop
                {
                    return;
                }
                fd.take();
                match irqs.upgrade() {
                    Some(irqs) => irqs.unmask_intx(),
                    None => return,
                }
            })
            .ok()?;
        Some(Resampler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The device's handle for raising interrupts.
pub type InterruptHandle = Arc<Interrupts>;

fn signal(fd: &IrqFd) {
    fd.signal();
}

impl Interrupts {
    /// `msi_vectors`/`msix_vectors`: how many the device's capabilities offer.
    pub fn new(msi_vectors: u32, msix_vectors: u32) -> InterruptHandle {
        let counts = [1, msi_vectors, msix_vectors, 1, 1];
        let mut state = IrqState::default();
        for (v, &n) in state.vectors.iter_mut().zip(&counts) {
            v.resize_with(n as usize, Vector::default);
        }
        state.msix_table_mask = vec![true; msix_vectors as usize];
        Arc::new(Interrupts {
            state: Mutex::new(state),
            counts,
            intx_resampler: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// DEVICE_GET_IRQ_INFO: (flags, count) of an index.
    pub fn info(&self, index: IrqIndex) -> (u32, u32) {
        let count = self.counts[index as usize];
        let flags = match index {
            IrqIndex::Intx => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            IrqIndex::Msi => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            // No NORESIZE: QEMU then adds MSI-X vectors one at a time instead of
            // tearing all of them down for each new one.
            IrqIndex::Msix => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
            IrqIndex::Err | IrqIndex::Req => IRQ_INFO_EVENTFD,
        };
        (flags, count)
    }

    // ---- device side -------------------------------------------------------

    /// Whether the guest enabled MSI.
    pub fn msi_enabled(&self) -> bool {
        self.lock().msi_enabled
    }

    /// Whether the guest enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.lock().msix_enabled
    }

    /// Signals message vector `vector`: an MSI-X vector when MSI-X is enabled,
    /// else an MSI vector when MSI is enabled; dropped otherwise (as on hardware).
    pub fn notify(&self, vector: u32) {
        let mut s = self.lock();
        if s.msix_enabled {
            Self::fire_msix(&mut s, vector);
        } else if s.msi_enabled {
            if vector < s.msi_vectors.max(1) {
                Self::fire(&mut s, IrqIndex::Msi, vector, false);
            }
        } else {
            trace!(vector, "message interrupt dropped: MSI and MSI-X disabled");
        }
    }

    /// Drives the INTx line.
    pub fn set_intx(&self, asserted: bool) {
        let mut s = self.lock();
        s.intx_level = asserted;
        if !asserted {
            if let Some(v) = s.vectors[0].first_mut() {
                v.pending = false;
            }
            return;
        }
        Self::fire_intx(&mut s);
    }

    /// The INTx line level (PCI status register Interrupt Status).
    pub fn intx_level(&self) -> bool {
        self.lock().intx_level
    }

    /// Signals the ERR or REQ eventfd, if the client installed one.
    pub fn signal_index(&self, index: IrqIndex) {
        let mut s = self.lock();
        Self::fire(&mut s, index, 0, false);
    }

    fn fire_intx(s: &mut IrqState) {
        if !s.intx_level || s.intx_disabled || s.msi_enabled || s.msix_enabled {
            return;
        }
        let automasked = s.intx_automasked;
        let Some(v) = s.vectors[0].first_mut() else {
            return;
        };
        if automasked || v.masked {
            v.pending = true;
            return;
        }
        if let Some(fd) = &v.eventfd {
            signal(fd);
            s.intx_automasked = true;
            v.pending = false;
        }
    }

    fn fire_msix(s: &mut IrqState, vector: u32) {
        let table_masked = s.msix_table_in_use
            && s.msix_table_mask
                .get(vector as usize)
                .copied()
                .unwrap_or(true);
        Self::fire(
            s,
            IrqIndex::Msix,
            vector,
            s.msix_function_mask || table_masked,
        );
    }

    fn fire(s: &mut IrqState, index: IrqIndex, vector: u32, extra_mask: bool) {
        let Some(v) = s.vectors[index as usize].get_mut(vector as usize) else {
            debug!(
                ?index,
                vector, "interrupt for a vector the device does not have"
            );
            return;
        };
        if v.masked || extra_mask {
            v.pending = true;
            return;
        }
        v.pending = false;
        match &v.eventfd {
            Some(fd) => signal(fd),
            None => trace!(?index, vector, "no eventfd installed; interrupt dropped"),
        }
    }

    /// Signals every pending MSI-X vector that is no longer masked.
    fn flush_msix_pending(s: &mut IrqState) {
        if !s.msix_enabled {
            return;
        }
        for vector in 0..s.vectors[2].len() as u32 {
            if s.vectors[2][vector as usize].pending {
                Self::fire_msix(s, vector);
            }
        }
    }

    // ---- framework side (config space and SET_IRQS) ------------------------

    /// The MSI capability's Enable and Multiple Message Enable changed.
    pub fn update_msi(&self, enabled: bool, vectors: u32) {
        let mut s = self.lock();
        s.msi_enabled = enabled;
        s.msi_vectors = vectors;
    }

    /// The MSI-X capability's Enable and Function Mask changed.
    pub fn update_msix(&self, enabled: bool, function_mask: bool) {
        let mut s = self.lock();
        s.msix_enabled = enabled;
        s.msix_function_mask = function_mask;
        Self::flush_msix_pending(&mut s);
    }

    /// The client wrote the Vector Control word of table entry `vector`.
    pub fn update_msix_table_mask(&self, vector: u32, masked: bool) {
        let mut s = self.lock();
        s.msix_table_in_use = true;
        if let Some(m) = s.msix_table_mask.get_mut(vector as usize) {
            *m = masked;
        }
        Self::flush_msix_pending(&mut s);
    }

    /// Command register Interrupt Disable changed.
    pub fn update_intx_disable(&self, disabled: bool) {
        let mut s = self.lock();
        s.intx_disabled = disabled;
        if !disabled {
            Self::fire_intx(&mut s);
        }
    }

    /// MSI-X Pending Bit Array bits `first..first+64` as one qword.
    pub fn msix_pending_qword(&self, first: u32) -> u64 {
        let s = self.lock();
        (0..64)
            .filter(|i| {
                s.vectors[2]
                    .get((first + i) as usize)
                    .is_some_and(|v| v.pending)
            })
            .fold(0u64, |acc, i| acc | (1 << i))
    }

    /// The client unmasked INTx (message or resample eventfd).
    fn unmask_intx(&self) {
        let mut s = self.lock();
        if let Some(v) = s.vectors[0].first_mut() {
            v.masked = false;
        }
        s.intx_automasked = false;
        Self::fire_intx(&mut s);
    }

    fn set_intx_resampler(self: &Arc<Self>, fd: Option<IrqFd>) {
        let new = fd.and_then(|fd| Resampler::spawn(fd, Arc::downgrade(self)));
        let old = std::mem::replace(
            &mut *self
                .intx_resampler
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            new,
        );
        drop(old);
    }

    /// DEVICE_SET_IRQS.
    pub fn set_irqs(
        self: &Arc<Self>,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqSetData<'_>,
    ) -> Result<(), IrqError> {
        let index = IrqIndex::from_raw(index).ok_or(IrqError::BadIndex(index))?;
        let data_kind = flags & IRQ_SET_DATA_MASK;
        let action = flags & IRQ_SET_ACTION_MASK_ALL;
        if data_kind.count_ones() != 1
            || action.count_ones() != 1
            || flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
        {
            return Err(IrqError::BadFlags(flags));
        }
        let available = self.counts[index as usize];
        let end = start.checked_add(count);
        if end.is_none_or(|end| end > available) || (count == 0 && start != 0) {
            return Err(IrqError::BadRange {
                start,
                count,
                available,
            });
        }
        match &data {
            IrqSetData::Eventfds(fds) if fds.len() != count as usize => {
                return Err(IrqError::FdCount {
                    got: fds.len(),
                    want: count,
                })
            }
            IrqSetData::Bool(b) if b.len() != count as usize => {
                return Err(IrqError::BoolCount {
                    got: b.len(),
                    want: count,
                })
            }
            _ => {}
        }
        // Every fd is checked before anything changes: one that is not an
        // eventfd fails the whole request (`irqfd`).
        let (data, eventfds) = match data {
            IrqSetData::Eventfds(fds) => {
                let fds = fds
                    .into_iter()
                    .map(|fd| fd.map(IrqFd::new).transpose())
                    .collect::<Result<Vec<_>, _>>()?;
                (IrqSetData::Eventfds(Vec::new()), Some(fds))
            }
            other => (other, None),
        };
        let mut s = self.lock();
        let selected = |i: u32| match &data {
            IrqSetData::Bool(b) => b[i as usize] != 0,
            _ => true,
        };
        match action {
            IRQ_SET_ACTION_TRIGGER => match (&data, eventfds) {
                (_, Some(fds)) => {
                    for (i, fd) in fds.into_iter().enumerate() {
                        s.vectors[index as usize][start as usize + i].eventfd = fd;
                    }
                    debug!(?index, start, count, "interrupt eventfds set");
                }
                (IrqSetData::None, None) if count == 0 => {
                    for v in s.vectors[index as usize].iter_mut() {
                        *v = Vector::default();
                    }
                    if index == IrqIndex::Intx {
                        s.intx_automasked = false;
                    }
                    debug!(?index, "interrupts disabled");
                }
                _ => {
                    // Loopback trigger, as the kernel offers for testing.
                    for i in 0..count {
                        if selected(i) {
                            if let Some(fd) =
                                &s.vectors[index as usize][(start + i) as usize].eventfd
                            {
                                signal(fd);
                            }
                        }
                    }
                }
            },
            IRQ_SET_ACTION_UNMASK if index == IrqIndex::Intx && eventfds.is_some() => {
                drop(s);
                if let Some(mut fds) = eventfds {
                    self.set_intx_resampler(fds.pop().flatten());
                }
                debug!("INTx unmask eventfd set");
            }
            IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK => {
                if matches!(data, IrqSetData::Eventfds(_)) {
                    // Only INTx has an unmask eventfd, as in the kernel's vfio-pci.
                    return Err(IrqError::Unsupported(index));
                }
                if matches!(index, IrqIndex::Err | IrqIndex::Req) {
                    return Err(IrqError::Unsupported(index));
                }
                let mask = action == IRQ_SET_ACTION_MASK;
                for i in 0..count {
                    if selected(i) {
                        s.vectors[index as usize][(start + i) as usize].masked = mask;
                    }
                }
                if !mask {
                    match index {
                        IrqIndex::Intx => {
                            drop(s);
                            self.unmask_intx();
                            return Ok(());
                        }
                        IrqIndex::Msix => Self::flush_msix_pending(&mut s),
                        IrqIndex::Msi => {
                            for i in start..start + count {
                                if s.vectors[1][i as usize].pending {
                                    Self::fire(&mut s, IrqIndex::Msi, i, false);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => return Err(IrqError::BadFlags(flags)),
        }
        Ok(())
    }

    /// Device reset: masks, pending bits and modes to power-on state; the client's
    /// eventfds stay installed (the client tears them down itself).
    pub fn reset(&self) {
        let mut s = self.lock();
        for vectors in s.vectors.iter_mut() {
            for v in vectors.iter_mut() {
                v.masked = false;
                v.pending = false;
            }
        }
        s.msi_enabled = false;
        s.msi_vectors = 0;
        s.msix_enabled = false;
        s.msix_function_mask = false;
        s.msix_table_mask.iter_mut().for_each(|m| *m = true);
        s.msix_table_in_use = false;
        s.intx_level = false;
        s.intx_automasked = false;
        s.intx_disabled = false;
    }

    /// The client went away: forget its eventfds as well.
    pub fn disconnect(self: &Arc<Self>) {
        self.set_intx_resampler(None);
        self.reset();
        let mut s = self.lock();
        for vectors in s.vectors.iter_mut() {
            for v in vectors.iter_mut() {
                v.eventfd = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio_user::wire::{IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn efd() -> (EventFd, OwnedFd) {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup of a live eventfd; the OwnedFd takes the new descriptor.
        let owned =
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(e.as_raw_fd())) };
        (e, owned)
    }

    fn fired(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    #[test]
    fn msix_mask_pending_unmask() {
        let irqs = Interrupts::new(1, 4);
        let (e, fd) = efd();
        irqs.set_irqs(
            2,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            1,
            1,
            IrqSetData::Eventfds(vec![Some(fd)]),
        )
        .unwrap();
        irqs.update_msix(true, false);
        irqs.notify(1);
        assert!(fired(&e));
        irqs.set_irqs(
            2,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
            1,
            1,
            IrqSetData::None,
        )
        .unwrap();
        irqs.notify(1);
        assert!(!fired(&e));
        assert_eq!(irqs.msix_pending_qword(0), 0b10);
        irqs.set_irqs(
            2,
            IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK,
            1,
            1,
            IrqSetData::Bool(&[1]),
        )
        .unwrap();
        assert!(fired(&e));
        assert_eq!(irqs.msix_pending_qword(0), 0);
        // Function mask holds it pending too.
        irqs.update_msix(true, true);
        irqs.notify(1);
        assert!(!fired(&e));
        irqs.update_msix(true, false);
        assert!(fired(&e));
    }

    #[test]
    fn intx_automask() {
        let irqs = Interrupts::new(0, 0);
        let (e, fd) = efd();
        irqs.set_irqs(
            0,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            IrqSetData::Eventfds(vec![Some(fd)]),
        )
        .unwrap();
        irqs.set_intx(true);
        assert!(fired(&e));
        irqs.set_intx(true);
        assert!(!fired(&e), "auto-masked until unmasked");
        irqs.set_irqs(
            0,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
            0,
            1,
            IrqSetData::None,
        )
        .unwrap();
        assert!(fired(&e), "still asserted: fires again on unmask");
        irqs.set_intx(false);
        irqs.set_irqs(
            0,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
            0,
            1,
            IrqSetData::None,
        )
        .unwrap();
        assert!(!fired(&e));
    }

    #[test]
    fn intx_unmask_eventfd() {
        let irqs = Interrupts::new(0, 0);
        let (e, fd) = efd();
        let (resample, resample_fd) = efd();
        irqs.set_irqs(
            0,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            IrqSetData::Eventfds(vec![Some(fd)]),
        )
        .unwrap();
        irqs.set_irqs(
            0,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
            0,
            1,
            IrqSetData::Eventfds(vec![Some(resample_fd)]),
        )
        .unwrap();
        irqs.set_intx(true);
        assert!(fired(&e));
        irqs.set_intx(true);
        assert!(!fired(&e));
        // The guest's EOI, as KVM would signal it: the line is unmasked and, still
        // asserted, fires again.
        resample.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !fired(&e) {
            assert!(
                std::time::Instant::now() < deadline,
                "resample did not unmask"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        irqs.disconnect();
    }

    #[test]
    fn bad_requests() {
        let irqs = Interrupts::new(1, 2);
        assert!(matches!(
            irqs.set_irqs(
                9,
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                IrqSetData::None
            ),
            Err(IrqError::BadIndex(9))
        ));
        assert!(matches!(
            irqs.set_irqs(
                2,
                IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                IrqSetData::None
            ),
            Err(IrqError::BadFlags(_))
        ));
        assert!(matches!(
            irqs.set_irqs(
                2,
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                1,
                2,
                IrqSetData::None
            ),
            Err(IrqError::BadRange { .. })
        ));
        assert!(matches!(
            irqs.set_irqs(
                2,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                0,
                2,
                IrqSetData::Eventfds(vec![None])
            ),
            Err(IrqError::FdCount { .. })
        ));
    }
}
