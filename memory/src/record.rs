//! Recording which pages faults made present: a [`FillObserver`] that keeps,
//! while its window is open, every page the retry cores filled for a fault,
//! in fill order, with the time since the recorder started and whether it
//! was the faulting page or a fault-around neighbour. It is fed from the
//! core's resolution path (every page made present for the guest, not a
//! guess from the faults), so a working set recorded this way covers what
//! the next run needs, neighbours included.

use crate::core::FillObserver;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One page made present by a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedPage {
    /// Guest-physical address (page aligned).
    pub gpa: u64,
    /// Microseconds since the recorder started.
    pub t_us: u64,
    /// Filled as a fault-around neighbour, not as the faulting page.
    pub around: bool,
}

#[derive(Debug, Default)]
struct Window {
    open: bool,
    pages: Vec<RecordedPage>,
    ended: Option<Duration>,
}

/// See the module documentation. Attach it to every core of the VM's RAM
/// ([`crate::RetryCore::observe`]); [`FillRecorder::end`] closes the window.
#[derive(Debug)]
pub struct FillRecorder {
    start: Instant,
    page_size: u64,
    limit: usize,
    window: Mutex<Window>,
}

impl FillRecorder {
    /// A recorder with its window open from now, keeping at most `limit`
    /// pages (the guest's RAM pages: a page is filled once unless removed).
    pub fn new(limit: usize) -> FillRecorder {
        FillRecorder {
            start: Instant::now(),
            page_size: crate::page_size() as u64,
            limit,
            window: Mutex::new(Window {
                open: true,
                ..Window::default()
            }),
        }
    }

    /// Closes the window and returns the pages recorded, in fill order
    /// (each page once: its first fill), and how long the window was open.
    /// Later calls return the same pages.
    pub fn end(&self) -> (Vec<RecordedPage>, Duration) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if w.open {
            w.open = false;
            w.ended = Some(self.start.elapsed());
            let mut seen = std::collections::HashSet::with_capacity(w.pages.len());
            w.pages.retain(|p| seen.insert(p.gpa));
        }
        (w.pages.clone(), w.ended.unwrap_or_default())
    }

    /// Whether the window is still open.
    pub fn is_open(&self) -> bool {
        self.window.lock().unwrap_or_else(PoisonError::into_inner).open
    }

    /// Pages recorded so far (duplicates of a removed and refilled page included).
    pub fn len(&self) -> usize {
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pages
            .len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FillObserver for FillRecorder {
    fn filled(&self, gpa: u64, pages: u64, fault: Option<u64>) {
        let t_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if !w.open {
            return;
        }
        for k in 0..pages {
            if w.pages.len() >= self.limit {
                return;
            }
            let a = gpa + k * self.page_size;
            w.pages.push(RecordedPage {
                gpa: a,
                t_us,
                around: fault != Some(a),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_marks_neighbours_dedups_and_closes() {
        let r = FillRecorder::new(100);
        let ps = crate::page_size() as u64;
        r.filled(0x10 * ps, 4, Some(0x11 * ps));
        r.filled(0x3 * ps, 1, Some(0x3 * ps));
        // Removed and refilled: kept once, at its first fill.
        r.filled(0x10 * ps, 1, Some(0x10 * ps));
        let (pages, _) = r.end();
        let got: Vec<(u64, bool)> = pages.iter().map(|p| (p.gpa / ps, p.around)).collect();
        assert_eq!(
            got,
            [
                (0x10, true),
                (0x11, false),
                (0x12, true),
                (0x13, true),
                (0x3, false)
            ]
        );
        r.filled(0x40 * ps, 1, None);
        assert_eq!(r.end().0.len(), 5, "nothing is recorded after the window");
        assert!(!r.is_open());
    }
}
