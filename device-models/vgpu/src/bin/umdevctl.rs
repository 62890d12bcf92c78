//! `umdevctl`: manages a `umdev-vgpu-parent`'s instances, as mdevctl manages
//! mdev devices: `types`, `create`, `list`, `remove`, `set-weight`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use umdev_vgpu::parent::control::{ask_patiently, Request, Response};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The parent's control socket [default: <state-dir>/control.sock].
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// The parent's --state-dir.
    #[arg(long, global = true, default_value = "/run/umdev-vgpu")]
    state_dir: PathBuf,
    /// Print the answer as JSON: `types` and `list` an array, `create` the
    /// instance.
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

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("umdevctl: {e}"),
    }
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
    let response = match ask_patiently(&path, &request) {
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
        match &response {
            Response::Types { types } => print_json(types),
            Response::Instance { instance } => print_json(instance),
            Response::List { instances } => print_json(instances),
            Response::Done | Response::Error { .. } => {}
        }
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
                let state = match (i.active, i.attached) {
                    (false, _) => "inactive",
                    (true, true) => "attached",
                    (true, false) => "idle",
                };
                println!(
                    "{} {} weight={} {}{} {}{}{}",
                    i.uuid,
                    i.type_name,
                    i.weight,
                    state,
                    if i.persistent { " persistent" } else { "" },
                    i.socket,
                    i.vnc.map(|v| format!(" vnc={v}")).unwrap_or_default(),
                    i.problem.map(|p| format!(" ({p})")).unwrap_or_default()
                );
            }
        }
        Response::Done | Response::Error { .. } => {}
    }
    ExitCode::SUCCESS
}
