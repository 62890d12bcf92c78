//! One vGPU parent mediating several VMs: a process that owns the engine (one
//! [`Scheduler`]) and serves any number of instances, each a full 1234:5547
//! device on its own vfio-user socket for its own VMM (its own guest memory,
//! shadows, rings, interrupts), each with a type's slice of the parent's
//! VRAM, contexts and GGTT (never over-committed) and a weight on the engine.
//! Instances are made and removed through the control socket
//! ([`control`], `umdevctl`), like mdev devices through sysfs and mdevctl;
//! persistent ones are written to a config file and made again at start.

pub mod config;
pub mod control;
pub mod notify;
pub mod serve;
pub mod types;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{info, warn};
use umdev::memory::GuestMemory;
use umdev::vfio_user::{Server, ServerConfig, StopHandle};

use crate::sched::Scheduler;
use crate::VgpuConfig;
use config::Definition;
use control::{InstanceInfo, Request, Response, TypeInfo};
pub use serve::shutdown_listener;
use types::{Capacity, VgpuType};

/// The largest weight an instance may have (the smallest is 1).
pub const MAX_WEIGHT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("unknown type {0:?} (see `umdevctl types`)")]
    UnknownType(String),
    #[error("{0:?} is not a UUID (8-4-4-4-12 hex digits)")]
    BadUuid(String),
    #[error("an instance {0} exists already")]
    Exists(String),
    #[error(
        "instance {0} is defined but was not made at start ({1}); \
         `umdevctl remove {0}` drops its definition"
    )]
    Defined(String, String),
    #[error("no instance {0}")]
    NoSuchInstance(String),
    #[error("a {0} does not fit in what is left: {1}")]
    NoRoom(&'static str, String),
    #[error("instance {0} has a VMM attached; remove --force resets it and disconnects the VMM")]
    Attached(String),
    #[error("weights are 1 to {MAX_WEIGHT}, not {0}")]
    Weight(u32),
    #[error(
        "this parent has no config file to keep a persistent instance in \
         (start it with --config FILE)"
    )]
    NoConfigFile,
    #[error("another umdev-vgpu-parent is using {0} (it holds parent.lock there)")]
    InUse(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Vgpu(#[from] crate::VgpuError),
    #[error("instance {0}: {1}")]
    Vnc(String, umdev::vnc::VncError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ParentError + '_ {
    move |source| ParentError::Io {
        path: path.to_owned(),
        source,
    }
}

/// VNC addresses in use by other processes passed over before an instance's
/// creation fails.
const VNC_SLOT_TRIES: usize = 16;

/// How a parent is set up.
#[derive(Clone, Debug)]
pub struct ParentConfig {
    /// Sockets go here: `<uuid>.sock` per instance, `control.sock`; and
    /// `parent.lock`, held while the parent runs.
    pub state_dir: PathBuf,
    /// Persistent instance definitions (JSON), read at start.
    pub config_file: Option<PathBuf>,
    /// The hardware shared out.
    pub capacity: Capacity,
    /// Where each instance writes its scanout as `<uuid>.png`, at every FENCE
    /// and when asked ([`Parent::dump_scanouts`]); none when `None`.
    pub scanout_dir: Option<PathBuf>,
    /// Each instance serves its scanout over VNC, as a single vGPU's `--vnc`
    /// does: the instance in slot n (the lowest free) at `listen.nth(n)`, or
    /// on a port the kernel picks when the base port is 0.
    pub vnc: Option<umdev::vnc::VncConfig>,
}

struct Instance {
    vtype: &'static VgpuType,
    socket: PathBuf,
    weight: u32,
    persistent: bool,
    share: u64,
    /// For a picture of its scanout on request.
    handle: crate::VgpuHandle,
    vnc: Option<InstanceVnc>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    /// Its counters, labelled `instance="<uuid>"` (the registry holds them
    /// weakly: they go with the instance).
    _metrics: Arc<dyn umdev::metrics::MetricsSource>,
}

/// An instance's VNC server, the slot its address came from and the
/// address viewers connect to: `ADDR:PORT` (the port bound) or `unix:PATH`.
struct InstanceVnc {
    slot: u16,
    _server: umdev::vnc::VncServer,
    address: String,
}

impl Instance {
    /// Stops serving (a VMM attached is disconnected and the device reset,
    /// VNC viewers are closed), waits for the server thread, removes the
    /// socket.
    fn shut(mut self) {
        drop(self.vnc.take());
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    fn serving(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// A persistent definition the parent could not make at start: kept in the
/// config file and listed, until removed.
struct Unmade {
    definition: Definition,
    why: String,
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, Instance>,
    unmade: BTreeMap<String, Unmade>,
}

impl State {
    fn used(&self) -> Capacity {
        self.instances
            .values()
            .fold(Capacity::default(), |c, i| c.plus(Capacity::of(i.vtype)))
    }

    /// What the config file should hold: the persistent instances and the
    /// definitions not made, by UUID.
    fn definitions(&self) -> Vec<Definition> {
        let mut defs: Vec<Definition> = self
            .instances
            .iter()
            .filter(|(_, i)| i.persistent)
            .map(|(u, i)| Definition {
                uuid: u.clone(),
                type_name: i.vtype.name.into(),
                weight: i.weight,
            })
            .chain(self.unmade.values().map(|u| u.definition.clone()))
            .collect();
        defs.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        defs
    }
}

pub struct Parent {
    config: ParentConfig,
    engine: Arc<Scheduler>,
    state: Mutex<State>,
    /// `<state_dir>/parent.lock`, flock'ed: one parent per state directory.
    _lock: std::fs::File,
}

impl Parent {
    /// A parent with no instances yet, owning `config.state_dir` (made if
    /// missing, as is `scanout_dir`; refused if another parent holds it). Sockets a parent killed
    /// earlier left behind there are removed.
    pub fn new(config: ParentConfig) -> Result<Arc<Parent>, ParentError> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(pictures) = &config.scanout_dir {
            std::fs::create_dir_all(pictures).map_err(io_err(pictures))?;
        }
        let lock_path = dir.join("parent.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock(2) on a file this function opened and keeps open.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                ParentError::InUse(dir.clone())
            } else {
                ParentError::Io {
                    path: lock_path,
                    source: e,
                }
            });
        }
        remove_stale_sockets(dir);
        Ok(Arc::new(Parent {
            config,
            engine: Scheduler::start(),
            state: Mutex::new(State::default()),
            _lock: lock,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn control_path(&self) -> PathBuf {
        self.config.state_dir.join("control.sock")
    }

    /// Listens on [`Parent::control_path`] (a socket left there by a parent
    /// that was killed is replaced).
    pub fn listen_control(&self) -> Result<UnixListener, ParentError> {
        let path = self.control_path();
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        UnixListener::bind(&path).map_err(io_err(&path))
    }

    /// Makes the config file's instances. One that does not fit is logged,
    /// listed as not made and kept in the file; a file that is not valid is
    /// an error (nothing is made).
    pub fn create_persistent(&self) -> Result<usize, ParentError> {
        let Some(path) = &self.config.config_file else {
            return Ok(0);
        };
        let mut made = 0;
        for d in config::load(path)? {
            let mut state = self.lock();
            let made_now = types::find(&d.type_name)
                .ok_or_else(|| ParentError::UnknownType(d.type_name.clone()))
                .and_then(|vtype| self.start_instance(&mut state, vtype, &d.uuid, d.weight, true));
            match made_now {
                Ok(_) => made += 1,
                Err(e) => {
                    warn!(uuid = %d.uuid, "persistent instance not made: {e}");
                    let why = e.to_string();
                    state
                        .unmade
                        .insert(d.uuid.clone(), Unmade { definition: d, why });
                }
            }
        }
        Ok(made)
    }

    /// Rewrites the config file from `state` (nothing without one).
    fn write_config(&self, state: &State) -> Result<(), ParentError> {
        match &self.config.config_file {
            Some(path) => config::store(path, state.definitions()),
            None => Ok(()),
        }
    }

    pub fn types(&self) -> Vec<TypeInfo> {
        let used = self.lock().used();
        types::TYPES
            .iter()
            .map(|t| TypeInfo {
                name: t.name.into(),
                vram_mib: t.vram_mib,
                contexts: t.contexts as u32,
                ggtt_entries: t.ggtt_entries,
                available: self.config.capacity.available(used, t),
                description: t.description.into(),
            })
            .collect()
    }

    fn info(&self, uuid: &str, i: &Instance) -> InstanceInfo {
        let active = i.serving();
        InstanceInfo {
            uuid: uuid.into(),
            type_name: i.vtype.name.into(),
            socket: i.socket.display().to_string(),
            weight: i.weight,
            persistent: i.persistent,
            attached: i.stop.has_client(),
            engine_seconds: self
                .engine
                .share_stats(i.share)
                .map_or(0.0, |s| s.busy.as_secs_f64()),
            active,
            problem: (!active).then(|| "its vfio-user server ended (see the parent's log)".into()),
            vnc: i.vnc.as_ref().map(|v| v.address.clone()),
        }
    }

    /// The VNC server of a new instance `uuid`, in the lowest slot no other
    /// instance holds whose address is free (a port another process holds is
    /// passed over, up to [`VNC_SLOT_TRIES`] of them).
    fn start_vnc(
        &self,
        state: &State,
        base: &umdev::vnc::VncConfig,
        uuid: &str,
        handle: &crate::VgpuHandle,
    ) -> Result<InstanceVnc, ParentError> {
        use umdev::vnc::{Listen, VncError};
        let taken: Vec<u16> = state
            .instances
            .values()
            .filter_map(|i| i.vnc.as_ref().map(|v| v.slot))
            .collect();
        let mut last = None;
        for slot in (0..=u16::MAX)
            .filter(|n| !taken.contains(n))
            .take(VNC_SLOT_TRIES)
        {
            let listen = match &base.listen {
                // Port 0: each instance its own port of the kernel's choosing.
                Listen::Tcp(a) if a.port() == 0 => Listen::Tcp(*a),
                l => l.nth(slot),
            };
            let config = umdev::vnc::VncConfig {
                listen: listen.clone(),
                name: format!("umdev-vgpu {uuid}"),
                ..base.clone()
            };
            match umdev::vnc::VncServer::start(config, Arc::new(handle.clone())) {
                Ok(server) => {
                    let address = match listen {
                        Listen::Tcp(a) => server.local_addr().unwrap_or(a).to_string(),
                        Listen::Unix(p) => format!("unix:{}", p.display()),
                    };
                    return Ok(InstanceVnc {
                        slot,
                        _server: server,
                        address,
                    });
                }
                Err(VncError::Listen { what, source })
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    warn!(%uuid, "VNC address {what} is in use; trying the next slot");
                    last = Some(VncError::Listen { what, source });
                }
                Err(e) => return Err(ParentError::Vnc(uuid.into(), e)),
            }
        }
        Err(ParentError::Vnc(
            uuid.into(),
            last.unwrap_or(VncError::Address("no free slot".into())),
        ))
    }

    /// Every instance writes its scanout picture now (with a `scanout_dir`;
    /// one whose scanout is off keeps its last picture).
    pub fn dump_scanouts(&self) {
        let handles: Vec<crate::VgpuHandle> = self
            .lock()
            .instances
            .values()
            .map(|i| i.handle.clone())
            .collect();
        for h in handles {
            h.dump_scanout();
        }
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        let state = self.lock();
        let mut all: Vec<InstanceInfo> = state
            .instances
            .iter()
            .map(|(u, i)| self.info(u, i))
            .chain(state.unmade.iter().map(|(u, d)| InstanceInfo {
                uuid: u.clone(),
                type_name: d.definition.type_name.clone(),
                socket: self.socket_path(u).display().to_string(),
                weight: d.definition.weight,
                persistent: true,
                attached: false,
                engine_seconds: 0.0,
                active: false,
                problem: Some(format!("not made at start: {}", d.why)),
                vnc: None,
            }))
            .collect();
        all.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        all
    }

    fn socket_path(&self, uuid: &str) -> PathBuf {
        self.config.state_dir.join(format!("{uuid}.sock"))
    }

    /// A new instance of `type_name`, serving on `<state_dir>/<uuid>.sock`.
    pub fn create(
        &self,
        type_name: &str,
        uuid: Option<&str>,
        weight: Option<u32>,
        persist: bool,
    ) -> Result<InstanceInfo, ParentError> {
        let vtype =
            types::find(type_name).ok_or_else(|| ParentError::UnknownType(type_name.into()))?;
        let uuid = match uuid {
            Some(u) => control::canonical_uuid(u).ok_or_else(|| ParentError::BadUuid(u.into()))?,
            None => control::new_uuid(),
        };
        let weight = weight.unwrap_or(1);
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(ParentError::Weight(weight));
        }
        if persist && self.config.config_file.is_none() {
            return Err(ParentError::NoConfigFile);
        }
        let mut state = self.lock();
        let info = self.start_instance(&mut state, vtype, &uuid, weight, persist)?;
        if persist {
            if let Err(e) = self.write_config(&state) {
                if let Some(i) = state.instances.remove(&uuid) {
                    i.shut();
                }
                return Err(e);
            }
        }
        info!(%uuid, r#type = vtype.name, weight, persist, "instance created");
        Ok(info)
    }

    /// Makes instance `uuid` (canonical) and serves it on its own thread.
    fn start_instance(
        &self,
        state: &mut State,
        vtype: &'static VgpuType,
        uuid: &str,
        weight: u32,
        persistent: bool,
    ) -> Result<InstanceInfo, ParentError> {
        if state.instances.contains_key(uuid) {
            return Err(ParentError::Exists(uuid.into()));
        }
        if let Some(d) = state.unmade.get(uuid) {
            return Err(ParentError::Defined(uuid.into(), d.why.clone()));
        }
        if let Some(why) = self.config.capacity.shortfall(state.used(), vtype) {
            return Err(ParentError::NoRoom(vtype.name, why));
        }
        let share = self.engine.share(uuid, weight);
        let share_id = share.id();
        let config = VgpuConfig {
            vram_mib: vtype.vram_mib,
            contexts: vtype.contexts,
            ggtt_entries: vtype.ggtt_entries,
            engine: Some(share),
            scanout_png: (self.config.scanout_dir.as_ref()).map(|d| d.join(format!("{uuid}.png"))),
            ..VgpuConfig::default()
        };
        let server_config = ServerConfig::default();
        let memory = GuestMemory::new(server_config.max_dma_maps as usize);
        let (function, handle) = crate::new_function(memory, config)?;
        let vnc = match &self.config.vnc {
            None => None,
            Some(base) => Some(self.start_vnc(state, base, uuid, &handle)?),
        };
        let socket = self.socket_path(uuid);
        if std::fs::symlink_metadata(&socket).is_ok() {
            // Ours: the state directory is this parent's (parent.lock).
            let _ = std::fs::remove_file(&socket);
        }
        let listener = UnixListener::bind(&socket).map_err(io_err(&socket))?;
        let server = Server::new(function, server_config);
        let stop = server.stop_handle();
        let metrics: Arc<dyn umdev::metrics::MetricsSource> =
            Arc::new(umdev::metrics::LabeledSource {
                labels: vec![("instance".into(), uuid.into())],
                inner: umdev::pci::function::FunctionMetrics::source_for(server.function()),
            });
        umdev::metrics::register(&metrics);
        let name = uuid.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("vgpu-{}", &uuid[..8]))
            .spawn(move || {
                if let Err(e) = server.serve_listener(&listener) {
                    warn!(uuid = %name, "instance server ended: {e}");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(io_err(&socket)(e));
            }
        };
        let instance = Instance {
            vtype,
            socket,
            weight,
            persistent,
            share: share_id,
            handle,
            vnc,
            stop,
            thread: Some(thread),
            _metrics: metrics,
        };
        let info = self.info(uuid, &instance);
        state.instances.insert(uuid.to_owned(), instance);
        Ok(info)
    }

    /// Removes an instance (refused while a VMM is attached, unless `force`)
    /// or a definition that was not made; a persistent one leaves the config
    /// file too.
    pub fn remove(&self, uuid: &str, force: bool) -> Result<(), ParentError> {
        let uuid =
            control::canonical_uuid(uuid).ok_or_else(|| ParentError::BadUuid(uuid.into()))?;
        let mut state = self.lock();
        if state.unmade.remove(&uuid).is_some() {
            self.write_config(&state)?;
            info!(%uuid, "definition removed");
            return Ok(());
        }
        let i = state
            .instances
            .get(&uuid)
            .ok_or_else(|| ParentError::NoSuchInstance(uuid.clone()))?;
        if i.stop.has_client() && !force {
            return Err(ParentError::Attached(uuid));
        }
        let Some(mut instance) = state.instances.remove(&uuid) else {
            return Err(ParentError::NoSuchInstance(uuid));
        };
        // Its VNC slot is free once the lock goes: its listener must be gone
        // by then (dropping the server does not wait).
        drop(instance.vnc.take());
        let written = if instance.persistent {
            self.write_config(&state)
        } else {
            Ok(())
        };
        drop(state);
        instance.shut();
        info!(%uuid, force, "instance removed");
        written
    }

    pub fn set_weight(&self, uuid: &str, weight: u32) -> Result<(), ParentError> {
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(ParentError::Weight(weight));
        }
        let uuid =
            control::canonical_uuid(uuid).ok_or_else(|| ParentError::BadUuid(uuid.into()))?;
        let mut state = self.lock();
        let persistent = if let Some(d) = state.unmade.get_mut(&uuid) {
            d.definition.weight = weight;
            true
        } else {
            let i = state
                .instances
                .get_mut(&uuid)
                .ok_or_else(|| ParentError::NoSuchInstance(uuid.clone()))?;
            i.weight = weight;
            self.engine.set_weight(i.share, weight);
            i.persistent
        };
        if persistent {
            self.write_config(&state)?;
        }
        info!(%uuid, weight, "weight set");
        Ok(())
    }

    /// Answers one request.
    pub fn handle(&self, request: Request) -> Response {
        let done = |r: Result<(), ParentError>| r.map_or_else(Response::error, |()| Response::Done);
        match request {
            Request::Types {} => Response::Types {
                types: self.types(),
            },
            Request::List {} => Response::List {
                instances: self.list(),
            },
            Request::Create {
                type_name,
                uuid,
                weight,
                persist,
            } => match self.create(&type_name, uuid.as_deref(), weight, persist) {
                Ok(instance) => Response::Instance { instance },
                Err(e) => Response::error(e),
            },
            Request::Remove { uuid, force } => done(self.remove(&uuid, force)),
            Request::SetWeight { uuid, weight } => done(self.set_weight(&uuid, weight)),
        }
    }

    /// Serves control clients from `listener` until it is shut down
    /// ([`shutdown_listener`]); see [`serve`].
    pub fn serve_control(self: &Arc<Self>, listener: &UnixListener) {
        serve::serve_control(self, listener);
    }

    /// Stops every instance (their VMMs are disconnected) and leaves the
    /// persistent definitions as they are.
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut self.lock().instances);
        for (_, i) in all {
            i.shut();
        }
    }
}

/// Removes `<uuid>.sock` files in `dir`: instance sockets of a parent that
/// was killed (nothing listens on them; a VMM would be refused).
fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".sock")) else {
            continue;
        };
        if control::canonical_uuid(stem).as_deref() == Some(stem) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(socket = %entry.path().display(), "stale instance socket removed"),
                Err(e) => warn!(socket = %entry.path().display(), "stale socket not removed: {e}"),
            }
        }
    }
}
