//! Exit codes the guest writes to [`crate::ports::DEBUG_EXIT_PORT`]. The VMM
//! process exits with 0 for 0 and with 32 + the code otherwise (its own
//! codes stay apart: see the README).

/// Why the guest ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Every workload finished and its checksum matched.
    Success = 0,
    /// A workload or in-guest test failed (wrong checksum, task killed, ...).
    Failure = 1,
    /// The guest kernel panicked (message on the serial console).
    Panic = 2,
    /// The guest kernel rejected its command line (message on the serial console).
    BadCmdline = 3,
    /// The guest kernel ran out of page frames.
    OutOfMemory = 4,
}

impl ExitCode {
    /// All codes, for lookups.
    pub const ALL: [ExitCode; 5] = [
        ExitCode::Success,
        ExitCode::Failure,
        ExitCode::Panic,
        ExitCode::BadCmdline,
        ExitCode::OutOfMemory,
    ];

    /// The code for a raw value written to the port, if it is one.
    pub fn from_raw(raw: u32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| *c as u32 == raw)
    }

    /// A short description for the VMM's report.
    pub fn describe(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "guest reported a failure",
            ExitCode::Panic => "guest kernel panicked",
            ExitCode::BadCmdline => "guest rejected its command line",
            ExitCode::OutOfMemory => "guest ran out of memory",
        }
    }
}
