//! `umdev-probe`: connects to any vfio-user server and prints what a client sees:
//! version and capabilities, regions with their sparse areas, IRQs, and config
//! space decoded in the manner of `lspci -vv`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use umdev::vfio_user::client::{ClientError, RegionDetails};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;

/// Prints what a vfio-user client sees of a device.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The server's UNIX socket.
    #[arg(long)]
    socket_path: PathBuf,
    /// Also dump config space as hex.
    #[arg(long)]
    hex: bool,
}

fn main() -> ExitCode {
    umdev::cli::init_logging();
    let args = Args::parse();
    match probe(&args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("umdev-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(args: &Args) -> Result<String, ClientError> {
    let mut c = Client::connect(&args.socket_path)?;
    let mut out = String::new();
    let v = c.server_version();
    let _ = writeln!(out, "vfio-user {}.{}", v.major, v.minor);
    if let Some(caps) = c.server_caps() {
        let _ = writeln!(out, "capabilities: {}", caps.raw_json());
    }
    let info = c.device_info()?;
    let mut dflags = Vec::new();
    if info.flags & DEVICE_FLAGS_PCI != 0 {
        dflags.push("PCI");
    }
    if info.flags & DEVICE_FLAGS_RESET != 0 {
        dflags.push("RESET");
    }
    let _ = writeln!(
        out,
        "device: flags [{}], {} regions, {} irqs",
        dflags.join(" "),
        info.num_regions,
        info.num_irqs
    );
    for index in 0..info.num_regions.min(64) {
        match c.region_info(index) {
            Ok(r) => region_line(&mut out, index, &r),
            Err(e) => {
                let _ = writeln!(out, "  region {index}: error {e}");
            }
        }
    }
    for index in 0..info.num_irqs.min(64) {
        match c.irq_info(index) {
            Ok(i) => {
                let _ = writeln!(
                    out,
                    "  irq {index} ({}): count {}, flags [{}]",
                    irq_name(index),
                    i.count,
                    irq_flags(i.flags)
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  irq {index}: error {e}");
            }
        }
    }
    if info.flags & DEVICE_FLAGS_PCI != 0 {
        let size = c.region_info(PCI_CONFIG_REGION_INDEX)?.info.size.min(4096) as usize;
        let cfg = c.region_read(PCI_CONFIG_REGION_INDEX, 0, size)?;
        decode_config(&mut out, &cfg);
        if args.hex {
            for (i, row) in cfg.chunks(16).enumerate() {
                if row.iter().all(|&b| b == 0) && i >= 16 {
                    continue;
                }
                let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "{:03x}: {}", i * 16, hex.join(" "));
            }
        }
    }
    Ok(out)
}

fn region_name(index: u32) -> String {
    match index {
        0..=5 => format!("BAR{index}"),
        PCI_ROM_REGION_INDEX => "ROM".into(),
        PCI_CONFIG_REGION_INDEX => "config".into(),
        PCI_VGA_REGION_INDEX => "VGA".into(),
        _ => format!("region{index}"),
    }
}

fn region_line(out: &mut String, index: u32, r: &RegionDetails) {
    let f = r.info.flags;
    let names = [
        (REGION_INFO_FLAG_READ, "read"),
        (REGION_INFO_FLAG_WRITE, "write"),
        (REGION_INFO_FLAG_MMAP, "mmap"),
        (REGION_INFO_FLAG_CAPS, "caps"),
    ];
    let flags: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    let _ = write!(
        out,
        "  region {index} ({}): size {:#x}, flags [{}]",
        region_name(index),
        r.info.size,
        flags.join(" ")
    );
    if r.fd.is_some() {
        let _ = write!(out, ", fd at offset {:#x}", r.info.offset);
    }
    let _ = writeln!(out);
    for a in &r.sparse_areas {
        let _ = writeln!(out, "      sparse mmap area {:#x}+{:#x}", a.offset, a.size);
    }
}

fn irq_name(index: u32) -> &'static str {
    ["INTx", "MSI", "MSI-X", "ERR", "REQ"]
        .get(index as usize)
        .copied()
        .unwrap_or("?")
}

fn irq_flags(f: u32) -> String {
    let names = [
        (IRQ_INFO_EVENTFD, "eventfd"),
        (IRQ_INFO_MASKABLE, "maskable"),
        (IRQ_INFO_AUTOMASKED, "automasked"),
        (IRQ_INFO_NORESIZE, "noresize"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" ")
}

fn u16_at(cfg: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([cfg[at], cfg[at + 1]])
}

fn u32_at(cfg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([cfg[at], cfg[at + 1], cfg[at + 2], cfg[at + 3]])
}

fn onoff(v: bool) -> char {
    if v {
        '+'
    } else {
        '-'
    }
}

/// Config space in the manner of `lspci -vv`.
fn decode_config(out: &mut String, cfg: &[u8]) {
    if cfg.len() < 64 {
        let _ = writeln!(out, "config space: only {} bytes", cfg.len());
        return;
    }
    let class = u32_at(cfg, 8) >> 8;
    let _ = writeln!(
        out,
        "config: {:04x}:{:04x} (rev {:02x}) class {:06x}, subsystem {:04x}:{:04x}",
        u16_at(cfg, 0),
        u16_at(cfg, 2),
        cfg[8],
        class,
        u16_at(cfg, 0x2c),
        u16_at(cfg, 0x2e)
    );
    let cmd = u16_at(cfg, 4);
    let status = u16_at(cfg, 6);
    let _ = writeln!(
        out,
        "  Control: I/O{} Mem{} BusMaster{} SERR{} DisINTx{}",
        onoff(cmd & 1 != 0),
        onoff(cmd & 2 != 0),
        onoff(cmd & 4 != 0),
        onoff(cmd & 0x100 != 0),
        onoff(cmd & 0x400 != 0)
    );
    let _ = writeln!(
        out,
        "  Status: Cap{} INTx{}",
        onoff(status & 0x10 != 0),
        onoff(status & 0x8 != 0)
    );
    if cfg[0x3d] != 0 {
        let _ = writeln!(out, "  Interrupt: pin {}", (b'A' + cfg[0x3d] - 1) as char);
    }
    let mut bar = 0;
    while bar < 6 {
        let v = u32_at(cfg, 0x10 + 4 * bar);
        if v != 0 {
            if v & 1 != 0 {
                let _ = writeln!(out, "  BAR{bar}: I/O ports at {:#x}", v & !3);
            } else {
                let is64 = (v >> 1) & 3 == 2;
                let mut addr = u64::from(v & !0xf);
                if is64 && bar < 5 {
                    addr |= u64::from(u32_at(cfg, 0x14 + 4 * bar)) << 32;
                }
                let _ = writeln!(
                    out,
                    "  BAR{bar}: Memory at {addr:#x} ({}-bit, {}prefetchable)",
                    if is64 { 64 } else { 32 },
                    if v & 8 != 0 { "" } else { "non-" }
                );
                if is64 {
                    bar += 1;
                }
            }
        }
        bar += 1;
    }
    let mut at = cfg[0x34] as usize & !3;
    let mut seen = 0;
    while at >= 0x40 && at + 2 <= cfg.len().min(256) && seen < 48 {
        seen += 1;
        let id = cfg[at];
        let _ = write!(out, "  Capabilities: [{at:02x}] ");
        match id {
            0x01 => {
                let pmcsr = u16_at(cfg, at + 4);
                let _ = writeln!(
                    out,
                    "Power Management version {}, D{}",
                    u16_at(cfg, at + 2) & 7,
                    pmcsr & 3
                );
            }
            0x05 => {
                let ctrl = u16_at(cfg, at + 2);
                let _ = writeln!(
                    out,
                    "MSI: Enable{} Count={}/{} 64bit{}",
                    onoff(ctrl & 1 != 0),
                    1 << ((ctrl >> 4) & 7),
                    1 << ((ctrl >> 1) & 7),
                    onoff(ctrl & 0x80 != 0)
                );
            }
            0x10 => {
                let caps = u16_at(cfg, at + 2);
                let kind = match (caps >> 4) & 0xf {
                    0 => "Endpoint",
                    9 => "Root Complex Integrated Endpoint",
                    _ => "other",
                };
                let _ = writeln!(out, "Express (v{}) {kind}", caps & 0xf);
            }
            0x11 => {
                let ctrl = u16_at(cfg, at + 2);
                let table = u32_at(cfg, at + 4);
                let pba = u32_at(cfg, at + 8);
                let _ = writeln!(
                    out,
                    "MSI-X: Enable{} Count={} Masked{}\n      Vector table: BAR={} offset={:08x}\n      PBA: BAR={} offset={:08x}",
                    onoff(ctrl & 0x8000 != 0),
                    (ctrl & 0x7ff) + 1,
                    onoff(ctrl & 0x4000 != 0),
                    table & 7,
                    table & !7,
                    pba & 7,
                    pba & !7
                );
            }
            _ => {
                let _ = writeln!(out, "capability id {id:#04x}");
            }
        }
        at = cfg[at + 1] as usize & !3;
    }
}
