//! Built-in guest workloads: the command line that selects them, which pages each
//! task touches ([`task_plan`]), the page order, the values written and the checksum.
//!
//! The guest computes the checksum by touching memory; the host (and the guest, as a
//! self-check) computes the same value with [`expected_task_checksum`] without
//! touching anything, so a lost, stale or misplaced page shows as a mismatch.
//!
//! Command line: space-separated `key=value` words.
//! - `workload=hello|touch|triple-fault` (default `hello`)
//! - `pages=N` (touch; default 256), `pattern=seq|rand` (default `seq`),
//!   `write=0|1` (default 1), `seed=N` (default 1).
//! - `populate=0|1` (touch; default 0): 1 = the kernel maps every page of the
//!   task's work region before entering user mode (like `MAP_POPULATE`), so the
//!   user loop takes no guest page fault; on a lazily backed host each first
//!   access is then only a stage-2 fault taken from guest user mode.
//! - `shared=0|1` (touch; default 0): 1 = every task touches all `pages` pages,
//!   each in its own order, and all tasks map the same guest-physical frames
//!   (several vCPUs fault the same pages concurrently). 0 = the pages are split
//!   over the tasks ([`share`]).

use crate::layout::{PAGE_SIZE, USER_WORK_MAX_SIZE};

/// Which workload the user tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkloadKind {
    /// Print a greeting from user mode and exit.
    Hello = 0,
    /// Touch pages of a demand-zero region and checksum them.
    Touch = 1,
    /// The kernel deliberately triple-faults (tests the VMM's crash report).
    TripleFault = 2,
}

impl WorkloadKind {
    /// From the `u32` in [`crate::syscall::TaskArgs`].
    pub fn from_raw(raw: u32) -> Option<WorkloadKind> {
        [
            WorkloadKind::Hello,
            WorkloadKind::Touch,
            WorkloadKind::TripleFault,
        ]
        .into_iter()
        .find(|k| *k as u32 == raw)
    }

    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Hello => "hello",
            WorkloadKind::Touch => "touch",
            WorkloadKind::TripleFault => "triple-fault",
        }
    }
}

/// Order in which a task touches its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Pattern {
    /// Ascending.
    Seq = 0,
    /// A seeded pseudo-random permutation ([`PageOrder`]).
    Rand = 1,
}

/// A parsed command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// The workload.
    pub kind: WorkloadKind,
    /// Pages touched in total (all tasks).
    pub pages: u64,
    /// Page order.
    pub pattern: Pattern,
    /// Write a value to each page, or only read.
    pub write: bool,
    /// Seed of the order and values.
    pub seed: u64,
    /// Map the work region at task creation (no guest faults in the user loop).
    pub populate: bool,
    /// All tasks touch all pages, backed by the same guest-physical frames.
    pub shared: bool,
    /// `test=NAME|all`: run the in-guest test suite instead of the workload
    /// (index into [`TESTS`], `u64::MAX` = all).
    pub test: Option<u64>,
    /// `store_delay_us=N`: how long the VMM's page store takes per page.
    pub store_delay_us: u64,
    /// `tasks=N` (hello only): tasks per vCPU, preemptively scheduled.
    pub tasks: u32,
}

/// The in-guest tests, in the order `test=all` runs them.
pub const TESTS: &[&str] = &[
    "demand-zero",
    "preempt",
    "store",
    "store-retries",
    "signal-handler",
    "signal-in-fault",
    "fatal-in-fault",
    "stop-cont-in-fault",
    "kernel-fault-signal",
    "uffd",
    "uffd-handler-death",
    "uffd-signal",
    "smp",
    "bench-fault",
];

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            kind: WorkloadKind::Hello,
            pages: 256,
            pattern: Pattern::Seq,
            write: true,
            seed: 1,
            populate: false,
            shared: false,
            test: None,
            store_delay_us: 20_000,
            tasks: 1,
        }
    }
}

/// Largest `pages=` value: the touch region's size.
pub const MAX_TOUCH_PAGES: u64 = USER_WORK_MAX_SIZE / PAGE_SIZE;

/// Why a command line was rejected. `Display` gives the message a user reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A word without `=`.
    NotKeyValue(&'a str),
    /// A key this kernel does not know.
    UnknownKey(&'a str),
    /// A value that does not fit its key.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value.
        value: &'a str,
        /// What is accepted.
        expected: &'static str,
    },
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::NotKeyValue(w) => write!(f, "`{w}` is not of the form key=value"),
            CmdlineError::UnknownKey(k) => write!(
                f,
                "unknown key `{k}` (known: workload, pages, pattern, write, seed, populate, shared, test, store_delay_us, tasks)"
            ),
            CmdlineError::BadValue { key, value, expected } => {
                write!(f, "bad value `{value}` for `{key}`: expected {expected}")
            }
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Parses a command line (see the module documentation).
pub fn parse_cmdline(cmdline: &str) -> Result<WorkloadConfig, CmdlineError<'_>> {
    let mut cfg = WorkloadConfig::default();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').ok_or(CmdlineError::NotKeyValue(word))?;
        let bad = |expected| CmdlineError::BadValue { key, value, expected };
        match key {
            "workload" => {
                cfg.kind = match value {
                    "hello" => WorkloadKind::Hello,
                    "touch" => WorkloadKind::Touch,
                    "triple-fault" => WorkloadKind::TripleFault,
                    _ => return Err(bad("hello, touch or triple-fault")),
                }
            }
            "pages" => {
                cfg.pages = parse_u64(value)
                    .filter(|p| (1..=MAX_TOUCH_PAGES).contains(p))
                    .ok_or(bad("a page count from 1 to 16777216"))?
            }
            "pattern" => {
                cfg.pattern = match value {
                    "seq" => Pattern::Seq,
                    "rand" => Pattern::Rand,
                    _ => return Err(bad("seq or rand")),
                }
            }
            "write" => cfg.write = parse_bool(value).ok_or(bad("0 or 1"))?,
            "populate" => cfg.populate = parse_bool(value).ok_or(bad("0 or 1"))?,
            "shared" => cfg.shared = parse_bool(value).ok_or(bad("0 or 1"))?,
            "seed" => cfg.seed = parse_u64(value).ok_or(bad("an unsigned integer"))?,
            "test" => {
                cfg.test = if value == "all" {
                    Some(u64::MAX)
                } else {
                    Some(
                        TESTS
                            .iter()
                            .position(|t| *t == value)
                            .ok_or(bad("all or a test name"))? as u64,
                    )
                }
            }
            "store_delay_us" => {
                cfg.store_delay_us = parse_u64(value)
                    .filter(|d| *d <= 10_000_000)
                    .ok_or(bad("microseconds up to 10000000"))?
            }
            "tasks" => {
                cfg.tasks = parse_u64(value)
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| (1..=8).contains(t))
                    .ok_or(bad("1 to 8"))?
            }
            _ => return Err(CmdlineError::UnknownKey(key)),
        }
    }
    Ok(cfg)
}

/// The share `(first_page, pages)` of `cpu` when `total` pages are split over
/// `cpus` tasks: contiguous, sizes differing by at most one.
pub fn share(total: u64, cpus: u32, cpu: u32) -> (u64, u64) {
    let cpus = u64::from(cpus.max(1));
    let cpu = u64::from(cpu);
    let base = total / cpus;
    let extra = total % cpus;
    let first = cpu * base + cpu.min(extra);
    let len = base + u64::from(cpu < extra);
    (first, len)
}

/// SplitMix64 finaliser: a cheap, well-mixed 64-bit hash.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The value the `touch` workload writes into global page `page`.
pub const fn page_value(seed: u64, page: u64) -> u64 {
    mix64(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// Byte offset inside the page where the value of global page `page` lives:
/// different pages use different words, so a page mapped at the wrong place shows.
pub const fn value_offset(page: u64) -> u64 {
    (page % (PAGE_SIZE / 8)) * 8
}

/// Folds one (page, value read) pair into a checksum.
pub const fn fold(sum: u64, page: u64, value: u64) -> u64 {
    mix64(sum ^ page ^ value.rotate_left(17))
}

/// Visits `0 .. n` in a seeded pseudo-random order without memory: a full-period
/// LCG modulo the next power of two, skipping values `>= n` (cycle walking).
#[derive(Debug, Clone)]
pub struct PageOrder {
    n: u64,
    mask: u64,
    state: u64,
    increment: u64,
    emitted: u64,
    pattern: Pattern,
}

impl PageOrder {
    /// The order of `n` pages for a pattern and seed.
    pub fn new(n: u64, pattern: Pattern, seed: u64) -> PageOrder {
        let mask = n.max(1).next_power_of_two() - 1;
        PageOrder {
            n,
            mask,
            state: mix64(seed) & mask,
            // Odd increment and multiplier = 1 mod 4: full period (Hull-Dobell).
            increment: (mix64(seed.wrapping_add(1)) | 1) & mask.max(1),
            emitted: 0,
            pattern,
        }
    }
}

impl Iterator for PageOrder {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.emitted == self.n {
            return None;
        }
        let out = match self.pattern {
            Pattern::Seq => self.emitted,
            Pattern::Rand => loop {
                let v = self.state;
                self.state = (self
                    .state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(self.increment))
                    & self.mask;
                if v < self.n {
                    break v;
                }
            },
        };
        self.emitted += 1;
        Some(out)
    }
}

/// What one task of the `touch` workload does: global pages
/// `first_page .. first_page + pages`, visited in `PageOrder::new(pages, pattern,
/// order_seed)` (offsets from `first_page`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskPlan {
    /// Global index of the first page.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Seed of the task's page order (values always use the workload's seed).
    pub order_seed: u64,
}

impl TaskPlan {
    /// The task's page order (offsets from `first_page`).
    pub fn order(&self, pattern: Pattern) -> PageOrder {
        PageOrder::new(self.pages, pattern, self.order_seed)
    }

    /// The checksum the task must report: the fold of the values it reads back,
    /// in its page order. Values depend only on the page (not on the task), so
    /// tasks sharing pages read back consistent values.
    pub fn checksum(&self, pattern: Pattern, write: bool, seed: u64) -> u64 {
        self.order(pattern).fold(0, |sum, i| {
            let page = self.first_page + i;
            fold(sum, page, if write { page_value(seed, page) } else { 0 })
        })
    }
}

/// What task `cpu` of `cpus` does under `cfg` (no pages unless `touch`).
/// `shared=0`: its [`share`], ordered by `seed ^ first_page`. `shared=1`: all
/// pages, ordered by a seed mixed with the cpu, so the tasks reach the same
/// pages at different times.
pub fn task_plan(cfg: &WorkloadConfig, cpus: u32, cpu: u32) -> TaskPlan {
    if cfg.kind != WorkloadKind::Touch {
        return TaskPlan {
            first_page: 0,
            pages: 0,
            order_seed: cfg.seed,
        };
    }
    if cfg.shared {
        let order_seed = cfg.seed ^ mix64(u64::from(cpu).wrapping_add(0x5348_4152_4544));
        TaskPlan {
            first_page: 0,
            pages: cfg.pages,
            order_seed,
        }
    } else {
        let (first_page, pages) = share(cfg.pages, cpus, cpu);
        TaskPlan {
            first_page,
            pages,
            order_seed: cfg.seed ^ first_page,
        }
    }
}

/// The checksum task `cpu` of `cpus` must report under `cfg`.
pub fn expected_task_checksum(cfg: &WorkloadConfig, cpus: u32, cpu: u32) -> u64 {
    task_plan(cfg, cpus, cpu).checksum(cfg.pattern, cfg.write, cfg.seed)
}

/// The checksum of a non-shared task with share `(first_page, pages)`; same as
/// [`expected_task_checksum`] for that task.
pub fn expected_checksum(first_page: u64, pages: u64, pattern: Pattern, write: bool, seed: u64) -> u64 {
    TaskPlan {
        first_page,
        pages,
        order_seed: seed ^ first_page,
    }
    .checksum(pattern, write, seed)
}

/// Combines per-task checksums into the VM's total (order independent).
pub fn combine(total: u64, task: u64) -> u64 {
    total.wrapping_add(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_values() {
        assert_eq!(parse_cmdline(""), Ok(WorkloadConfig::default()));
        let c = parse_cmdline("workload=touch pages=0x10 pattern=rand write=0 seed=7").unwrap();
        assert_eq!(c.kind, WorkloadKind::Touch);
        assert_eq!(
            (c.pages, c.pattern, c.write, c.seed),
            (16, Pattern::Rand, false, 7)
        );
    }

    #[test]
    fn rejects_bad_words_with_a_useful_message() {
        assert_eq!(parse_cmdline("oops"), Err(CmdlineError::NotKeyValue("oops")));
        assert_eq!(parse_cmdline("color=red"), Err(CmdlineError::UnknownKey("color")));
        let e = parse_cmdline("pages=0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad value `0` for `pages`: expected a page count from 1 to 16777216"
        );
        assert!(parse_cmdline("pattern=zigzag").is_err());
        assert!(parse_cmdline("write=yes").is_err());
        assert!(parse_cmdline("populate=2").is_err());
        assert!(parse_cmdline("shared=true").is_err());
    }

    #[test]
    fn parses_test_suite_keys() {
        let c = parse_cmdline("test=all store_delay_us=500 tasks=3").unwrap();
        assert_eq!((c.test, c.store_delay_us, c.tasks), (Some(u64::MAX), 500, 3));
        assert_eq!(parse_cmdline("test=store").unwrap().test, Some(2));
        assert!(parse_cmdline("test=nope").is_err());
        assert!(parse_cmdline("tasks=0").is_err());
    }

    #[test]
    fn parses_populate_and_shared() {
        let d = WorkloadConfig::default();
        assert!(!d.populate && !d.shared);
        let c = parse_cmdline("workload=touch populate=1 shared=1").unwrap();
        assert!(c.populate && c.shared);
        let c = parse_cmdline("workload=touch populate=0 shared=0").unwrap();
        assert!(!c.populate && !c.shared);
    }

    fn touch(pages: u64, shared: bool) -> WorkloadConfig {
        WorkloadConfig {
            kind: WorkloadKind::Touch,
            pages,
            pattern: Pattern::Rand,
            shared,
            ..Default::default()
        }
    }

    #[test]
    fn unshared_plan_is_the_share_and_keeps_old_checksums() {
        let cfg = touch(1000, false);
        for cpu in 0..3 {
            let p = task_plan(&cfg, 3, cpu);
            let (first, n) = share(1000, 3, cpu);
            assert_eq!(
                (p.first_page, p.pages, p.order_seed),
                (first, n, cfg.seed ^ first)
            );
            assert_eq!(
                expected_task_checksum(&cfg, 3, cpu),
                expected_checksum(first, n, Pattern::Rand, true, cfg.seed)
            );
        }
        let hello = WorkloadConfig::default();
        assert_eq!(task_plan(&hello, 2, 1).pages, 0);
    }

    #[test]
    fn shared_plans_cover_all_pages_in_different_orders() {
        let cfg = touch(500, true);
        let orders: Vec<Vec<u64>> = (0..4)
            .map(|cpu| {
                let p = task_plan(&cfg, 4, cpu);
                assert_eq!((p.first_page, p.pages), (0, 500));
                p.order(cfg.pattern).collect()
            })
            .collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..500).collect::<Vec<_>>());
        }
        assert_ne!(orders[0], orders[1], "each task has its own order");
        assert_ne!(orders[1], orders[2]);
        // Different orders over the same values: different checksums.
        assert_ne!(
            expected_task_checksum(&cfg, 4, 0),
            expected_task_checksum(&cfg, 4, 1)
        );
        // With write=0 every page reads zero whatever the order.
        let ro = WorkloadConfig { write: false, ..cfg };
        let p = task_plan(&ro, 4, 2);
        assert_eq!(
            expected_task_checksum(&ro, 4, 2),
            p.order(Pattern::Rand).fold(0, |s, i| fold(s, i, 0))
        );
    }

    #[test]
    fn shares_cover_all_pages_once() {
        for total in [1u64, 7, 10, 10000] {
            for cpus in 1..=8 {
                let mut next = 0;
                for cpu in 0..cpus {
                    let (first, len) = share(total, cpus, cpu);
                    assert_eq!(first, next);
                    next += len;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn rand_order_is_a_permutation() {
        for n in [1u64, 2, 3, 100, 1000, 4097] {
            let mut seen = vec![false; n as usize];
            let order: Vec<u64> = PageOrder::new(n, Pattern::Rand, 42).collect();
            assert_eq!(order.len() as u64, n);
            for p in order {
                assert!(!seen[p as usize], "page {p} twice");
                seen[p as usize] = true;
            }
        }
        let seq: Vec<u64> = PageOrder::new(5, Pattern::Seq, 42).collect();
        assert_eq!(seq, [0, 1, 2, 3, 4]);
        let a: Vec<u64> = PageOrder::new(1000, Pattern::Rand, 1).collect();
        let b: Vec<u64> = PageOrder::new(1000, Pattern::Rand, 2).collect();
        assert_ne!(a, b, "the seed changes the order");
        assert_ne!(a, (0..1000).collect::<Vec<_>>(), "rand is not sequential");
    }

    #[test]
    fn checksum_depends_on_every_value() {
        let good = expected_checksum(0, 64, Pattern::Rand, true, 9);
        assert_ne!(good, expected_checksum(0, 64, Pattern::Rand, false, 9));
        assert_ne!(good, expected_checksum(1, 64, Pattern::Rand, true, 9));
        assert_ne!(good, expected_checksum(0, 64, Pattern::Seq, true, 9));
    }
}
