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
    /// Write every page of the region once, then keep rewriting them in
    /// turn at a steady rate (`rate=` pages/s for `duration_ms=`), then read
    /// them back: a steady dirty rate for pre-copy experiments.
    Dirty = 3,
    /// A FaaS-like function: build `pages` pages of state, wait at a
    /// checkpoint until the VM is a restored copy (PV `CHECKPOINT`), then
    /// run one invocation that touches `invoke` distinct pages of the state
    /// chosen by `pattern` and `seed` ([`faas_invocation`]).
    Faas = 4,
}

impl WorkloadKind {
    /// From the `u32` in [`crate::syscall::TaskArgs`].
    pub fn from_raw(raw: u32) -> Option<WorkloadKind> {
        [
            WorkloadKind::Hello,
            WorkloadKind::Touch,
            WorkloadKind::TripleFault,
            WorkloadKind::Dirty,
            WorkloadKind::Faas,
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
            WorkloadKind::Dirty => "dirty",
            WorkloadKind::Faas => "faas",
        }
    }

    /// Whether the workload's tasks touch pages of the work region (and
    /// report a checksum the host verifies).
    pub const fn touches_pages(self) -> bool {
        matches!(
            self,
            WorkloadKind::Touch | WorkloadKind::Dirty | WorkloadKind::Faas
        )
    }
}

/// Order in which a task touches its pages ([`AccessOrder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Ascending, each page once.
    Seq,
    /// A seeded pseudo-random permutation, each page once ([`PageOrder`]).
    Rand,
    /// Every `K`-th page, then again from the next page, each page once:
    /// `0, K, 2K, .., 1, K+1, ..` (`stride:K`).
    Stride(u64),
    /// A hot set: `hot_pct` percent of the pages (scattered) take
    /// `access_pct` percent of the accesses (`hot:H:A`); pages repeat.
    Hot {
        /// Percent of the pages in the hot set (1-99).
        hot_pct: u32,
        /// Percent of the accesses that go to the hot set (1-99).
        access_pct: u32,
    },
    /// Zipf-like popularity: the page of rank `r` (scattered) is chosen with
    /// probability about proportional to `1/(r+1)^theta` (`zipf:T`, theta in
    /// thousandths, 0-2000); pages repeat. Sampled with integers only, by
    /// octaves of ranks (each octave's weight exact, ranks uniform inside it).
    Zipf {
        /// Theta in thousandths (990 = 0.99).
        theta_milli: u32,
    },
}

impl Pattern {
    /// `(kind, argument)` for [`crate::syscall::TaskArgs`].
    pub const fn encode(self) -> (u32, u64) {
        match self {
            Pattern::Seq => (0, 0),
            Pattern::Rand => (1, 0),
            Pattern::Stride(k) => (2, k),
            Pattern::Hot { hot_pct, access_pct } => (3, ((hot_pct as u64) << 32) | access_pct as u64),
            Pattern::Zipf { theta_milli } => (4, theta_milli as u64),
        }
    }

    /// The pattern of an encoded `(kind, argument)`.
    pub fn decode(kind: u32, arg: u64) -> Option<Pattern> {
        let p = match kind {
            0 => Pattern::Seq,
            1 => Pattern::Rand,
            2 => Pattern::Stride(arg),
            3 => Pattern::Hot {
                hot_pct: u32::try_from(arg >> 32).ok()?,
                access_pct: u32::try_from(arg & 0xffff_ffff).ok()?,
            },
            4 => Pattern::Zipf {
                theta_milli: u32::try_from(arg).ok()?,
            },
            _ => return None,
        };
        p.valid().then_some(p)
    }

    /// Whether the parameters are in range.
    pub fn valid(self) -> bool {
        match self {
            Pattern::Seq | Pattern::Rand => true,
            Pattern::Stride(k) => (1..=MAX_TOUCH_PAGES).contains(&k),
            Pattern::Hot { hot_pct, access_pct } => {
                (1..=99).contains(&hot_pct) && (1..=99).contains(&access_pct)
            }
            Pattern::Zipf { theta_milli } => theta_milli <= 2000,
        }
    }

    /// Whether pages repeat (the pattern samples `accesses` times) rather
    /// than being visited once each.
    pub const fn samples(self) -> bool {
        matches!(self, Pattern::Hot { .. } | Pattern::Zipf { .. })
    }

    /// Parses `seq`, `rand`, `stride:K`, `hot:H:A` or `zipf:T`.
    pub fn parse(s: &str) -> Option<Pattern> {
        let p = match s.split_once(':') {
            None if s == "seq" => Pattern::Seq,
            None if s == "rand" => Pattern::Rand,
            Some(("stride", k)) => Pattern::Stride(parse_u64(k)?),
            Some(("hot", rest)) => {
                let (h, a) = rest.split_once(':')?;
                Pattern::Hot {
                    hot_pct: u32::try_from(parse_u64(h)?).ok()?,
                    access_pct: u32::try_from(parse_u64(a)?).ok()?,
                }
            }
            Some(("zipf", t)) => Pattern::Zipf {
                theta_milli: u32::try_from(parse_u64(t)?).ok()?,
            },
            _ => return None,
        };
        p.valid().then_some(p)
    }
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
    /// `accesses=N` (touch with `hot`/`zipf`): accesses in all (0 = `pages`).
    pub accesses: u64,
    /// `rate=N` (dirty): pages written per second, all tasks together.
    pub rate: u64,
    /// `duration_ms=N` (dirty): how long the rewriting goes on.
    pub duration_ms: u64,
    /// `invoke=N` (faas): distinct state pages the invocation touches, all
    /// tasks together (0 = a quarter of `pages`).
    pub invoke: u64,
    /// `writes=N` (faas with a pattern that visits each page once: seq,
    /// rand, stride): how many of the invocation's distinct pages it
    /// overwrites with its mark, all tasks together (the first it touches);
    /// the rest it only reads. `u64::MAX` (the default) = every page it
    /// touches. Sampling patterns (hot, zipf) always write every page (the
    /// mark is how they tell a page seen before).
    pub writes: u64,
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
            accesses: 0,
            rate: 1000,
            duration_ms: 1000,
            invoke: 0,
            writes: u64::MAX,
        }
    }
}

/// Largest `pages=` value: the touch region's size.
pub const MAX_TOUCH_PAGES: u64 = USER_WORK_MAX_SIZE / PAGE_SIZE;
/// Largest `accesses=` value.
pub const MAX_ACCESSES: u64 = 1 << 28;

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
                "unknown key `{k}` (known: workload, pages, pattern, accesses, write, seed, populate, shared, test, store_delay_us, tasks, rate, duration_ms, invoke, writes)"
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
                    "dirty" => WorkloadKind::Dirty,
                    "faas" => WorkloadKind::Faas,
                    _ => return Err(bad("hello, touch, dirty, faas or triple-fault")),
                }
            }
            "pages" => {
                cfg.pages = parse_u64(value)
                    .filter(|p| (1..=MAX_TOUCH_PAGES).contains(p))
                    .ok_or(bad("a page count from 1 to 16777216"))?
            }
            "pattern" => {
                cfg.pattern = Pattern::parse(value).ok_or(bad(
                    "seq, rand, stride:K (K pages), hot:H:A (H% of pages take A% of accesses, 1-99) or zipf:T (theta in thousandths, 0-2000)",
                ))?
            }
            "accesses" => {
                cfg.accesses = parse_u64(value)
                    .filter(|a| (1..=MAX_ACCESSES).contains(a))
                    .ok_or(bad("an access count from 1 to 268435456"))?
            }
            "rate" => {
                cfg.rate = parse_u64(value)
                    .filter(|r| (1..=10_000_000).contains(r))
                    .ok_or(bad("pages per second from 1 to 10000000"))?
            }
            "invoke" => {
                cfg.invoke = parse_u64(value)
                    .filter(|p| (1..=MAX_TOUCH_PAGES).contains(p))
                    .ok_or(bad("a page count from 1 to 16777216"))?
            }
            "writes" => {
                cfg.writes = parse_u64(value)
                    .filter(|p| *p <= MAX_TOUCH_PAGES)
                    .ok_or(bad("a page count from 0 to 16777216"))?
            }
            "duration_ms" => {
                cfg.duration_ms = parse_u64(value)
                    .filter(|d| *d <= 3_600_000)
                    .ok_or(bad("milliseconds up to 3600000"))?
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
/// LCG modulo the next power of two, skipping values `>= n` (cycle walking);
/// any pattern but `Rand` visits them in ascending order.
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
        let out = if self.pattern == Pattern::Rand {
            loop {
                let v = self.state;
                self.state = (self
                    .state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(self.increment))
                    & self.mask;
                if v < self.n {
                    break v;
                }
            }
        } else {
            self.emitted
        };
        self.emitted += 1;
        Some(out)
    }
}

/// `2^(2^-j)` in Q32 for `j = 1..=32`: the factors of [`exp2_milli`].
const EXP2_FRACTIONS: [u64; 32] = [
    0x16a09e668,
    0x1306fe0a3,
    0x1172b83c8,
    0x10b5586d0,
    0x1059b0d31,
    0x102c9a3e7,
    0x10163daa0,
    0x100b1afa6,
    0x10058c86e,
    0x1002c605e,
    0x100162f39,
    0x1000b175f,
    0x100058ba0,
    0x10002c5cc,
    0x1000162e5,
    0x10000b172,
    0x1000058b9,
    0x100002c5d,
    0x10000162e,
    0x100000b17,
    0x10000058c,
    0x1000002c6,
    0x100000163,
    0x1000000b1,
    0x100000059,
    0x10000002c,
    0x100000016,
    0x10000000b,
    0x100000006,
    0x100000003,
    0x100000001,
    0x100000001,
];

/// `2^(x / 1000)` in Q32 fixed point (`x` in thousandths, |x| <= 30000),
/// with integers only (the guest has no floating point).
pub fn exp2_milli(x: i64) -> u64 {
    let q = x.div_euclid(1000);
    let f = u64::try_from(x.rem_euclid(1000)).unwrap_or(0);
    // The fraction in Q32, then the product of the factors of its bits.
    let frac = (f << 32) / 1000;
    let mut m: u64 = 1 << 32;
    for (j, factor) in EXP2_FRACTIONS.iter().enumerate() {
        if frac & (1 << (31 - j)) != 0 {
            // Below 2^34: m < 2 and the factor < 2, both in Q32.
            m = u64::try_from((u128::from(m) * u128::from(*factor)) >> 32).unwrap_or(u64::MAX);
        }
    }
    if q >= 0 {
        m << q.min(30)
    } else {
        m >> (-q).min(63)
    }
}

/// A prime above [`MAX_TOUCH_PAGES`]: multiplying ranks by it modulo the page
/// count is a bijection, which scatters a hot set over the pages.
const SCATTER_PRIME: u64 = 16_777_259;
const _: () = assert!(SCATTER_PRIME > MAX_TOUCH_PAGES);

/// Octaves of ranks: enough for [`MAX_TOUCH_PAGES`].
const OCTAVES: usize = 26;

/// How a sampling pattern picks a rank.
#[derive(Debug, Clone)]
enum Sample {
    Hot { hot: u64, access_pct: u64 },
    Zipf { cum: [u64; OCTAVES], octaves: usize },
}

/// The page offsets (from the task's first page) a task visits, in order:
/// each page once for `seq`, `rand` and `stride`, `accesses` samples for
/// `hot` and `zipf`. The same sequence on the guest (which touches memory)
/// and on the host (which computes the checksum).
#[derive(Debug, Clone)]
pub struct AccessOrder {
    inner: Inner,
}

#[derive(Debug, Clone)]
// The guest has no allocator: the zipf table lives inline (one order per task).
#[allow(clippy::large_enum_variant)]
enum Inner {
    Perm(PageOrder),
    Stride {
        n: u64,
        k: u64,
        phase: u64,
        next: u64,
    },
    Sample {
        n: u64,
        left: u64,
        i: u64,
        seed: u64,
        mul: u64,
        off: u64,
        how: Sample,
    },
}

impl AccessOrder {
    /// The order of `n` pages under `pattern`; `accesses` samples for a
    /// sampling pattern.
    pub fn new(n: u64, pattern: Pattern, seed: u64, accesses: u64) -> AccessOrder {
        let inner = match pattern {
            Pattern::Seq | Pattern::Rand => Inner::Perm(PageOrder::new(n, pattern, seed)),
            Pattern::Stride(k) => Inner::Stride {
                n,
                k: k.max(1),
                phase: 0,
                next: 0,
            },
            Pattern::Hot { hot_pct, access_pct } => Inner::Sample {
                n,
                left: if n == 0 { 0 } else { accesses },
                i: 0,
                seed,
                mul: SCATTER_PRIME % n.max(1),
                off: mix64(seed ^ 0x5343_4154) % n.max(1),
                how: Sample::Hot {
                    hot: (n * u64::from(hot_pct) / 100).max(1),
                    access_pct: u64::from(access_pct),
                },
            },
            Pattern::Zipf { theta_milli } => {
                // Octave b holds ranks [2^b - 1, 2^(b+1) - 1); its weight is
                // about 2^(b (1 - theta)) scaled to the part of it inside n.
                let mut cum = [0u64; OCTAVES];
                let mut total = 0u64;
                let mut octaves = 0;
                for (b, c) in cum.iter_mut().enumerate() {
                    let start = (1u64 << b) - 1;
                    if start >= n {
                        break;
                    }
                    let size = (1u64 << b).min(n - start);
                    let e = exp2_milli(b as i64 * (1000 - i64::from(theta_milli)));
                    let w = u64::try_from((u128::from(e) * u128::from(size)) >> b).unwrap_or(u64::MAX >> 8);
                    total += w.max(1);
                    *c = total;
                    octaves = b + 1;
                }
                Inner::Sample {
                    n,
                    left: if n == 0 { 0 } else { accesses },
                    i: 0,
                    seed,
                    mul: SCATTER_PRIME % n.max(1),
                    off: mix64(seed ^ 0x5343_4154) % n.max(1),
                    how: Sample::Zipf { cum, octaves },
                }
            }
        };
        AccessOrder { inner }
    }
}

impl Iterator for AccessOrder {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match &mut self.inner {
            Inner::Perm(o) => o.next(),
            Inner::Stride { n, k, phase, next } => {
                while *next >= *n {
                    *phase += 1;
                    if *phase >= *k || *phase >= *n {
                        return None;
                    }
                    *next = *phase;
                }
                let out = *next;
                *next += *k;
                Some(out)
            }
            Inner::Sample {
                n,
                left,
                i,
                seed,
                mul,
                off,
                how,
            } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                *i += 1;
                let h = mix64(*seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let h2 = mix64(h ^ 0x5241_4e4b);
                let rank = match how {
                    Sample::Hot { hot, access_pct } => {
                        if h % 100 < *access_pct || *hot >= *n {
                            h2 % *hot
                        } else {
                            *hot + h2 % (*n - *hot)
                        }
                    }
                    Sample::Zipf { cum, octaves } => {
                        let total = cum[*octaves - 1];
                        let u = h % total;
                        let b = cum[..*octaves]
                            .iter()
                            .position(|&c| u < c)
                            .unwrap_or(*octaves - 1);
                        let start = (1u64 << b) - 1;
                        let size = (1u64 << b).min(*n - start);
                        start + h2 % size
                    }
                };
                Some((rank * *mul + *off) % *n)
            }
        }
    }
}

/// What one task of a page-touching workload does: global pages
/// `first_page .. first_page + pages`, visited in `AccessOrder::new(pages,
/// pattern, order_seed, accesses)` (offsets from `first_page`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskPlan {
    /// Global index of the first page.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Seed of the task's page order (values always use the workload's seed).
    pub order_seed: u64,
    /// Accesses of a sampling pattern (`hot`, `zipf`).
    pub accesses: u64,
}

impl TaskPlan {
    /// The task's page order (offsets from `first_page`).
    pub fn order(&self, pattern: Pattern) -> AccessOrder {
        AccessOrder::new(self.pages, pattern, self.order_seed, self.accesses)
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

    /// The number of distinct pages the task touches (host side: W of a
    /// working set).
    #[cfg(any(feature = "host", test))]
    pub fn distinct_pages(&self, pattern: Pattern) -> u64 {
        let mut seen = vec![false; usize::try_from(self.pages).unwrap_or(0)];
        let mut n = 0;
        for i in self.order(pattern) {
            if let Some(s) = seen.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
                if !*s {
                    *s = true;
                    n += 1;
                }
            }
        }
        n
    }
}

/// What task `cpu` of `cpus` does under `cfg` (no pages unless `touch`).
/// `shared=0`: its [`share`], ordered by `seed ^ first_page`. `shared=1`: all
/// pages, ordered by a seed mixed with the cpu, so the tasks reach the same
/// pages at different times.
pub fn task_plan(cfg: &WorkloadConfig, cpus: u32, cpu: u32) -> TaskPlan {
    if !cfg.kind.touches_pages() {
        return TaskPlan {
            first_page: 0,
            pages: 0,
            order_seed: cfg.seed,
            accesses: 0,
        };
    }
    let accesses = match cfg.kind {
        // faas: the invocation's distinct pages.
        WorkloadKind::Faas if cfg.invoke == 0 => (cfg.pages / 4).max(1),
        WorkloadKind::Faas => cfg.invoke.min(cfg.pages),
        _ if cfg.accesses == 0 => cfg.pages,
        _ => cfg.accesses,
    };
    if cfg.shared {
        let order_seed = cfg.seed ^ mix64(u64::from(cpu).wrapping_add(0x5348_4152_4544));
        TaskPlan {
            first_page: 0,
            pages: cfg.pages,
            order_seed,
            accesses,
        }
    } else {
        let (first_page, pages) = share(cfg.pages, cpus, cpu);
        TaskPlan {
            first_page,
            pages,
            order_seed: cfg.seed ^ first_page,
            accesses: share(accesses, cpus, cpu).1,
        }
    }
}

/// The checksum task `cpu` of `cpus` must report under `cfg`.
pub fn expected_task_checksum(cfg: &WorkloadConfig, cpus: u32, cpu: u32) -> u64 {
    task_checksum(
        cfg.kind,
        &task_plan(cfg, cpus, cpu),
        cfg.pattern,
        cfg.write,
        cfg.seed,
    )
}

/// The checksum of a task of `kind` with `plan`: `touch` folds its access
/// order; `dirty` always writes and reads every page back in ascending order.
pub fn task_checksum(kind: WorkloadKind, plan: &TaskPlan, pattern: Pattern, write: bool, seed: u64) -> u64 {
    match kind {
        WorkloadKind::Dirty => plan.checksum(Pattern::Seq, true, seed),
        WorkloadKind::Faas => faas_checksum(plan, pattern, seed),
        _ => plan.checksum(pattern, write, seed),
    }
}

/// The value a `faas` invocation writes over the state value of a page it
/// touches (which marks the page as touched).
pub const fn invoked_value(seed: u64, page: u64) -> u64 {
    page_value(seed ^ 0x4641_4153, page) | 2
}

/// The order a `faas` invocation draws its pages in (offsets from the
/// task's first page): the pattern's order, sampling patterns sampled for
/// as long as it takes to meet `plan.accesses` distinct pages (at most
/// [`MAX_ACCESSES`] draws).
pub fn faas_order(plan: &TaskPlan, pattern: Pattern) -> AccessOrder {
    let draws = if pattern.samples() {
        MAX_ACCESSES
    } else {
        plan.pages
    };
    AccessOrder::new(plan.pages, pattern, plan.order_seed, draws)
}

/// The distinct global pages a `faas` invocation touches, in first-touch
/// order (host side: the working set W).
#[cfg(any(feature = "host", test))]
pub fn faas_invocation(plan: &TaskPlan, pattern: Pattern) -> Vec<u64> {
    let mut seen = vec![false; usize::try_from(plan.pages).unwrap_or(0)];
    let mut out = Vec::new();
    for i in faas_order(plan, pattern) {
        if out.len() as u64 >= plan.accesses {
            break;
        }
        if let Some(s) = seen.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
            if !*s {
                *s = true;
                out.push(plan.first_page + i);
            }
        }
    }
    out
}

/// The checksum of a `faas` task: the fold of the state values it read,
/// in first-touch order. The guest cannot compute it without memory (it
/// needs the set of pages seen): only the host checks it.
#[cfg(any(feature = "host", test))]
fn faas_checksum(plan: &TaskPlan, pattern: Pattern, seed: u64) -> u64 {
    faas_invocation(plan, pattern)
        .into_iter()
        .fold(0, |sum, page| fold(sum, page, page_value(seed, page)))
}

#[cfg(not(any(feature = "host", test)))]
fn faas_checksum(_: &TaskPlan, _: Pattern, _: u64) -> u64 {
    0
}

/// The checksum of a non-shared task with share `(first_page, pages)`; same as
/// [`expected_task_checksum`] for that task.
pub fn expected_checksum(first_page: u64, pages: u64, pattern: Pattern, write: bool, seed: u64) -> u64 {
    TaskPlan {
        first_page,
        pages,
        order_seed: seed ^ first_page,
        accesses: pages,
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

    #[test]
    fn exp2_in_fixed_point_is_accurate() {
        for (x, want) in [
            (0i64, 1.0f64),
            (1000, 2.0),
            (500, 2f64.sqrt()),
            (-1000, 0.5),
            (2500, 2f64.powf(2.5)),
            (-12345, 2f64.powf(-12.345)),
        ] {
            let got = exp2_milli(x) as f64 / (1u64 << 32) as f64;
            assert!(
                (got / want - 1.0).abs() < 1e-6,
                "2^({x}/1000) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn patterns_parse_encode_and_refuse_bad_parameters() {
        for (text, p) in [
            ("seq", Pattern::Seq),
            ("rand", Pattern::Rand),
            ("stride:7", Pattern::Stride(7)),
            (
                "hot:10:90",
                Pattern::Hot {
                    hot_pct: 10,
                    access_pct: 90,
                },
            ),
            ("zipf:990", Pattern::Zipf { theta_milli: 990 }),
        ] {
            assert_eq!(Pattern::parse(text), Some(p), "{text}");
            let (k, a) = p.encode();
            assert_eq!(Pattern::decode(k, a), Some(p));
        }
        for bad in [
            "",
            "stride:0",
            "hot:0:50",
            "hot:50:100",
            "hot:5",
            "zipf:2001",
            "zipf:x",
            "random",
        ] {
            assert_eq!(Pattern::parse(bad), None, "{bad}");
        }
        assert_eq!(Pattern::decode(9, 0), None);
        let c = parse_cmdline("workload=touch pages=100 pattern=hot:20:80 accesses=5000").unwrap();
        assert_eq!(
            (c.pattern, c.accesses),
            (
                Pattern::Hot {
                    hot_pct: 20,
                    access_pct: 80
                },
                5000
            )
        );
        assert!(parse_cmdline("workload=touch pattern=zipf:3000").is_err());
        let f = parse_cmdline("workload=faas pages=64 invoke=64 writes=8").unwrap();
        assert_eq!((f.kind, f.invoke, f.writes), (WorkloadKind::Faas, 64, 8));
        assert_eq!(parse_cmdline("workload=faas").unwrap().writes, u64::MAX);
        assert!(parse_cmdline("writes=99999999").is_err());
        let d = parse_cmdline("workload=dirty pages=64 rate=500 duration_ms=200").unwrap();
        assert_eq!((d.kind, d.rate, d.duration_ms), (WorkloadKind::Dirty, 500, 200));
    }

    #[test]
    fn stride_visits_every_page_once() {
        for (n, k) in [(10u64, 3u64), (64, 8), (7, 1), (5, 9), (1000, 37)] {
            let order: Vec<u64> = AccessOrder::new(n, Pattern::Stride(k), 1, 0).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n {n} k {k}");
            assert_eq!(order[1], if k < n { k } else { 1 }, "n {n} k {k}");
        }
    }

    #[test]
    fn hot_sets_take_their_share_of_accesses() {
        let n = 10_000;
        let order: Vec<u64> = AccessOrder::new(
            n,
            Pattern::Hot {
                hot_pct: 10,
                access_pct: 90,
            },
            5,
            100_000,
        )
        .collect();
        assert_eq!(order.len(), 100_000);
        let mut count = vec![0u64; n as usize];
        for &p in &order {
            count[p as usize] += 1;
        }
        let mut sorted = count.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let hot: u64 = sorted[..1000].iter().sum();
        let share = hot as f64 / 100_000.0;
        assert!((0.88..0.92).contains(&share), "the top 10% took {share}");
        // Scattered: the hot pages are not the first thousand.
        let first: u64 = count[..1000].iter().sum();
        assert!(first < 50_000, "{first}");
        // Deterministic.
        let again: Vec<u64> = AccessOrder::new(
            n,
            Pattern::Hot {
                hot_pct: 10,
                access_pct: 90,
            },
            5,
            100_000,
        )
        .collect();
        assert_eq!(order, again);
    }

    #[test]
    fn zipf_is_skewed_by_theta() {
        let n = 4096;
        let top_share = |theta| {
            let mut count = vec![0u64; n as usize];
            for p in AccessOrder::new(n, Pattern::Zipf { theta_milli: theta }, 3, 200_000) {
                count[p as usize] += 1;
            }
            count.sort_unstable_by(|a, b| b.cmp(a));
            count[..41].iter().sum::<u64>() as f64 / 200_000.0
        };
        let (uniform, skewed, steep) = (top_share(0), top_share(990), top_share(1500));
        assert!(uniform < 0.02, "theta 0 top 1%: {uniform}");
        assert!(skewed > 0.3 && skewed < steep, "theta 0.99 {skewed}, 1.5 {steep}");
        assert!(steep > 0.7, "{steep}");
    }

    #[test]
    fn sampling_plans_count_distinct_pages_and_check_the_same_on_both_sides() {
        let cfg = parse_cmdline("workload=touch pages=2000 pattern=zipf:990 accesses=3000 seed=4").unwrap();
        let plan = task_plan(&cfg, 2, 1);
        assert_eq!((plan.pages, plan.accesses), (1000, 1500));
        let w = plan.distinct_pages(cfg.pattern);
        assert!(w > 10 && w < 1000, "{w}");
        assert_eq!(plan.order(cfg.pattern).count(), 1500);
        assert_eq!(
            plan.checksum(cfg.pattern, true, 4),
            plan.checksum(cfg.pattern, true, 4)
        );
        // seq and rand keep today's plans (one access per page).
        let t = parse_cmdline("workload=touch pages=100 pattern=rand").unwrap();
        assert_eq!(task_plan(&t, 1, 0).distinct_pages(t.pattern), 100);
    }
}
