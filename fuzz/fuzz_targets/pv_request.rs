//! What the guest sends the VMM's paravirtual devices: `PvRequest`s in
//! guest memory, their address written to the doorbell port, and a page
//! store's saved state (`PageStoreState`, from a snapshot or a peer).
//!
//! Input: a mode byte, then
//! - 0: requests to the page store; each 60 bytes: a `u32` guest address
//!   (the request is written there if it fits in guest RAM, and the doorbell
//!   is rung with it either way) and a 56-byte `PvRequest`. Leftover bytes
//!   ring the doorbell with a write of their length (a 32-bit `out` is
//!   the only valid one). Afterwards the device is paused and saved, and the
//!   state must restore on a new device: any sequence of requests leaves a
//!   state a snapshot can restore.
//! - 1: the same requests to the paravirtual channel (`PvRequest::decode`).
//! - 2 and 3: a `PageStoreState` as JSON, restored (paused, or running) on a
//!   new device; a state that restores saves and restores again.
//!
//! Guest RAM is 64 KiB at 0 and 64 KiB at 1 MiB; the device's worker
//! serves reads into it while later requests arrive, as in a VM.
#![no_main]

use abi::pv::PvRequest;
use devices::page_store::{GuestStatsCell, PageStore, PageStoreState};
use devices::pv_channel::PvChannel;
use devices::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_fuzz::{no_events, ram, restore_page_store, save_page_store};

const REQ: usize = std::mem::size_of::<PvRequest>();

/// Writes each request of `data` into `mem` and rings `dev`'s doorbell.
fn send(dev: &mut impl MutDevicePio, port: u16, mem: &GuestRam, data: &[u8]) {
    let mut chunks = data.chunks_exact(4 + REQ);
    for c in &mut chunks {
        let gpa = u32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
        let mut req = PvRequest::default();
        req.as_mut_slice().copy_from_slice(&c[4..]);
        // What decodes encodes back to itself.
        if let Ok(m) = req.decode() {
            assert_eq!(PvRequest::encode(&m).decode(), Ok(m));
        }
        let _ = mem.write_obj(req, GuestAddress(u64::from(gpa)));
        dev.pio_write(PioAddress(port), 0, &gpa.to_le_bytes());
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        dev.pio_write(PioAddress(port), 0, &rest[..rest.len().min(8)]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mem = ram(&[(0, 0x1_0000), (0x10_0000, 0x1_0000)]);
    match mode % 4 {
        0 => {
            let mut dev = PageStore::new(
                mem.clone(),
                no_events(),
                GuestStatsCell::default(),
                sandbox::SeccompMode::Off,
            )
            .expect("the page store starts");
            send(&mut dev, abi::ports::PAGE_STORE_PORT, &mem, data);
            let saved = save_page_store(&dev);
            if restore_page_store(&mem, &saved, true).is_none() {
                panic!("the state of a device the guest drove does not restore: {saved:?}");
            }
        }
        1 => {
            let mut dev = PvChannel::new(mem.clone(), no_events());
            send(&mut dev, abi::ports::PV_CHANNEL_PORT, &mem, data);
        }
        m => {
            let Ok(state) = serde_json::from_slice::<PageStoreState>(data) else {
                return;
            };
            let _ = restore_page_store(&mem, &state, m == 2);
        }
    }
});
