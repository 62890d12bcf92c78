//! Interrupt delivery: INTx, MSI and MSI-X vectors signalled on the eventfds the
//! client installs with SET_IRQS, plus the ERR and REQ indices.
//!
//! Any thread may signal: the device's worker writes the eventfd itself, with no
//! trip through the session loop. Masking follows vfio: INTx is level-triggered and
//! auto-masked after each signal until the client unmasks it; an MSI/MSI-X vector
//! that fires while masked is remembered as pending (the MSI-X PBA) and signalled
//! when it is unmasked.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};

use tracing::{debug, trace};

use super::irqfd::{IrqFd, IrqFdError};
use crate::event::{EventSet, EventSource};

/// The kinds of interrupt a PCI function has, in vfio's index order (the
/// transport maps its own numbering onto these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    Intx = 0,
    Msi = 1,
    Msix = 2,
    Err = 3,
    Req = 4,
}

impl IrqKind {
    pub const ALL: [IrqKind; 5] = [
        IrqKind::Intx,
        IrqKind::Msi,
        IrqKind::Msix,
        IrqKind::Err,
        IrqKind::Req,
    ];
}

/// What an interrupt kind offers (vfio's GET_IRQ_INFO, typed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqKindInfo {
    /// Vectors of this kind.
    pub count: u32,
    /// Vectors can be masked and unmasked.
    pub maskable: bool,
    /// Signalling masks the vector until it is unmasked (INTx).
    pub automasked: bool,
    /// Vectors can be assigned some at a time (else all are torn down and set
    /// up again for each change).
    pub resizable: bool,
}

/// Errors of interrupt set-up requests.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("vectors {start}+{count} exceed the {available} of this kind")]
    BadRange {
        start: u32,
        count: u32,
        available: u32,
    },
    #[error("{got} selection flags for {want} vectors")]
    SelectCount { got: usize, want: u32 },
    #[error("this action is not supported for {0:?} interrupts")]
    Unsupported(IrqKind),
    #[error(transparent)]
    Fd(#[from] IrqFdError),
}

/// Vectors `first..first + count` of one kind, each of them, or those whose
/// byte in `select` is non-zero.
#[derive(Clone, Copy, Debug)]
pub struct VectorRange<'a> {
    pub first: u32,
    pub count: u32,
    pub select: Option<&'a [u8]>,
}

impl<'a> VectorRange<'a> {
    pub fn all(first: u32, count: u32) -> Self {
        VectorRange {
            first,
            count,
            select: None,
        }
    }

    fn selected(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.count)
            .filter(|&i| self.select.is_none_or(|s| s[i as usize] != 0))
            .map(|i| self.first + i)
    }
}

/// Interrupt state read from a snapshot ([`Interrupts::parse_state`]).
#[derive(Debug)]
pub struct IrqSnapshot {
    /// (masked, pending) per vector of each kind.
    flags: [Vec<(bool, bool)>; 5],
    modes: Modes,
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
    modes: Modes,
}

/// Everything of the interrupt state but the vectors: what a snapshot
/// carries as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modes {
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
    /// The unmask eventfd's fd while one is installed (its source is in `events`).
    intx_unmask: Mutex<Option<RawFd>>,
    /// Helper fds for the session's event loop (the INTx unmask eventfd).
    events: Arc<EventSet>,
}

/// INTx's unmask eventfd (SET_IRQS UNMASK with DATA_EVENTFD): QEMU with KVM
/// hands one over so that a guest EOI unmasks the line without a message.
/// Served by the session's event loop (`crate::event`).
struct IntxUnmask {
    fd: IrqFd,
    irqs: Weak<Interrupts>,
}

impl EventSource for IntxUnmask {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ready(&self) {
        self.fd.take();
        if let Some(irqs) = self.irqs.upgrade() {
            irqs.unmask_intx();
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
        state.modes.msix_table_mask = vec![true; msix_vectors as usize];
        Arc::new(Interrupts {
            state: Mutex::new(state),
            counts,
            intx_unmask: Mutex::new(None),
            events: Arc::new(EventSet::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `kind` offers.
    pub fn info(&self, kind: IrqKind) -> IrqKindInfo {
        let count = self.counts[kind as usize];
        let (maskable, automasked, resizable) = match kind {
            IrqKind::Intx => (true, true, true),
            IrqKind::Msi => (true, false, false),
            // Resizable: QEMU then adds MSI-X vectors one at a time instead of
            // tearing all of them down for each new one.
            IrqKind::Msix => (true, false, true),
            IrqKind::Err | IrqKind::Req => (false, false, true),
        };
        IrqKindInfo {
            count,
            maskable,
            automasked,
            resizable,
        }
    }

    // ---- device side -------------------------------------------------------

    /// Whether the guest enabled MSI.
    pub fn msi_enabled(&self) -> bool {
        self.lock().modes.msi_enabled
    }

    /// Whether the guest enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.lock().modes.msix_enabled
    }

    /// Signals message vector `vector`: an MSI-X vector when MSI-X is enabled,
    /// else an MSI vector when MSI is enabled; dropped otherwise (as on hardware).
    pub fn notify(&self, vector: u32) {
        let mut s = self.lock();
        if s.modes.msix_enabled {
            Self::fire_msix(&mut s, vector);
        } else if s.modes.msi_enabled {
            if vector < s.modes.msi_vectors.max(1) {
                Self::fire(&mut s, IrqKind::Msi, vector, false);
            }
        } else {
            trace!(vector, "message interrupt dropped: MSI and MSI-X disabled");
        }
    }

    /// Drives the INTx line.
    pub fn set_intx(&self, asserted: bool) {
        let mut s = self.lock();
        s.modes.intx_level = asserted;
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
        self.lock().modes.intx_level
    }

    /// Signals the ERR or REQ eventfd, if the client installed one.
    pub fn signal_index(&self, index: IrqKind) {
        let mut s = self.lock();
        Self::fire(&mut s, index, 0, false);
    }

    fn fire_intx(s: &mut IrqState) {
        if !s.modes.intx_level
            || s.modes.intx_disabled
            || s.modes.msi_enabled
            || s.modes.msix_enabled
        {
            return;
        }
        let automasked = s.modes.intx_automasked;
        let Some(v) = s.vectors[0].first_mut() else {
            return;
        };
        if automasked || v.masked {
            v.pending = true;
            return;
        }
        if let Some(fd) = &v.eventfd {
            signal(fd);
            s.modes.intx_automasked = true;
            v.pending = false;
        }
    }

    fn fire_msix(s: &mut IrqState, vector: u32) {
        let table_masked = s.modes.msix_table_in_use
            && s.modes
                .msix_table_mask
                .get(vector as usize)
                .copied()
                .unwrap_or(true);
        Self::fire(
            s,
            IrqKind::Msix,
            vector,
            s.modes.msix_function_mask || table_masked,
        );
    }

    fn fire(s: &mut IrqState, index: IrqKind, vector: u32, extra_mask: bool) {
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
        if !s.modes.msix_enabled {
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
        s.modes.msi_enabled = enabled;
        s.modes.msi_vectors = vectors;
    }

    /// The MSI-X capability's Enable and Function Mask changed.
    pub fn update_msix(&self, enabled: bool, function_mask: bool) {
        let mut s = self.lock();
        s.modes.msix_enabled = enabled;
        s.modes.msix_function_mask = function_mask;
        Self::flush_msix_pending(&mut s);
    }

    /// The client wrote the Vector Control word of table entry `vector`.
    pub fn update_msix_table_mask(&self, vector: u32, masked: bool) {
        let mut s = self.lock();
        s.modes.msix_table_in_use = true;
        if let Some(m) = s.modes.msix_table_mask.get_mut(vector as usize) {
            *m = masked;
        }
        Self::flush_msix_pending(&mut s);
    }

    /// Command register Interrupt Disable changed.
    pub fn update_intx_disable(&self, disabled: bool) {
        let mut s = self.lock();
        s.modes.intx_disabled = disabled;
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
        s.modes.intx_automasked = false;
        Self::fire_intx(&mut s);
    }

    fn set_intx_resampler(self: &Arc<Self>, fd: Option<IrqFd>) {
        let mut current = self.intx_unmask.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = current.take() {
            self.events.remove(old);
        }
        if let Some(fd) = fd {
            *current = Some(fd.as_raw_fd());
            self.events.insert(Arc::new(IntxUnmask {
                fd,
                irqs: Arc::downgrade(self),
            }));
        }
    }

    /// Helper fds the session's event loop serves for these interrupts.
    pub fn event_set(&self) -> &Arc<EventSet> {
        &self.events
    }

    fn check_range(&self, kind: IrqKind, vectors: &VectorRange<'_>) -> Result<(), IrqError> {
        let available = self.counts[kind as usize];
        let VectorRange { first, count, .. } = *vectors;
        if first.checked_add(count).is_none_or(|end| end > available) {
            return Err(IrqError::BadRange {
                start: first,
                count,
                available,
            });
        }
        match vectors.select {
            Some(s) if s.len() != count as usize => Err(IrqError::SelectCount {
                got: s.len(),
                want: count,
            }),
            _ => Ok(()),
        }
    }

    /// Installs eventfds for vectors `first..first + fds.len()` of `kind`
    /// (`None` takes a vector's away). Every fd must be an eventfd
    /// (`irqfd`): one that is not fails the request and nothing changes.
    pub fn assign(
        &self,
        kind: IrqKind,
        first: u32,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), IrqError> {
        self.check_range(kind, &VectorRange::all(first, fds.len() as u32))?;
        let fds = fds
            .into_iter()
            .map(|fd| fd.map(IrqFd::new).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let mut s = self.lock();
        let count = fds.len();
        for (i, fd) in fds.into_iter().enumerate() {
            s.vectors[kind as usize][first as usize + i].eventfd = fd;
        }
        debug!(?kind, first, count, "interrupt eventfds set");
        Ok(())
    }

    /// Takes every vector of `kind` down: eventfds, masks and pending bits.
    pub fn disable(&self, kind: IrqKind) {
        let mut s = self.lock();
        for v in s.vectors[kind as usize].iter_mut() {
            *v = Vector::default();
        }
        if kind == IrqKind::Intx {
            s.modes.intx_automasked = false;
        }
        debug!(?kind, "interrupts disabled");
    }

    /// Signals the selected vectors' eventfds (the loopback trigger the
    /// kernel's vfio offers for testing), masks notwithstanding.
    pub fn trigger(&self, kind: IrqKind, vectors: VectorRange<'_>) -> Result<(), IrqError> {
        self.check_range(kind, &vectors)?;
        let s = self.lock();
        for i in vectors.selected() {
            if let Some(fd) = &s.vectors[kind as usize][i as usize].eventfd {
                signal(fd);
            }
        }
        Ok(())
    }

    /// Masks the selected vectors: a signal meanwhile stays pending.
    pub fn mask(&self, kind: IrqKind, vectors: VectorRange<'_>) -> Result<(), IrqError> {
        self.set_masked(kind, vectors, true)
    }

    /// Unmasks the selected vectors and delivers what was pending.
    pub fn unmask(&self, kind: IrqKind, vectors: VectorRange<'_>) -> Result<(), IrqError> {
        self.set_masked(kind, vectors, false)
    }

    fn set_masked(
        &self,
        kind: IrqKind,
        vectors: VectorRange<'_>,
        mask: bool,
    ) -> Result<(), IrqError> {
        if matches!(kind, IrqKind::Err | IrqKind::Req) {
            return Err(IrqError::Unsupported(kind));
        }
        self.check_range(kind, &vectors)?;
        let mut s = self.lock();
        for i in vectors.selected() {
            s.vectors[kind as usize][i as usize].masked = mask;
        }
        if mask {
            return Ok(());
        }
        match kind {
            IrqKind::Intx => {
                drop(s);
                self.unmask_intx();
            }
            IrqKind::Msix => Self::flush_msix_pending(&mut s),
            IrqKind::Msi => {
                for i in vectors.selected() {
                    if s.vectors[1][i as usize].pending {
                        Self::fire(&mut s, IrqKind::Msi, i, false);
                    }
                }
            }
            IrqKind::Err | IrqKind::Req => {}
        }
        Ok(())
    }

    /// INTx's unmask eventfd (vfio's UNMASK with an eventfd): QEMU with KVM
    /// hands one over so that a guest EOI unmasks the line without a message.
    /// `None` removes it. It must be an eventfd.
    pub fn set_intx_unmask_eventfd(self: &Arc<Self>, fd: Option<OwnedFd>) -> Result<(), IrqError> {
        let fd = fd.map(IrqFd::new).transpose()?;
        self.set_intx_resampler(fd);
        debug!("INTx unmask eventfd set");
        Ok(())
    }

    /// Masks, pending bits and modes (not the eventfds, which belong to the
    /// client), for a state snapshot.
    pub fn save(&self, w: &mut crate::state::SectionWriter) {
        let s = self.lock();
        for vectors in &s.vectors {
            w.u64(vectors.len() as u64);
            for v in vectors {
                w.bool(v.masked);
                w.bool(v.pending);
            }
        }
        w.bool(s.modes.msi_enabled);
        w.u32(s.modes.msi_vectors);
        w.bool(s.modes.msix_enabled);
        w.bool(s.modes.msix_function_mask);
        w.u64(s.modes.msix_table_mask.len() as u64);
        s.modes.msix_table_mask.iter().for_each(|&m| w.bool(m));
        w.bool(s.modes.msix_table_in_use);
        w.bool(s.modes.intx_level);
        w.bool(s.modes.intx_automasked);
        w.bool(s.modes.intx_disabled);
    }

    /// Reads state as [`save`](Self::save) wrote it, checked against this
    /// device's shape, without applying it ([`apply`](Self::apply) does).
    pub fn parse_state(
        &self,
        r: &mut crate::state::SectionReader<'_>,
    ) -> Result<IrqSnapshot, crate::state::StateError> {
        use crate::state::StateError;
        let mut flags: [Vec<(bool, bool)>; 5] = Default::default();
        for (kind, f) in flags.iter_mut().enumerate() {
            let n = r.count(2)?;
            if n != self.lock().vectors[kind].len() {
                return Err(StateError::Invalid("interrupt vectors of another count"));
            }
            for _ in 0..n {
                f.push((r.bool()?, r.bool()?));
            }
        }
        let (msi_enabled, msi_vectors) = (r.bool()?, r.u32()?);
        let (msix_enabled, msix_function_mask) = (r.bool()?, r.bool()?);
        let n = r.count(1)?;
        if n != self.lock().modes.msix_table_mask.len() {
            return Err(StateError::Invalid("MSI-X masks of another count"));
        }
        let msix_table_mask = (0..n).map(|_| r.bool()).collect::<Result<Vec<_>, _>>()?;
        let msix_table_in_use = r.bool()?;
        let (intx_level, intx_automasked, intx_disabled) = (r.bool()?, r.bool()?, r.bool()?);
        if msi_vectors > self.counts[IrqKind::Msi as usize] {
            return Err(StateError::Invalid("more MSI vectors than the device has"));
        }
        let modes = Modes {
            msi_enabled,
            msi_vectors,
            msix_enabled,
            msix_function_mask,
            msix_table_mask,
            msix_table_in_use,
            intx_level,
            intx_automasked,
            intx_disabled,
        };
        Ok(IrqSnapshot { flags, modes })
    }

    /// Applies a parsed snapshot; the installed eventfds stay.
    pub fn apply(&self, snap: IrqSnapshot) {
        let mut s = self.lock();
        for (vectors, f) in s.vectors.iter_mut().zip(snap.flags) {
            for (v, (masked, pending)) in vectors.iter_mut().zip(f) {
                v.masked = masked;
                v.pending = pending;
            }
        }
        s.modes = snap.modes;
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
        let vectors = s.modes.msix_table_mask.len();
        s.modes = Modes {
            msix_table_mask: vec![true; vectors],
            ..Modes::default()
        };
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
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
        irqs.assign(IrqKind::Msix, 1, vec![Some(fd)]).unwrap();
        irqs.update_msix(true, false);
        irqs.notify(1);
        assert!(fired(&e));
        irqs.mask(IrqKind::Msix, VectorRange::all(1, 1)).unwrap();
        irqs.notify(1);
        assert!(!fired(&e));
        assert_eq!(irqs.msix_pending_qword(0), 0b10);
        let select = VectorRange {
            first: 1,
            count: 1,
            select: Some(&[1]),
        };
        irqs.unmask(IrqKind::Msix, select).unwrap();
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
        irqs.assign(IrqKind::Intx, 0, vec![Some(fd)]).unwrap();
        irqs.set_intx(true);
        assert!(fired(&e));
        irqs.set_intx(true);
        assert!(!fired(&e), "auto-masked until unmasked");
        irqs.unmask(IrqKind::Intx, VectorRange::all(0, 1)).unwrap();
        assert!(fired(&e), "still asserted: fires again on unmask");
        irqs.set_intx(false);
        irqs.unmask(IrqKind::Intx, VectorRange::all(0, 1)).unwrap();
        assert!(!fired(&e));
    }

    #[test]
    fn intx_unmask_eventfd() {
        let irqs = Interrupts::new(0, 0);
        let (e, fd) = efd();
        let (resample, resample_fd) = efd();
        irqs.assign(IrqKind::Intx, 0, vec![Some(fd)]).unwrap();
        irqs.set_intx_unmask_eventfd(Some(resample_fd)).unwrap();
        irqs.set_intx(true);
        assert!(fired(&e));
        irqs.set_intx(true);
        assert!(!fired(&e));
        // The guest's EOI, as KVM would signal it: the session's event loop
        // serves the unmask fd; the line is unmasked and, still asserted,
        // fires again.
        resample.write(1).unwrap();
        let main = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut lp =
            crate::event::EventLoop::new(main.as_raw_fd(), vec![irqs.event_set().clone()]).unwrap();
        assert_eq!(lp.wait().unwrap(), crate::event::Wake::Served);
        assert!(fired(&e));
        // Gone with the client.
        irqs.disconnect();
        assert!(irqs.event_set().is_empty());
    }

    #[test]
    fn bad_requests() {
        let irqs = Interrupts::new(1, 2);
        assert!(matches!(
            irqs.trigger(IrqKind::Msix, VectorRange::all(1, 2)),
            Err(IrqError::BadRange { .. })
        ));
        assert!(matches!(
            irqs.trigger(IrqKind::Msix, VectorRange::all(u32::MAX, 2)),
            Err(IrqError::BadRange { .. })
        ));
        assert!(matches!(
            irqs.assign(IrqKind::Msix, 0, vec![None, None, None]),
            Err(IrqError::BadRange { .. })
        ));
        let short = VectorRange {
            first: 0,
            count: 2,
            select: Some(&[1]),
        };
        assert!(matches!(
            irqs.mask(IrqKind::Msix, short),
            Err(IrqError::SelectCount { .. })
        ));
        assert!(matches!(
            irqs.mask(IrqKind::Err, VectorRange::all(0, 0)),
            Err(IrqError::Unsupported(IrqKind::Err))
        ));
    }
}
