//! The paravirtual channel between the guest kernel and the VMM.
//!
//! The guest fills a [`PvRequest`] in its own memory (below 4 GiB, 8-byte aligned)
//! and writes its guest-physical address with a 32-bit `out` to
//! [`PV_CHANNEL_PORT`](crate::ports::PV_CHANNEL_PORT). The VMM reads it, acts,
//! and writes `status` back before the vCPU resumes: a request is synchronous.
//! Typed messages ([`PvMessage`]) are encoded into the fixed request so the port
//! protocol never changes when a message is added.

/// Request kinds (`PvRequest::kind`).
pub mod kind {
    /// Start every secondary vCPU (sent once by vCPU 0). No arguments.
    pub const START_CPUS: u32 = 1;
    /// A user task finished a workload: [`super::WorkloadReport`].
    pub const REPORT: u32 = 2;
    /// The guest is at its checkpoint (the `faas` workload built its
    /// state): answered [`super::status::WAIT`] until the VM is a restored
    /// (or migrated) copy, then [`super::status::OK`]. No arguments.
    pub const CHECKPOINT: u32 = 3;
}

/// `PvRequest::status` values written by the VMM.
pub mod status {
    /// Not handled yet (the guest writes this before sending).
    pub const PENDING: u32 = 0;
    /// Handled.
    pub const OK: u32 = 1;
    /// The VMM rejected the request (unknown kind, bad arguments).
    pub const REJECTED: u32 = 2;
    /// Not yet: ask again later ([`super::kind::CHECKPOINT`]).
    pub const WAIT: u32 = 3;
}

/// One request: a kind, a status the VMM writes, and six argument words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct PvRequest {
    /// One of [`kind`].
    pub kind: u32,
    /// One of [`status`]; written by the VMM.
    pub status: u32,
    /// Arguments; meaning depends on `kind`.
    pub args: [u64; 6],
}

const _: () = assert!(core::mem::size_of::<PvRequest>() == 56);
crate::byte_valued!(PvRequest);

/// The result of one user task's workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WorkloadReport {
    /// vCPU the task ran on.
    pub cpu: u32,
    /// [`crate::workload::WorkloadKind`] as `u32`.
    pub workload: u32,
    /// Index of the first page of the task's share.
    pub first_page: u64,
    /// Pages the task touched.
    pub pages: u64,
    /// Checksum the task computed from memory.
    pub checksum: u64,
    /// Page faults the guest kernel handled for the task.
    pub faults: u64,
    /// TSC cycles the workload took (user code, faults included).
    pub cycles: u64,
}

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PvMessage {
    /// See [`kind::START_CPUS`].
    StartCpus,
    /// See [`kind::REPORT`].
    Report(WorkloadReport),
    /// See [`kind::CHECKPOINT`].
    Checkpoint,
}

/// A request the VMM cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl PvRequest {
    /// [`PvMessage::StartCpus`] as a request.
    pub const fn start_cpus() -> PvRequest {
        PvRequest {
            kind: kind::START_CPUS,
            status: status::PENDING,
            args: [0; 6],
        }
    }

    /// Encodes a message.
    pub fn encode(msg: &PvMessage) -> PvRequest {
        match msg {
            PvMessage::StartCpus => Self::start_cpus(),
            PvMessage::Checkpoint => PvRequest {
                kind: kind::CHECKPOINT,
                status: status::PENDING,
                args: [0; 6],
            },
            PvMessage::Report(r) => PvRequest {
                kind: kind::REPORT,
                status: status::PENDING,
                args: [
                    (u64::from(r.workload) << 32) | u64::from(r.cpu),
                    r.first_page,
                    r.pages,
                    r.checksum,
                    r.faults,
                    r.cycles,
                ],
            },
        }
    }

    /// Decodes the message.
    pub fn decode(&self) -> Result<PvMessage, UnknownKind> {
        match self.kind {
            kind::START_CPUS => Ok(PvMessage::StartCpus),
            kind::CHECKPOINT => Ok(PvMessage::Checkpoint),
            kind::REPORT => Ok(PvMessage::Report(WorkloadReport {
                cpu: (self.args[0] & 0xffff_ffff) as u32,
                workload: (self.args[0] >> 32) as u32,
                first_page: self.args[1],
                pages: self.args[2],
                checksum: self.args[3],
                faults: self.args[4],
                cycles: self.args[5],
            })),
            other => Err(UnknownKind(other)),
        }
    }
}

/// The slow page store and the guest statistics, on their own port
/// ([`PAGE_STORE_PORT`](crate::ports::PAGE_STORE_PORT)) so the channel's
/// messages stay as they are. Same [`PvRequest`] layout; `status` is written
/// before the `out` retires, but a READ is only *accepted* then: the data comes
/// later.
///
/// Protocol: the guest sends `INIT` once with a completion area (an array of
/// [`SLOTS`] `u64` words in guest RAM, zeroed by the guest). `READ` asks for
/// store page `args[0]` to be written into the guest frame at `args[1]`; the
/// guest picks a free slot `args[2]` and a non-zero request id `args[3]`, and
/// `args[4]` is the delay in microseconds. After that delay a host thread fills
/// the frame with [`word`]s and then stores the request id into
/// `completion[slot]` (release order): the guest polls the area (timer tick,
/// idle loop) and wakes the waiters. `STATS` hands the guest's fault statistics
/// ([`GuestStats`], `args` = gpa of it) to the VMM.
pub mod store {
    /// Set up: `args[0]` = gpa of the completion area ([`SLOTS`] u64 words).
    pub const INIT: u32 = 0x100;
    /// Read a page: `[index, dest_gpa, slot, request_id, delay_us]`.
    pub const READ: u32 = 0x101;
    /// Guest statistics: `args[0]` = gpa of a [`GuestStats`].
    pub const STATS: u32 = 0x102;
    /// Hold reads of page `args[0]`: the device queues them (accepted, status
    /// OK, not answered) until [`RELEASE`] of that page, instead of answering
    /// after their delay. Lets a test keep a fault waiting as long as it needs,
    /// whatever the host's speed. At most [`MAX_HELD_PAGES`] pages at once.
    pub const HOLD: u32 = 0x103;
    /// Release page `args[0]`: its held reads are answered now (no delay), and
    /// later reads of it are answered after their delay again.
    pub const RELEASE: u32 = 0x104;
    /// Pages that can be held at once.
    pub const MAX_HELD_PAGES: usize = 16;
    /// Number of completion slots (outstanding reads).
    pub const SLOTS: usize = 64;
    /// Pages in the store.
    pub const PAGES: u64 = 4096;

    /// Word `k` (0..512) of store page `index`: deterministic, so both sides
    /// can check any byte without storing anything.
    pub const fn word(index: u64, k: u64) -> u64 {
        crate::workload::page_value(0x5354_4f52_4500 ^ index, k)
    }

    /// Buckets of the retries-per-fault histogram: 0, 1, 2, 3, 4-7, 8-15, 16-31, 32+.
    pub const HIST_BUCKETS: usize = 8;

    /// Bucket of a retry count.
    pub const fn hist_bucket(retries: u64) -> usize {
        match retries {
            0 => 0,
            1 => 1,
            2 => 2,
            3 => 3,
            4..=7 => 4,
            8..=15 => 5,
            16..=31 => 6,
            _ => 7,
        }
    }

    /// Fault statistics of the guest kernel (all tasks, all vCPUs).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
    #[repr(C)]
    pub struct GuestStats {
        /// Page faults handled (every entry, retries included).
        pub faults: u64,
        /// Faults that were retries (`TRIED`) of an earlier one.
        pub retries: u64,
        /// Most retries one fault needed.
        pub max_retries: u64,
        /// Completed faults by retry count ([`hist_bucket`]).
        pub retry_hist: [u64; HIST_BUCKETS],
        /// Fault waits ended by a signal (the task ran its handler first).
        pub signal_interruptions: u64,
        /// Faults delivered to an in-guest userfaultfd handler.
        pub userfaults: u64,
        /// Page-store reads sent to the VMM.
        pub store_reads: u64,
        /// Timer ticks (all vCPUs).
        pub ticks: u64,
        /// Context switches.
        pub switches: u64,
    }
    const _: () = assert!(core::mem::size_of::<GuestStats>() == 8 * (HIST_BUCKETS + 8));
    crate::byte_valued!(GuestStats);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        let r = WorkloadReport {
            cpu: 3,
            workload: 1,
            first_page: 10,
            pages: 99,
            checksum: 0xdead_beef_cafe_f00d,
            faults: 99,
            cycles: 12345,
        };
        let req = PvRequest::encode(&PvMessage::Report(r));
        assert_eq!(req.decode(), Ok(PvMessage::Report(r)));
        assert_eq!(PvRequest::start_cpus().decode(), Ok(PvMessage::StartCpus));
        let bad = PvRequest {
            kind: 77,
            ..Default::default()
        };
        assert_eq!(bad.decode(), Err(UnknownKind(77)));
    }
}
