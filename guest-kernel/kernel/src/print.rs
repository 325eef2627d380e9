//! Console output on the serial port, one lock so CPUs' lines do not interleave.

use core::fmt::{self, Write};

use crate::arch::serial;
use crate::sync::SpinLock;

static CONSOLE: SpinLock<()> = SpinLock::new(());

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(serial::write_byte);
        Ok(())
    }
}

/// Prints a formatted line.
pub fn line(args: fmt::Arguments<'_>) {
    let _guard = CONSOLE.lock();
    let _ = Serial.write_fmt(args);
    serial::write_byte(b'\n');
}

/// Prints raw bytes (a user task's output).
pub fn bytes(b: &[u8]) {
    let _guard = CONSOLE.lock();
    b.iter().copied().for_each(serial::write_byte);
}

/// Prints a line without taking the lock: for panics, which may happen while
/// this CPU holds it.
pub fn line_unlocked(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
    serial::write_byte(b'\n');
}

/// `println!` for the kernel console.
macro_rules! kprintln {
    ($($arg:tt)*) => { $crate::print::line(format_args!($($arg)*)) };
}
