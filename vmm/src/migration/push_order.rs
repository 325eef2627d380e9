//! The order of the source's background push after the switchover: by
//! address (the default), or by recency, the pages the guest wrote most
//! recently first, so that the pages it is likely to touch next arrive
//! before it faults on them (`--push-order recency`).
//!
//! The history comes from the pre-copy dirty log when there were rounds
//! (each page's last round and how many rounds it was written in); without
//! pre-copy the source samples the dirty log for [`RECENCY_SAMPLE`] while
//! the VM still runs, just before the switchover. The ordering itself is one
//! function of the page list, [`push_order`], applied once before the push
//! starts: the push loop does not change.

use std::collections::HashMap;
use std::time::Duration;

/// How the source orders its background push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOrder {
    /// Ascending guest-physical address.
    #[default]
    Address,
    /// The pages written most recently (then most often) first, then the
    /// rest by address.
    Recency,
}

impl std::str::FromStr for PushOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<PushOrder, String> {
        match s {
            "address" => Ok(PushOrder::Address),
            "recency" => Ok(PushOrder::Recency),
            other => Err(format!("push order `{other}`: expected address or recency")),
        }
    }
}

/// How long a migration without pre-copy samples the dirty log for
/// `--push-order recency` before the switchover.
pub const RECENCY_SAMPLE: Duration = Duration::from_millis(100);

/// Per page: the last dirty-log round it was seen in and in how many.
#[derive(Debug, Clone, Default)]
pub struct PageHistory {
    seen: HashMap<u64, (u32, u32)>,
}

impl PageHistory {
    /// Notes the pages of round `round` (rounds count up).
    pub fn note(&mut self, round: u32, pages: &[u64]) {
        for &p in pages {
            let e = self.seen.entry(p).or_insert((round, 0));
            e.0 = e.0.max(round);
            e.1 += 1;
        }
    }

    /// Pages with a history.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no page has one.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// `pages` (guest-physical) in push order: as given (address order) for
/// [`PushOrder::Address`]; for [`PushOrder::Recency`] the pages of the
/// latest rounds first, among them the ones written in more rounds, pages
/// without history last, ties by address. A permutation: every page once.
pub fn push_order(mut pages: Vec<u64>, order: PushOrder, history: &PageHistory) -> Vec<u64> {
    if order == PushOrder::Recency {
        pages.sort_by_key(|p| {
            let (last, count) = history.seen.get(p).copied().unwrap_or((0, 0));
            (std::cmp::Reverse(last), std::cmp::Reverse(count), *p)
        });
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recency_puts_the_latest_and_hottest_first_and_keeps_every_page_once() {
        let mut h = PageHistory::default();
        h.note(1, &[0x1000, 0x5000, 0x9000]);
        h.note(2, &[0x5000, 0x7000]);
        h.note(3, &[0x9000]);
        let pages = vec![0x0, 0x1000, 0x3000, 0x5000, 0x7000, 0x9000];
        assert_eq!(push_order(pages.clone(), PushOrder::Address, &h), pages);
        let r = push_order(pages.clone(), PushOrder::Recency, &h);
        assert_eq!(r, vec![0x9000, 0x5000, 0x7000, 0x1000, 0x0, 0x3000]);
        let mut sorted = r.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, pages);
        assert_eq!("recency".parse(), Ok(PushOrder::Recency));
        assert!("lifo".parse::<PushOrder>().is_err());
    }
}
