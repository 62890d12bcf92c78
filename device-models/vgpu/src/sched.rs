//! The engine: one thread that runs the work of every vGPU sharing it (one
//! physical GPU mediated for several VMs), by weight, in time slices that end
//! at command boundaries.
//!
//! Each vGPU posts [`Task`]s to its [`EngineShare`]; a share's tasks run in
//! order. Between shares the scheduler is weighted fair queuing on engine
//! time: every share has a virtual time that advances by the engine time it
//! used divided by its weight, and the share with work and the smallest
//! virtual time runs next, for at most [`SLICE`] (a task that is not done by
//! then is preempted at its next boundary and goes on later). Two
//! saturating shares with weights 1 and 3 get 25% and 75% of the engine. A
//! share that was idle does not bank credit: it rejoins at the smallest
//! virtual time among the busy ones, and its arrival asks the running task to
//! stop at its next boundary, so a share that only wakes now and then waits
//! for one piece of its neighbour's work (the vGPU cuts FILLs and COPYs into
//! 128 KiB pieces), not for a slice.
//!
//! A flood of work from one share cannot starve the others (fair queuing) or
//! grow the queue without bound: a task may name a key, and a queued task
//! with the same key makes the new one redundant (a second doorbell for a
//! context whose submission has not started yet); tasks marked optional are
//! dropped past [`QUEUE_LIMIT`] queued tasks (a range TLB invalidation: the
//! next submission syncs the tables anyway).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a task runs while another share has work.
pub const SLICE: Duration = Duration::from_millis(2);

/// Queued tasks of one share past which optional tasks are dropped.
pub const QUEUE_LIMIT: usize = 1024;

/// What a task says after running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    /// Stopped at a command boundary after its deadline: run me again.
    Preempted,
}

/// Work for the engine.
pub trait Task: Send {
    /// Runs until done, or until `should_yield()` says so at a point where it
    /// can stop (it makes some progress on every call).
    fn run(&mut self, should_yield: &dyn Fn() -> bool) -> Progress;

    /// Queued tasks of the share with the same key make this one redundant (the
    /// key must tell apart whatever makes two tasks differ, e.g. a reset
    /// generation).
    fn coalesce_key(&self) -> Option<u64> {
        None
    }

    /// May be dropped when the share's queue is full.
    fn optional(&self) -> bool {
        false
    }
}

/// Engine time and work of one share so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareStats {
    pub busy: Duration,
    /// Tasks run to completion.
    pub tasks: u64,
    /// Times a task was preempted at the end of its slice.
    pub preemptions: u64,
    /// Tasks dropped as redundant or optional.
    pub dropped: u64,
}

struct QueuedTask {
    task: Box<dyn Task>,
    key: Option<u64>,
}

struct Share {
    id: u64,
    name: String,
    weight: u32,
    /// Engine nanoseconds used, scaled by [`WEIGHT_SCALE`] / weight.
    vtime: u128,
    queue: VecDeque<QueuedTask>,
    stats: ShareStats,
}

/// Virtual time unit: a weight-1 share advances this much per nanosecond.
const WEIGHT_SCALE: u128 = 1 << 16;

#[derive(Default)]
struct State {
    shares: Vec<Share>,
    next_id: u64,
    /// The share whose task the engine is running now.
    running: Option<u64>,
    stopping: bool,
}

impl State {
    fn share(&mut self, id: u64) -> Option<&mut Share> {
        self.shares.iter_mut().find(|s| s.id == id)
    }

    /// The smallest virtual time among shares with work (queued or running).
    fn busy_vtime(&self) -> Option<u128> {
        self.shares
            .iter()
            .filter(|s| !s.queue.is_empty() || self.running == Some(s.id))
            .map(|s| s.vtime)
            .min()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Another share became busy: the running task should stop soon.
    preempt: AtomicBool,
    /// Work arrived or the engine went idle or a task finished.
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One engine thread and its shares. Dropped when the last handle and share
/// go: the thread then ends.
pub struct Scheduler {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the engine thread (if it cannot start, tasks run on the thread
    /// that posts them: slower to answer, never lost).
    pub fn start() -> Arc<Scheduler> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            preempt: AtomicBool::new(false),
            changed: Condvar::new(),
        });
        let engine = inner.clone();
        let thread = std::thread::Builder::new()
            .name("vgpu-engine".into())
            .spawn(move || engine_loop(&engine))
            .map_err(|e| tracing::warn!("vgpu: no engine thread ({e}); work runs inline"))
            .ok();
        Arc::new(Scheduler { inner, thread })
    }

    /// A new share of the engine with `weight` (at least 1).
    pub fn share(self: &Arc<Self>, name: &str, weight: u32) -> EngineShare {
        let mut st = self.inner.lock();
        let id = st.next_id;
        st.next_id += 1;
        let vtime = st.busy_vtime().unwrap_or(0);
        st.shares.push(Share {
            id,
            name: name.to_owned(),
            weight: weight.max(1),
            vtime,
            queue: VecDeque::new(),
            stats: ShareStats::default(),
        });
        EngineShare {
            scheduler: self.clone(),
            id,
        }
    }

    /// Sets the weight of the share `id` ([`EngineShare::id`]), wherever the
    /// share itself is (inside a vGPU); `false` if it is gone.
    pub fn set_weight(&self, id: u64, weight: u32) -> bool {
        match self.inner.lock().share(id) {
            Some(s) => {
                s.weight = weight.max(1);
                true
            }
            None => false,
        }
    }

    /// The stats of share `id`, if it is still there.
    pub fn share_stats(&self, id: u64) -> Option<ShareStats> {
        self.inner.lock().share(id).map(|s| s.stats)
    }

    /// Every share's name, weight and stats.
    pub fn shares(&self) -> Vec<(String, u32, ShareStats)> {
        let st = self.inner.lock();
        st.shares
            .iter()
            .map(|s| (s.name.clone(), s.weight, s.stats))
            .collect()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.inner.lock().stopping = true;
        self.inner.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One vGPU's place on an engine. Dropping it drops its queued tasks and
/// waits for its running one.
pub struct EngineShare {
    scheduler: Arc<Scheduler>,
    id: u64,
}

impl std::fmt::Debug for EngineShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineShare").field("id", &self.id).finish()
    }
}

impl EngineShare {
    /// Queues `task` behind this share's others.
    pub fn post(&self, task: Box<dyn Task>) {
        let inner = &self.scheduler.inner;
        if self.scheduler.thread.is_none() {
            // No engine thread: run it here, whole.
            let mut task = task;
            while task.run(&|| false) == Progress::Preempted {}
            return;
        }
        let key = task.coalesce_key();
        let optional = task.optional();
        let mut st = inner.lock();
        let floor = st.busy_vtime();
        let Some(share) = st.share(self.id) else {
            return;
        };
        let redundant = key.is_some() && share.queue.iter().any(|q| q.key == key);
        if redundant || (optional && share.queue.len() >= QUEUE_LIMIT) {
            share.stats.dropped += 1;
            return;
        }
        let arriving = share.queue.is_empty();
        if arriving {
            // Back from idle: no credit for the time it had no work.
            if let Some(floor) = floor {
                share.vtime = share.vtime.max(floor);
            }
        }
        share.queue.push_back(QueuedTask { task, key });
        if arriving && st.running.is_some_and(|r| r != self.id) {
            inner.preempt.store(true, Ordering::Relaxed);
        }
        drop(st);
        inner.changed.notify_all();
    }

    pub fn set_weight(&self, weight: u32) {
        self.scheduler.set_weight(self.id, weight);
    }

    /// Names this share to its scheduler (for [`Scheduler::set_weight`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn stats(&self) -> ShareStats {
        self.scheduler
            .inner
            .lock()
            .share(self.id)
            .map(|s| s.stats)
            .unwrap_or_default()
    }

    /// The engine this share is on.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }
}

impl Drop for EngineShare {
    fn drop(&mut self) {
        let inner = &self.scheduler.inner;
        let mut st = inner.lock();
        if let Some(s) = st.share(self.id) {
            s.queue.clear();
        }
        while st.running == Some(self.id) {
            st = inner.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.shares.retain(|s| s.id != self.id);
    }
}

fn engine_loop(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        if st.stopping {
            return;
        }
        let next = st
            .shares
            .iter()
            .filter(|s| !s.queue.is_empty())
            .min_by_key(|s| s.vtime)
            .map(|s| s.id);
        let Some(id) = next else {
            st = inner.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let Some(mut queued) = st.share(id).and_then(|s| s.queue.pop_front()) else {
            continue;
        };
        st.running = Some(id);
        inner.preempt.store(false, Ordering::Relaxed);
        drop(st);

        let start = Instant::now();
        let deadline = start + SLICE;
        let should_yield = || inner.preempt.load(Ordering::Relaxed) || Instant::now() >= deadline;
        let progress = queued.task.run(&should_yield);
        let used = start.elapsed();

        st = inner.lock();
        st.running = None;
        if let Some(share) = st.share(id) {
            share.stats.busy += used;
            share.vtime += used.as_nanos() * WEIGHT_SCALE / u128::from(share.weight);
            match progress {
                Progress::Done => share.stats.tasks += 1,
                Progress::Preempted => {
                    share.stats.preemptions += 1;
                    // Still first in its share; the key stays (it has started,
                    // but a doorbell it has not seen must not be lost: the
                    // task reads the tail again before it finishes).
                    queued.key = None;
                    share.queue.push_front(queued);
                }
            }
        }
        inner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Burns engine time in steps of `step`, counting its slices.
    struct Spin {
        left: Duration,
        step: Duration,
        ran: Arc<AtomicU64>,
    }

    impl Task for Spin {
        fn run(&mut self, should_yield: &dyn Fn() -> bool) -> Progress {
            loop {
                let t = Instant::now();
                while t.elapsed() < self.step {
                    std::hint::spin_loop();
                }
                self.ran.fetch_add(1, Ordering::Relaxed);
                self.left = self.left.saturating_sub(self.step);
                if self.left.is_zero() {
                    return Progress::Done;
                }
                if should_yield() {
                    return Progress::Preempted;
                }
            }
        }
    }

    struct Mark(Arc<Mutex<Vec<u32>>>, u32, Option<u64>);
    impl Task for Mark {
        fn run(&mut self, _: &dyn Fn() -> bool) -> Progress {
            self.0.lock().unwrap().push(self.1);
            Progress::Done
        }
        fn coalesce_key(&self) -> Option<u64> {
            self.2
        }
    }

    fn barrier(share: &EngineShare) {
        let (tx, rx) = std::sync::mpsc::channel();
        struct Barrier(std::sync::mpsc::Sender<()>);
        impl Task for Barrier {
            fn run(&mut self, _: &dyn Fn() -> bool) -> Progress {
                let _ = self.0.send(());
                Progress::Done
            }
        }
        share.post(Box::new(Barrier(tx)));
        rx.recv().unwrap();
    }

    #[test]
    fn a_share_runs_its_tasks_in_order_and_coalesces_by_key() {
        let sched = Scheduler::start();
        let share = sched.share("a", 1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Hold the engine so the keyed tasks stay queued.
        share.post(Box::new(Spin {
            left: Duration::from_millis(20),
            step: Duration::from_millis(1),
            ran: Arc::default(),
        }));
        for i in 0..5 {
            share.post(Box::new(Mark(seen.clone(), i, Some(7))));
            share.post(Box::new(Mark(seen.clone(), 100 + i, None)));
        }
        barrier(&share);
        assert_eq!(*seen.lock().unwrap(), vec![0, 100, 101, 102, 103, 104]);
        assert_eq!(share.stats().dropped, 4);
    }

    #[test]
    fn a_long_task_is_preempted_for_another_share() {
        let sched = Scheduler::start();
        let (a, b) = (sched.share("a", 1), sched.share("b", 1));
        let ran = Arc::new(AtomicU64::new(0));
        a.post(Box::new(Spin {
            left: Duration::from_millis(200),
            step: Duration::from_micros(100),
            ran: ran.clone(),
        }));
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        barrier(&b);
        // b waited at most about a slice, not for a's 200 ms.
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(a.stats().preemptions > 0);
        drop(b);
        drop(a); // waits for a's running slice; drops the rest
    }

    #[test]
    fn dropping_a_share_drops_its_queue_and_waits_for_its_running_task() {
        let sched = Scheduler::start();
        let a = sched.share("a", 1);
        let ran = Arc::new(AtomicU64::new(0));
        for _ in 0..3 {
            a.post(Box::new(Spin {
                left: Duration::from_millis(30),
                step: Duration::from_millis(1),
                ran: ran.clone(),
            }));
        }
        std::thread::sleep(Duration::from_millis(5));
        drop(a);
        let after = ran.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            ran.load(Ordering::Relaxed),
            after,
            "ran after the share was dropped"
        );
        assert!(after < 90, "queued tasks were not dropped ({after} steps)");
        assert!(sched.shares().is_empty());
    }
}
