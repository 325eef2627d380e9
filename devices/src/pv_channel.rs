//! The paravirtual channel (see [`abi::pv`]): the guest writes the guest-physical
//! address of a [`PvRequest`] to [`abi::ports::PV_CHANNEL_PORT`]; the device reads
//! it from guest memory, turns it into a [`DeviceEvent`] and writes the status back.
//! A bad address or an unknown kind is answered with `REJECTED`; it never
//! panics the VMM, whatever the guest writes.
//!
//! A request is handled during the `out` that sends it, so the device holds
//! nothing between two: it persists ([`Persist`]) as the empty
//! [`PvChannelState`], so that a field added later has a place in snapshots.

use crate::GuestRam;
use crate::{DeviceEvent, DeviceEventSink};
use abi::pv::{status, PvMessage, PvRequest};
use persist::Persist;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{Address, Bytes, GuestAddress};

/// The channel device.
pub struct PvChannel {
    mem: GuestRam,
    sink: DeviceEventSink,
    /// Restored from a saved state (a snapshot or a migration): the
    /// guest's checkpoint is passed.
    restored: bool,
    /// The checkpoint was reported (once per VM).
    checkpoint_seen: bool,
}

impl std::fmt::Debug for PvChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvChannel").finish_non_exhaustive()
    }
}

impl PvChannel {
    /// A channel over guest memory `mem` reporting to `sink`.
    pub fn new(mem: GuestRam, sink: DeviceEventSink) -> Self {
        PvChannel {
            mem,
            sink,
            restored: false,
            checkpoint_seen: false,
        }
    }

    /// Handles the request at `gpa`; returns the status written back.
    fn handle(&mut self, gpa: u64) -> u32 {
        let addr = GuestAddress(gpa);
        let req: PvRequest = match self.mem.read_obj(addr) {
            Ok(r) => r,
            Err(e) => {
                (self.sink)(DeviceEvent::BadRequest(format!(
                    "paravirtual request at {gpa:#x} is not in guest memory: {e}"
                )));
                return status::REJECTED;
            }
        };
        let status = match req.decode() {
            Ok(PvMessage::StartCpus) => {
                (self.sink)(DeviceEvent::StartCpus);
                status::OK
            }
            Ok(PvMessage::Report(r)) => {
                (self.sink)(DeviceEvent::Report(r));
                status::OK
            }
            // A restored copy goes on; the original waits at its checkpoint
            // (and tells the VMM once, which may snapshot it there).
            Ok(PvMessage::Checkpoint) if self.restored => status::OK,
            Ok(PvMessage::Checkpoint) => {
                if !std::mem::replace(&mut self.checkpoint_seen, true) {
                    (self.sink)(DeviceEvent::Checkpoint);
                }
                status::WAIT
            }
            Err(k) => {
                (self.sink)(DeviceEvent::BadRequest(format!(
                    "unknown paravirtual request kind {} at {gpa:#x}",
                    k.0
                )));
                status::REJECTED
            }
        };
        // `status` is the second u32 of the request (`gpa` is below 4 GiB:
        // the sum cannot overflow, and the request was just read whole).
        if let Some(at) = addr.checked_add(4) {
            let _ = self.mem.write_obj(status, at);
        }
        status
    }
}

/// The saved state of a [`PvChannel`]: empty, requests are synchronous.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvChannelState {}

/// What a restored [`PvChannel`] needs: the new VM's memory and event sink.
pub struct PvChannelArgs {
    /// Guest memory the requests are read from.
    pub mem: GuestRam,
    /// Where the requests' events go.
    pub sink: DeviceEventSink,
}

impl std::fmt::Debug for PvChannelArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvChannelArgs").finish_non_exhaustive()
    }
}

impl Persist for PvChannel {
    type State = PvChannelState;
    type ConstructorArgs = PvChannelArgs;
    /// Neither a save nor a restore can fail while there is no state.
    type Error = Infallible;

    fn save(&self) -> Result<PvChannelState, Infallible> {
        // Destructured so that a new field does not compile until it is saved.
        // `restored` and `checkpoint_seen` describe this VM, not the guest:
        // a restored channel is restored by definition.
        let PvChannel {
            mem: _,
            sink: _,
            restored: _,
            checkpoint_seen: _,
        } = self;
        Ok(PvChannelState {})
    }

    fn restore(args: PvChannelArgs, state: &PvChannelState) -> Result<Self, Infallible> {
        let PvChannelState {} = state;
        let mut dev = PvChannel::new(args.mem, args.sink);
        dev.restored = true;
        Ok(dev)
    }
}

impl MutDevicePio for PvChannel {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 4 {
            (self.sink)(DeviceEvent::BadRequest(format!(
                "paravirtual doorbell written with {} bytes; use a 32-bit out",
                data.len()
            )));
            return;
        }
        let mut raw = [0u8; 4];
        raw.copy_from_slice(data);
        self.handle(u64::from(u32::from_le_bytes(raw)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::pv::WorkloadReport;
    use std::sync::{Arc, Mutex};

    fn setup() -> (PvChannel, GuestRam, Arc<Mutex<Vec<DeviceEvent>>>) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = PvChannel::new(mem.clone(), Arc::new(move |e| s.lock().unwrap().push(e)));
        (dev, mem, seen)
    }

    #[test]
    fn report_is_forwarded_and_acknowledged() {
        let (mut dev, mem, seen) = setup();
        let r = WorkloadReport {
            cpu: 1,
            workload: 1,
            first_page: 5,
            pages: 5,
            checksum: 77,
            faults: 5,
            cycles: 9,
        };
        mem.write_obj(PvRequest::encode(&PvMessage::Report(r)), GuestAddress(0x1000))
            .unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PV_CHANNEL_PORT),
            0,
            &0x1000u32.to_le_bytes(),
        );
        assert_eq!(*seen.lock().unwrap(), [DeviceEvent::Report(r)]);
        let back: PvRequest = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(back.status, status::OK);
    }

    #[test]
    fn hostile_requests_are_rejected_without_panicking() {
        let (mut dev, mem, seen) = setup();
        // Outside guest memory.
        dev.pio_write(
            PioAddress(abi::ports::PV_CHANNEL_PORT),
            0,
            &0xffff_fff0u32.to_le_bytes(),
        );
        // Unknown kind.
        mem.write_obj(
            PvRequest {
                kind: 99,
                ..Default::default()
            },
            GuestAddress(0x2000),
        )
        .unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PV_CHANNEL_PORT),
            0,
            &0x2000u32.to_le_bytes(),
        );
        // Straddling the end of memory.
        dev.pio_write(
            PioAddress(abi::ports::PV_CHANNEL_PORT),
            0,
            &0xfff0u32.to_le_bytes(),
        );
        // Wrong width.
        dev.pio_write(PioAddress(abi::ports::PV_CHANNEL_PORT), 0, &[1]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        assert!(seen.iter().all(|e| matches!(e, DeviceEvent::BadRequest(_))));
        let back: PvRequest = mem.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(back.status, status::REJECTED);
    }

    #[test]
    fn restored_channel_serves_the_new_memory() {
        let (old, _, _) = setup();
        let json = serde_json::to_string(&old.save().unwrap()).unwrap();
        assert_eq!(json, "{}");
        let state: PvChannelState = serde_json::from_str(&json).unwrap();
        let (_, mem, seen) = setup();
        let s = seen.clone();
        let sink: DeviceEventSink = Arc::new(move |e| s.lock().unwrap().push(e));
        let mut dev = PvChannel::restore(
            PvChannelArgs {
                mem: mem.clone(),
                sink,
            },
            &state,
        )
        .unwrap();
        mem.write_obj(PvRequest::start_cpus(), GuestAddress(0x1000))
            .unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PV_CHANNEL_PORT),
            0,
            &0x1000u32.to_le_bytes(),
        );
        assert_eq!(*seen.lock().unwrap(), [DeviceEvent::StartCpus]);
        let back: PvRequest = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(back.status, status::OK);
    }
}
