//! `umdevctl`: manages a `umdev-vgpu-parent`'s instances, as mdevctl manages
//! mdev devices: `types`, `create`, `list`, `remove`, `set-weight`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use umdev_vgpu::parent::control::{Request, Response};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The parent's control socket [default: <state-dir>/control.sock].
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// The parent's --state-dir.
    #[arg(long, global = true, default_value = "/run/umdev-vgpu")]
    state_dir: PathBuf,
    /// Print the parent's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The types and how many more of each fit.
    Types,
    /// A new instance; prints its socket path.
    Create {
        #[arg(long = "type")]
        type_name: String,
        #[arg(long)]
        uuid: Option<String>,
        /// Its share of the engine against the others' (1-1000, default 1).
        #[arg(long)]
        weight: Option<u32>,
        /// Also define it in the parent's config file (made again at start).
        #[arg(long)]
        persist: bool,
    },
    /// The instances.
    List,
    /// Removes an instance (refused while a VMM is attached, unless --force).
    Remove {
        uuid: String,
        /// Reset the device and disconnect its VMM.
        #[arg(long)]
        force: bool,
    },
    /// Changes an instance's weight.
    SetWeight { uuid: String, weight: u32 },
}

fn ask(path: &PathBuf, request: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the parent at {}: {e}", path.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("the parent's answer {answer:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = args
        .control
        .clone()
        .unwrap_or_else(|| args.state_dir.join("control.sock"));
    let request = match &args.command {
        Command::Types => Request::Types {},
        Command::Create {
            type_name,
            uuid,
            weight,
            persist,
        } => Request::Create {
            type_name: type_name.clone(),
            uuid: uuid.clone(),
            weight: *weight,
            persist: *persist,
        },
        Command::List => Request::List {},
        Command::Remove { uuid, force } => Request::Remove {
            uuid: uuid.clone(),
            force: *force,
        },
        Command::SetWeight { uuid, weight } => Request::SetWeight {
            uuid: uuid.clone(),
            weight: *weight,
        },
    };
    let response = match ask(&path, &request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("umdevctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Response::Error { error } = &response {
        eprintln!("umdevctl: {error}");
        return ExitCode::FAILURE;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    match response {
        Response::Types { types } => {
            println!(
                "{:<10} {:>8} {:>8} {:>12} {:>9}  description",
                "type", "VRAM MiB", "contexts", "GGTT entries", "available"
            );
            for t in types {
                println!(
                    "{:<10} {:>8} {:>8} {:>12} {:>9}  {}",
                    t.name, t.vram_mib, t.contexts, t.ggtt_entries, t.available, t.description
                );
            }
        }
        Response::Instance { instance } => println!("{}", instance.socket),
        Response::List { instances } => {
            for i in instances {
                println!(
                    "{} {} weight={} {}{} {}",
                    i.uuid,
                    i.type_name,
                    i.weight,
                    if i.attached { "attached" } else { "idle" },
                    if i.persistent { " persistent" } else { "" },
                    i.socket
                );
            }
        }
        Response::Done | Response::Error { .. } => {}
    }
    ExitCode::SUCCESS
}
