//! One vGPU parent mediating several VMs: a process that owns the engine (one
//! [`Scheduler`]) and serves any number of instances, each a full 1234:5547
//! device on its own vfio-user socket for its own VMM (its own guest memory,
//! shadows, rings, interrupts), each with a type's slice of the parent's
//! VRAM, contexts and GGTT (never over-committed) and a weight on the engine.
//! Instances are made and removed through the control socket
//! ([`control`], `umdevctl`), like mdev devices through sysfs and mdevctl;
//! persistent ones are written to a config file and made again at start.

pub mod control;
pub mod types;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use umdev::memory::GuestMemory;
use umdev::vfio_user::{Server, ServerConfig, StopHandle};

use crate::sched::Scheduler;
use crate::VgpuConfig;
use control::{InstanceInfo, Request, Response, TypeInfo};
use types::{Capacity, VgpuType};

/// How long a control client may take to send a request line.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Control connections served at once (more are answered with an error).
const CONTROL_CLIENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("unknown type {0:?} (see `umdevctl types`)")]
    UnknownType(String),
    #[error("{0:?} is not a UUID (8-4-4-4-12 hex digits)")]
    BadUuid(String),
    #[error("an instance {0} exists already")]
    Exists(String),
    #[error("no instance {0}")]
    NoSuchInstance(String),
    #[error("a {0} does not fit in what is left: {1}")]
    NoRoom(&'static str, String),
    #[error("instance {0} has a VMM attached; remove --force resets it and disconnects the VMM")]
    Attached(String),
    #[error("weights are 1 to 1000, not {0}")]
    Weight(u32),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Vgpu(#[from] crate::VgpuError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ParentError + '_ {
    move |source| ParentError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How a parent is set up.
#[derive(Clone, Debug)]
pub struct ParentConfig {
    /// Sockets go here: `<uuid>.sock` per instance, `control.sock`.
    pub state_dir: PathBuf,
    /// Persistent instance definitions (JSON), read at start.
    pub config_file: Option<PathBuf>,
    /// The hardware shared out.
    pub capacity: Capacity,
}

/// A persistent definition, as the config file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Definition {
    pub uuid: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub weight: u32,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct ConfigFile {
    instances: Vec<Definition>,
}

struct Instance {
    vtype: &'static VgpuType,
    socket: PathBuf,
    weight: u32,
    persistent: bool,
    share: u64,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    /// Its counters, labelled `instance="<uuid>"` (the registry holds them
    /// weakly: they go with the instance).
    _metrics: Arc<dyn umdev::metrics::MetricsSource>,
}

impl Instance {
    /// Stops serving (a VMM attached is disconnected and the device reset),
    /// waits for the server thread, removes the socket.
    fn shut(mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

pub struct Parent {
    config: ParentConfig,
    engine: Arc<Scheduler>,
    instances: Mutex<BTreeMap<String, Instance>>,
    control_clients: AtomicUsize,
}

impl Parent {
    pub fn new(config: ParentConfig) -> Result<Arc<Parent>, ParentError> {
        std::fs::create_dir_all(&config.state_dir).map_err(io_err(&config.state_dir))?;
        Ok(Arc::new(Parent {
            config,
            engine: Scheduler::start(),
            instances: Mutex::new(BTreeMap::new()),
            control_clients: AtomicUsize::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Instance>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn control_path(&self) -> PathBuf {
        self.config.state_dir.join("control.sock")
    }

    /// Makes the config file's instances (each failure logged, the others go on).
    pub fn create_persistent(&self) -> Result<usize, ParentError> {
        let defs = self.read_config()?;
        let mut made = 0;
        for d in defs.instances {
            match self.create(&d.type_name, Some(&d.uuid), Some(d.weight), false) {
                Ok(_) => {
                    if let Some(i) = self.lock().get_mut(&d.uuid) {
                        i.persistent = true;
                    }
                    made += 1;
                }
                Err(e) => warn!(uuid = %d.uuid, "persistent instance not made: {e}"),
            }
        }
        Ok(made)
    }

    fn read_config(&self) -> Result<ConfigFile, ParentError> {
        let Some(path) = &self.config.config_file else {
            return Ok(ConfigFile::default());
        };
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ParentError::Config {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Writes the persistent instances to the config file (atomically).
    fn write_config(&self, instances: &BTreeMap<String, Instance>) -> Result<(), ParentError> {
        let Some(path) = &self.config.config_file else {
            return Ok(());
        };
        let file = ConfigFile {
            instances: instances
                .iter()
                .filter(|(_, i)| i.persistent)
                .map(|(u, i)| Definition {
                    uuid: u.clone(),
                    type_name: i.vtype.name.into(),
                    weight: i.weight,
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| ParentError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }

    fn used(instances: &BTreeMap<String, Instance>) -> Capacity {
        instances
            .values()
            .fold(Capacity::default(), |c, i| c.plus(Capacity::of(i.vtype)))
    }

    pub fn types(&self) -> Vec<TypeInfo> {
        let used = Self::used(&self.lock());
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
        }
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        self.lock().iter().map(|(u, i)| self.info(u, i)).collect()
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
        if !(1..=1000).contains(&weight) {
            return Err(ParentError::Weight(weight));
        }
        let mut instances = self.lock();
        if instances.contains_key(&uuid) {
            return Err(ParentError::Exists(uuid));
        }
        if let Some(why) = self
            .config
            .capacity
            .shortfall(Self::used(&instances), vtype)
        {
            return Err(ParentError::NoRoom(vtype.name, why));
        }
        let share = self.engine.share(&uuid, weight);
        let share_id = share.id();
        let config = VgpuConfig {
            vram_mib: vtype.vram_mib,
            contexts: vtype.contexts,
            ggtt_entries: vtype.ggtt_entries,
            engine: Some(share),
            ..VgpuConfig::default()
        };
        let server_config = ServerConfig::default();
        let memory = GuestMemory::new(server_config.max_dma_maps as usize);
        let (function, _handle) = crate::new_function(memory, config)?;
        let socket = self.config.state_dir.join(format!("{uuid}.sock"));
        if std::fs::symlink_metadata(&socket).is_ok() {
            let _ = std::fs::remove_file(&socket);
        }
        let listener = UnixListener::bind(&socket).map_err(io_err(&socket))?;
        let server = Server::new(function, server_config);
        let stop = server.stop_handle();
        let metrics: Arc<dyn umdev::metrics::MetricsSource> =
            Arc::new(umdev::metrics::LabeledSource {
                labels: vec![("instance".into(), uuid.clone())],
                inner: umdev::pci::function::FunctionMetrics::source_for(server.function()),
            });
        umdev::metrics::register(&metrics);
        let name = uuid.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vgpu-{}", &uuid[..8]))
            .spawn(move || {
                if let Err(e) = server.serve_listener(&listener) {
                    warn!(uuid = %name, "instance server ended: {e}");
                }
            })
            .map_err(io_err(&socket))?;
        let instance = Instance {
            vtype,
            socket,
            weight,
            persistent: persist,
            share: share_id,
            stop,
            thread: Some(thread),
            _metrics: metrics,
        };
        let info = self.info(&uuid, &instance);
        instances.insert(uuid.clone(), instance);
        if persist {
            if let Err(e) = self.write_config(&instances) {
                if let Some(i) = instances.remove(&uuid) {
                    i.shut();
                }
                return Err(e);
            }
        }
        info!(%uuid, r#type = vtype.name, weight, "instance created");
        Ok(info)
    }

    pub fn remove(&self, uuid: &str, force: bool) -> Result<(), ParentError> {
        let uuid =
            control::canonical_uuid(uuid).ok_or_else(|| ParentError::BadUuid(uuid.into()))?;
        let mut instances = self.lock();
        let i = instances
            .get(&uuid)
            .ok_or_else(|| ParentError::NoSuchInstance(uuid.clone()))?;
        if i.stop.has_client() && !force {
            return Err(ParentError::Attached(uuid));
        }
        let persistent = i.persistent;
        let instance = instances.remove(&uuid).expect("just found");
        let written = if persistent {
            self.write_config(&instances)
        } else {
            Ok(())
        };
        drop(instances);
        instance.shut();
        info!(%uuid, force, "instance removed");
        written
    }

    pub fn set_weight(&self, uuid: &str, weight: u32) -> Result<(), ParentError> {
        if !(1..=1000).contains(&weight) {
            return Err(ParentError::Weight(weight));
        }
        let uuid =
            control::canonical_uuid(uuid).ok_or_else(|| ParentError::BadUuid(uuid.into()))?;
        let mut instances = self.lock();
        let i = instances
            .get_mut(&uuid)
            .ok_or_else(|| ParentError::NoSuchInstance(uuid.clone()))?;
        i.weight = weight;
        self.engine.set_weight(i.share, weight);
        if i.persistent {
            self.write_config(&instances)?;
        }
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

    /// Serves control clients from `listener` until it is shut down, each on
    /// a thread of its own (at most [`CONTROL_CLIENTS`] at once).
    pub fn serve_control(self: &Arc<Self>, listener: &UnixListener) {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else {
                break;
            };
            if self.control_clients.fetch_add(1, Ordering::SeqCst) >= CONTROL_CLIENTS {
                self.control_clients.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.write_all(&Response::error("too many control clients").to_line());
                continue;
            }
            let parent = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vgpu-control".into())
                .spawn(move || {
                    parent.serve_control_client(stream);
                    parent.control_clients.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.control_clients.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Request lines in, response lines out, until the client closes, stalls
    /// for [`CONTROL_READ_TIMEOUT`] or breaks the stream.
    fn serve_control_client(&self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(CONTROL_READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CONTROL_READ_TIMEOUT));
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = Vec::new();
            let limit = control::MAX_REQUEST as u64 + 1;
            match (&mut reader).take(limit).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let response = if line.last() != Some(&b'\n') && line.len() as u64 == limit {
                // Too long: skip the rest of the line, then say so.
                loop {
                    let mut rest = Vec::new();
                    match (&mut reader).take(limit).read_until(b'\n', &mut rest) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if rest.last() == Some(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
                Response::error(control::RequestError::TooLong)
            } else {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                match control::parse_request(text) {
                    Ok(r) => self.handle(r),
                    Err(e) => Response::error(e),
                }
            };
            if out.write_all(&response.to_line()).is_err() {
                return;
            }
        }
    }

    /// Stops every instance (their VMMs are disconnected) and leaves the
    /// persistent definitions as they are.
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, i) in all {
            i.shut();
        }
    }
}

/// Ends `listener`'s accept loop from another thread.
pub fn shutdown_listener(listener: &UnixListener) {
    // SAFETY: shutdown(2) on a socket this process owns; it wakes accept().
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}
