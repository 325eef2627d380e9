//! Debug-exit device: a 32-bit write of an exit code to
//! [`abi::ports::DEBUG_EXIT_PORT`] ends the VM with that code.
//!
//! It has no state (each write is an event, nothing is remembered), but it
//! persists ([`Persist`]) as the empty [`DebugExitState`] all the same, so a
//! field added later has a place in snapshots and cannot be forgotten.

use crate::{DeviceEvent, DeviceEventSink};
use persist::Persist;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// The debug-exit port.
pub struct DebugExit {
    sink: DeviceEventSink,
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit").finish_non_exhaustive()
    }
}

impl DebugExit {
    /// A device reporting to `sink`.
    pub fn new(sink: DeviceEventSink) -> Self {
        DebugExit { sink }
    }
}

/// The saved state of a [`DebugExit`]: empty, the device remembers nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugExitState {}

/// What a restored [`DebugExit`] needs: the new VM's event sink.
pub struct DebugExitArgs {
    /// Where the exit code goes.
    pub sink: DeviceEventSink,
}

impl std::fmt::Debug for DebugExitArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExitArgs").finish_non_exhaustive()
    }
}

impl Persist for DebugExit {
    type State = DebugExitState;
    type ConstructorArgs = DebugExitArgs;
    /// Neither a save nor a restore can fail while there is no state.
    type Error = Infallible;

    fn save(&self) -> Result<DebugExitState, Infallible> {
        // Destructured so that a new field does not compile until it is saved.
        let DebugExit { sink: _ } = self;
        Ok(DebugExitState {})
    }

    fn restore(args: DebugExitArgs, state: &DebugExitState) -> Result<Self, Infallible> {
        let DebugExitState {} = state;
        Ok(DebugExit::new(args.sink))
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        // Narrower writes carry the low bytes of the code.
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        (self.sink)(DeviceEvent::GuestExit(u32::from_le_bytes(raw)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn write_reports_the_exit_code() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = DebugExit::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.pio_write(PioAddress(abi::ports::DEBUG_EXIT_PORT), 0, &3u32.to_le_bytes());
        dev.pio_write(PioAddress(abi::ports::DEBUG_EXIT_PORT), 0, &[1]);
        assert_eq!(
            *seen.lock().unwrap(),
            [DeviceEvent::GuestExit(3), DeviceEvent::GuestExit(1)]
        );
    }

    #[test]
    fn restored_device_reports_to_the_new_sink() {
        let old = DebugExit::new(Arc::new(|_| panic!("the old sink must not be used")));
        let json = serde_json::to_string(&old.save().unwrap()).unwrap();
        assert_eq!(json, "{}");
        let state: DebugExitState = serde_json::from_str(&json).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: DeviceEventSink = Arc::new(move |e| s.lock().unwrap().push(e));
        let mut dev = DebugExit::restore(DebugExitArgs { sink }, &state).unwrap();
        dev.pio_write(PioAddress(abi::ports::DEBUG_EXIT_PORT), 0, &5u32.to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), [DeviceEvent::GuestExit(5)]);
    }
}
