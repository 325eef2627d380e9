//! The serial console: a 16550 UART (vm-superio) on COM1, its output going to the
//! VMM's stdout or to a capture buffer (tests), its input fed from the host's stdin
//! by the VMM's event loop.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
/// The UART state saved in snapshots.
pub use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
#[derive(Debug, Clone)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// An in-memory buffer (tests read it).
    Capture(Arc<Mutex<Vec<u8>>>),
}

/// A `Write` for a [`SerialOutput`] that also notes when the first byte came.
#[derive(Debug)]
pub struct SerialWriter {
    out: SerialOutput,
    first_output: Arc<OnceLock<Instant>>,
}

impl Write for SerialWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.first_output.get_or_init(Instant::now);
        match &self.out {
            SerialOutput::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                // Line-buffered: the console is read by people and tests as it goes.
                if buf.contains(&b'\n') {
                    out.flush()?;
                }
                Ok(buf.len())
            }
            SerialOutput::Capture(b) => {
                b.lock()
                    .map_err(|_| io::Error::other("capture buffer poisoned"))?
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.out {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::Capture(_) => Ok(()),
        }
    }
}

/// The console device.
#[derive(Debug)]
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, SerialWriter>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self::with_first_output(irq, out, Arc::default())
    }

    /// Like [`SerialConsole::new`], recording the time of the first output byte.
    pub fn with_first_output(irq: EventFd, out: SerialOutput, first_output: Arc<OnceLock<Instant>>) -> Self {
        SerialConsole {
            uart: Serial::new(EventFdTrigger(irq), SerialWriter { out, first_output }),
        }
    }

    /// Like [`SerialConsole::with_first_output`], with the UART's registers and
    /// receive FIFO taken from a snapshot.
    pub fn from_state(
        irq: EventFd,
        out: SerialOutput,
        first_output: Arc<OnceLock<Instant>>,
        state: &SerialState,
    ) -> Result<Self, String> {
        let uart = Serial::from_state(
            state,
            EventFdTrigger(irq),
            NoEvents,
            SerialWriter { out, first_output },
        )
        .map_err(|e| format!("{e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// The UART's registers and receive FIFO (for snapshots).
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(off), Some(&b)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_capture_buffer() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut con = SerialConsole::new(irq, SerialOutput::Capture(buf.clone()));
        for b in b"hi\n" {
            con.pio_write(PioAddress(abi::ports::SERIAL_PORT), 0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        con.pio_read(PioAddress(abi::ports::SERIAL_PORT), 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn state_round_trips() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut con = SerialConsole::new(irq, SerialOutput::Capture(Arc::default()));
        con.pio_write(PioAddress(abi::ports::SERIAL_PORT), 7, &[0x5a]); // scratch
        con.enqueue_input(b"ab");
        let state = con.state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let back =
            SerialConsole::from_state(irq, SerialOutput::Capture(Arc::default()), Arc::default(), &state)
                .unwrap();
        assert_eq!(back.state(), state);
        let mut too_much = state;
        too_much.in_buffer = vec![0; 1000];
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialConsole::from_state(irq, SerialOutput::Stdout, Arc::default(), &too_much).is_err());
    }
}
