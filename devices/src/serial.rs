//! The serial console: a 16550 UART (vm-superio) on COM1, its output going to the
//! VMM's stdout or to a capture buffer (tests), its input fed from the host's stdin
//! by the VMM's event loop.
//!
//! It persists ([`Persist`]) as [`SerialConsoleState`]: the UART's registers and
//! receive FIFO. Bytes already transmitted are gone (they went to the output).

use persist::Persist;
use serde::{Deserialize, Serialize};
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

/// Receive FIFO size of vm-superio's UART (it is private there): a saved FIFO
/// longer than this cannot be restored.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO is longer than the UART's.
    #[error(
        "cannot restore the serial console: the saved receive FIFO holds {len} bytes, the UART holds at most {SERIAL_FIFO_SIZE}; the saved state is corrupted, take the snapshot again"
    )]
    FifoTooLong {
        /// Bytes in the saved FIFO.
        len: usize,
    },
    /// vm-superio refused the state or could not raise the restored interrupt.
    #[error("cannot restore the serial console: {source}; check that the VM's serial irqfd is registered")]
    Restore {
        /// Why.
        #[source]
        source: vm_superio::serial::Error<io::Error>,
    },
}

/// The UART state that snapshots and migration carry: a serde mirror of
/// vm-superio's [`SerialState`].
///
/// Its JSON is the one the VMM's snapshots (format version 1) already hold
/// (`{"registers": [9 bytes], "in_buffer": [..]}`), so it can replace the VMM's
/// hand-written mirror without a format change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConsoleState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR, in this order.
    pub registers: [u8; 9],
    /// Receive FIFO (host input the guest has not read yet), oldest first.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialConsoleState {
    /// The state of a UART just reset.
    fn default() -> Self {
        (&SerialState::default()).into()
    }
}

impl From<&SerialState> for SerialConsoleState {
    fn from(s: &SerialState) -> Self {
        SerialConsoleState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialConsoleState> for SerialState {
    fn from(s: &SerialConsoleState) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What a restored [`SerialConsole`] needs besides its state: the host
/// resources of the new VM.
#[derive(Debug)]
pub struct SerialConsoleArgs {
    /// Raises the UART's interrupt (registered as the VM's irqfd for IRQ 4).
    pub irq: EventFd,
    /// Where the guest's output goes.
    pub out: SerialOutput,
    /// Set to the time of the first output byte after the restore.
    pub first_output: Arc<OnceLock<Instant>>,
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
    /// receive FIFO taken from vm-superio's state. [`Persist::restore`] is the
    /// same from a [`SerialConsoleState`].
    pub fn from_state(
        irq: EventFd,
        out: SerialOutput,
        first_output: Arc<OnceLock<Instant>>,
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(SerialError::FifoTooLong {
                len: state.in_buffer.len(),
            });
        }
        let uart = Serial::from_state(
            state,
            EventFdTrigger(irq),
            NoEvents,
            SerialWriter { out, first_output },
        )
        .map_err(|source| SerialError::Restore { source })?;
        Ok(SerialConsole { uart })
    }

    /// The UART's registers and receive FIFO as vm-superio's state.
    /// [`Persist::save`] is the same as a [`SerialConsoleState`].
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl Persist for SerialConsole {
    type State = SerialConsoleState;
    type ConstructorArgs = SerialConsoleArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialConsoleState, SerialError> {
        Ok((&self.uart.state()).into())
    }

    fn restore(args: SerialConsoleArgs, state: &SerialConsoleState) -> Result<Self, SerialError> {
        SerialConsole::from_state(args.irq, args.out, args.first_output, &state.into())
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
        let err =
            SerialConsole::from_state(irq, SerialOutput::Stdout, Arc::default(), &too_much).unwrap_err();
        assert!(matches!(err, SerialError::FifoTooLong { len: 1000 }), "{err:?}");
        assert!(err.to_string().contains("holds 1000 bytes"), "{err}");
    }

    fn args() -> SerialConsoleArgs {
        SerialConsoleArgs {
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            out: SerialOutput::Capture(Arc::default()),
            first_output: Arc::default(),
        }
    }

    fn read_reg(con: &mut SerialConsole, offset: u16) -> u8 {
        let mut b = [0u8];
        con.pio_read(PioAddress(abi::ports::SERIAL_PORT), offset, &mut b);
        b[0]
    }

    #[test]
    fn persisted_state_round_trips_through_json() {
        let mut con = SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SerialOutput::Capture(Arc::default()),
        );
        con.pio_write(PioAddress(abi::ports::SERIAL_PORT), 7, &[0x5a]); // scratch
        con.pio_write(PioAddress(abi::ports::SERIAL_PORT), 1, &[0x01]); // IER: data ready
        con.pio_write(PioAddress(abi::ports::SERIAL_PORT), 3, &[0x03]); // LCR: 8N1
        assert_eq!(con.enqueue_input(b"ab"), 2);
        let state = con.save().unwrap();
        assert_eq!(state.registers[8], 0x5a);
        assert_eq!(state.registers[2], 0x01);
        assert_eq!(state.registers[4], 0x03);
        assert_eq!(state.in_buffer, b"ab");

        let json = serde_json::to_string(&state).unwrap();
        // The shape the VMM's snapshots already hold.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 2, "{json}");
        assert_eq!(object["registers"].as_array().unwrap().len(), 9, "{json}");
        assert_eq!(object["in_buffer"], serde_json::json!([97, 98]), "{json}");
        let back: SerialConsoleState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let mut restored = SerialConsole::restore(args(), &back).unwrap();
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(SerialConsoleState::from(&restored.state()), state);
        // The guest sees the same UART: scratch, then the input in order.
        assert_eq!(read_reg(&mut restored, 7), 0x5a);
        assert_eq!(read_reg(&mut restored, 0), b'a');
        assert_eq!(read_reg(&mut restored, 0), b'b');
        assert_eq!(read_reg(&mut restored, 5) & 0x01, 0, "FIFO drained");

        let corrupt = SerialConsoleState {
            in_buffer: vec![0; SERIAL_FIFO_SIZE + 1],
            ..state
        };
        let err = SerialConsole::restore(args(), &corrupt).unwrap_err();
        assert!(err.to_string().contains("corrupted"), "{err}");
        let full = SerialConsoleState {
            in_buffer: vec![0; SERIAL_FIFO_SIZE],
            ..SerialConsoleState::default()
        };
        assert!(SerialConsole::restore(args(), &full).is_ok(), "a full FIFO fits");
    }

    #[test]
    fn default_state_is_a_reset_uart() {
        let con = SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SerialOutput::Capture(Arc::default()),
        );
        assert_eq!(con.save().unwrap(), SerialConsoleState::default());
        assert_eq!(
            SerialState::from(&SerialConsoleState::default()),
            SerialState::default()
        );
    }
}
