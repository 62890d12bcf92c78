//! Driving edu's DMA engine through a vfio-user client, as several of the edu
//! tests do.

#![allow(dead_code)]

use std::time::Duration;

use umdev::vfio_user::Client;
use umdev_edu::{reg, DMA_CMD_RUN};
use umdev_testkit::wait_for;

const BAR0: u32 = 0;

/// Sets the DMA source, destination and byte count.
pub fn program(c: &mut Client, src: u64, dst: u64, count: u64) {
    c.write_u64(BAR0, reg::DMA_SRC, src).unwrap();
    c.write_u64(BAR0, reg::DMA_DST, dst).unwrap();
    c.write_u64(BAR0, reg::DMA_COUNT, count).unwrap();
}

/// Starts the programmed DMA with `cmd`, posted as QEMU sends MMIO writes:
/// no reply can arrive before the server's own DMA requests.
pub fn start_posted(c: &mut Client, cmd: u64) {
    c.region_write_posted(BAR0, reg::DMA_CMD, &cmd.to_le_bytes())
        .unwrap();
}

/// Waits until the engine is idle (polling serves the server's DMA requests
/// meanwhile).
pub fn wait(c: &mut Client) {
    wait_for(Duration::from_secs(10), || {
        (c.read_u64(BAR0, reg::DMA_CMD).unwrap() & DMA_CMD_RUN == 0).then_some(())
    });
}

/// Runs a DMA of `count` bytes from `src` to `dst` with `cmd` (RUN and its
/// direction and interrupt bits) and waits for it to end.
pub fn run(c: &mut Client, src: u64, dst: u64, count: u64, cmd: u64) {
    program(c, src, dst, count);
    c.write_u64(BAR0, reg::DMA_CMD, cmd).unwrap();
    wait(c);
}
