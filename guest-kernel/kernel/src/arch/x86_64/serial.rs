//! The console: a polled 16550 UART at COM1 (the VMM's is vm-superio).

use super::cpu::{inb, outb};
use crate::abi::ports::SERIAL_PORT;

const THR: u16 = SERIAL_PORT;
const IER: u16 = SERIAL_PORT + 1;
const LCR: u16 = SERIAL_PORT + 3;
const LSR: u16 = SERIAL_PORT + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// 8N1, interrupts off. The baud rate is irrelevant for a virtual UART.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x03);
}

/// Writes one byte once the transmitter is ready.
pub fn write_byte(b: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {}
    outb(THR, b);
}
