//! The seeded plan of one stress run: the guest command line, the
//! fault-around window and the schedule of injected events.

use abi::workload::mix64;
use serde::Serialize;

/// An injected event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StormEvent {
    /// Kick every vCPU this many times.
    Kicks(u32),
    /// Pause, stay paused this many milliseconds, resume.
    PauseResume(u32),
    /// Hold every page for this many milliseconds.
    Hold(u32),
    /// Snapshot the running VM (it goes on); after the run the snapshot is
    /// restored lazily and must finish with the same checksums.
    Snapshot {
        /// A live snapshot (`--live`: the VM pauses only to capture its
        /// state and write-protect memory; its lazily served memory is
        /// fetched in full first). Only on anonymous RAM (live snapshots
        /// refuse memfd RAM).
        live: bool,
    },
    /// Migrate the running VM (loopback Unix socket; pre-copy rounds with
    /// dirty logging first, 0 to 3, then post-copy) to a destination VM in
    /// this process, which must finish with the checksums.
    Migrate {
        /// Pre-copy rounds (0: post-copy only).
        precopy_rounds: u32,
        /// Cut both connections once this many KiB went to the destination
        /// (0: never); if the destination runs the VM by then, the
        /// migration is resumed (`recover`, then `migrate --resume`).
        cut_after_kib: u32,
    },
}

/// One VM run of a stress session.
#[derive(Debug, Clone, Serialize)]
pub struct RunPlan {
    /// The guest command line.
    pub cmdline: String,
    /// Fault-around window.
    pub fault_around: u32,
    /// Fault-handler threads of the VM (a pool over one userfaultfd).
    pub handler_threads: u32,
    /// Their pinning (`--handler-pinning`).
    pub handler_pinning: String,
    /// Guest RAM's backing (`anon`, `memfd`) and fault mode (`missing`,
    /// `minor`), also for the restore of a snapshot taken in the run.
    pub backing: (String, String),
    /// Injected events, at milliseconds after the start.
    pub schedule: Vec<(u32, StormEvent)>,
}

/// A deterministic random stream (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The plan of run `index` of a session with `seed`.
pub fn plan(seed: u64, index: u64, vcpus: u32) -> RunPlan {
    let mut rng = Rng(mix64(seed ^ index.wrapping_mul(0x5851_f42d_4c95_7f2d)));
    // One run in four is the guest's own test suite: stage-1 faults retried on a
    // slow page store, in-guest userfaultfd handlers, signals (handled, fatal,
    // stop/continue) during fault waits, all over lazily backed memory.
    let suite = rng.below(4) == 0;
    let store_delay_us = 500 + rng.below(20_000);
    let pages = 500 + rng.below(5500);
    // Every access pattern: each page once (seq, rand, stride) or sampled
    // with repeats (a hot set, zipf), seeded and verified like the others.
    let pattern = match rng.below(6) {
        0 => "seq".to_string(),
        1 | 2 => "rand".to_string(),
        3 => format!("stride:{}", 1 + rng.below(64)),
        4 => format!("hot:{}:{}", 1 + rng.below(30), 60 + rng.below(39)),
        _ => format!("zipf:{}", rng.below(1600)),
    };
    let accesses = pages + rng.below(3 * pages);
    let write = rng.below(4) != 0;
    let shared = vcpus > 1 && rng.below(3) == 0;
    let populate = rng.below(2) == 0;
    let fault_around = [0, 0, 16][usize::try_from(rng.below(3)).unwrap_or(0)];
    let cmdline = if suite {
        format!("test=all store_delay_us={store_delay_us}")
    } else {
        format!(
            "workload=touch pages={pages} pattern={pattern} accesses={accesses} write={} shared={} populate={} seed={}",
            u8::from(write),
            u8::from(shared),
            u8::from(populate),
            rng.below(1 << 20)
        )
    };
    let mut schedule: Vec<(u32, StormEvent)> = (0..4 + rng.below(12))
        .map(|_| {
            let at = u32::try_from(rng.below(1500)).unwrap_or(0);
            let ev = match rng.below(3) {
                0 => StormEvent::Kicks(1 + u32::try_from(rng.below(500)).unwrap_or(0)),
                1 => StormEvent::PauseResume(u32::try_from(rng.below(20)).unwrap_or(0)),
                _ => StormEvent::Hold(u32::try_from(rng.below(50)).unwrap_or(0)),
            };
            (at, ev)
        })
        .collect();
    // Suite runs too: the page store's reads in flight are part of the
    // state, and must complete on the restored or migrated VM.
    if rng.below(3) == 0 {
        schedule.push((
            u32::try_from(rng.below(1000)).unwrap_or(0),
            StormEvent::Snapshot { live: false },
        ));
    }
    if rng.below(4) == 0 {
        let precopy_rounds = u32::try_from(rng.below(4)).unwrap_or(0);
        let cut_after_kib = if rng.below(3) == 0 {
            u32::try_from(64 + rng.below(4096)).unwrap_or(0)
        } else {
            0
        };
        schedule.push((
            u32::try_from(rng.below(1500)).unwrap_or(0),
            StormEvent::Migrate {
                precopy_rounds,
                cut_after_kib,
            },
        ));
    }
    schedule.sort_by_key(|&(at, _)| at);
    // Drawn last, so the plans of earlier seeds keep their other choices.
    let (b, m) = [("anon", "missing"), ("memfd", "missing"), ("memfd", "minor")]
        [usize::try_from(rng.below(3)).unwrap_or(0)];
    // A stream of its own, so the rest of a seed's plan stays as it was.
    let mut hr = Rng(mix64(
        seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x68616e64,
    ));
    let handler_threads = 1 + u32::try_from(hr.below(3)).unwrap_or(0);
    let handler_pinning =
        ["auto", "none", "cpu", "vcpu"][usize::try_from(hr.below(4)).unwrap_or(0)].to_string();
    // Live snapshots on anonymous RAM, half of them (a stream of its own too).
    let mut lr = Rng(mix64(
        seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6c69_7665,
    ));
    for (_, ev) in &mut schedule {
        if let StormEvent::Snapshot { live } = ev {
            *live = b == "anon" && lr.below(2) == 0;
        }
    }
    RunPlan {
        cmdline,
        fault_around,
        handler_threads,
        handler_pinning,
        backing: (b.into(), m.into()),
        schedule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_and_vary() {
        assert_eq!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(7, 3, 2)));
        assert_ne!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(8, 3, 2)));
        assert_ne!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(7, 4, 2)));
        let p = plan(1, 0, 1);
        assert!(!p.cmdline.contains("shared=1"), "one vCPU never shares");
        assert!(p.schedule.windows(2).all(|w| w[0].0 <= w[1].0));
        abi::workload::parse_cmdline(&p.cmdline).unwrap();
    }

    #[test]
    fn live_snapshots_are_drawn_on_anonymous_ram_only() {
        let (mut live, mut stw) = (0, 0);
        for i in 0..400 {
            let p = plan(11, i, 2);
            for (_, ev) in &p.schedule {
                if let StormEvent::Snapshot { live: l } = ev {
                    if *l {
                        assert_eq!(p.backing.0, "anon", "{p:?}");
                        live += 1;
                    } else {
                        stw += 1;
                    }
                }
            }
        }
        assert!(live > 0 && stw > 0, "{live} live, {stw} stop-the-world");
    }
}
