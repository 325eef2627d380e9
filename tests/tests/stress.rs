//! A short `vmm stress` session: seeded runs with kick, pause/resume and hold
//! storms over a source that retries and delays; nothing lost, no stall.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use vmm::stress::{run, StressOptions};

#[test]
fn short_stress_session_finds_no_error() {
    let opts = StressOptions {
        seconds: 4.0,
        seed: 42,
        vcpus: 2,
        mem_size: 256 << 20,
        stall_after: Duration::from_secs(30),
    };
    let report = run(opts, &mut |line| eprintln!("{line}")).unwrap();
    eprintln!("{report}");
    assert!(report.ok(), "{report}");
    assert!(report.runs >= 1);
    assert!(report.stage2_faults > 1000 && report.guest_faults > 0, "{report}");
    assert!(report.injected_retries > 0 && report.retries > 0, "{report}");
    // The same seed plans the same first run.
    assert_eq!(
        format!("{:?}", report.plans[0]),
        format!("{:?}", vmm::stress::plan(42, 0, 2))
    );
}
