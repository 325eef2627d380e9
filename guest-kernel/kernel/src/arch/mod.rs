//! Architecture code. Only x86_64 exists; generic code uses the re-exports below.

pub mod x86_64;
pub use self::x86_64::*;
