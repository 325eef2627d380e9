//! Debug-exit device: a 32-bit write of an exit code to
//! [`abi::ports::DEBUG_EXIT_PORT`] ends the VM with that code.

use crate::{DeviceEvent, DeviceEventSink};
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
}
