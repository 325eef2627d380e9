//! The slow page store (see [`abi::pv::store`]): the guest asks for a page and
//! the device answers *later*. A request is accepted during the `out` (status
//! OK), queued, and a worker thread fills the guest frame once the request's
//! delay has passed, then writes the request id into the guest's completion
//! slot. The guest notices on its timer tick. Reads of a page the guest holds
//! (`HOLD`) wait, unanswered, until it releases the page (`RELEASE`), which
//! answers them at once: tests wait for states, not for the delay. Also
//! receives the guest kernel's fault statistics (`STATS`).
//!
//! Nothing here trusts the guest: bad addresses and slots are rejected (and
//! logged once through the event sink), never panic.

use crate::GuestRam;
use crate::{DeviceEvent, DeviceEventSink};
use abi::layout::PAGE_SIZE;
use abi::pv::store::{self, GuestStats};
use abi::pv::{status, PvRequest};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{Bytes, GuestAddress};

/// The latest statistics the guest sent (shared with the VMM's outcome).
pub type GuestStatsCell = Arc<Mutex<Option<GuestStats>>>;

struct Read {
    due: Instant,
    index: u64,
    dest: u64,
    slot: u64,
    id: u64,
}

/// Held pages and the reads waiting for their release.
#[derive(Default)]
struct Held {
    pages: Vec<u64>,
    reads: Vec<Read>,
}

/// The page-store device.
pub struct PageStore {
    mem: GuestRam,
    sink: DeviceEventSink,
    completion: Arc<Mutex<Option<u64>>>,
    tx: Sender<Read>,
    stats: GuestStatsCell,
    held: Held,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore").finish_non_exhaustive()
    }
}

impl PageStore {
    /// A store over guest memory `mem`; statistics land in `stats`. Starts the
    /// worker thread, which ends when the device is dropped.
    pub fn new(mem: GuestRam, sink: DeviceEventSink, stats: GuestStatsCell) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let completion = Arc::new(Mutex::new(None));
        let (m, c) = (mem.clone(), completion.clone());
        std::thread::Builder::new()
            .name("page-store".into())
            .spawn(move || worker(&m, &c, &rx))?;
        Ok(PageStore {
            mem,
            sink,
            completion,
            tx,
            stats,
            held: Held::default(),
        })
    }

    fn handle(&mut self, gpa: u64) -> u32 {
        let Ok(req) = self.mem.read_obj::<PvRequest>(GuestAddress(gpa)) else {
            (self.sink)(DeviceEvent::BadRequest(format!(
                "page-store request at {gpa:#x} outside guest memory"
            )));
            return status::REJECTED;
        };
        let a = req.args;
        let ok = match req.kind {
            store::INIT => {
                let area = (store::SLOTS * 8) as u64;
                let fits = a[0] % 8 == 0
                    && self
                        .mem
                        .read_obj::<u64>(GuestAddress(a[0].wrapping_add(area - 8)))
                        .is_ok();
                if fits {
                    if let Ok(mut c) = self.completion.lock() {
                        *c = Some(a[0]);
                    }
                }
                fits
            }
            store::READ => {
                let valid = a[0] < store::PAGES
                    && a[1] % PAGE_SIZE == 0
                    && self
                        .mem
                        .read_obj::<u64>(GuestAddress(a[1].wrapping_add(PAGE_SIZE - 8)))
                        .is_ok()
                    && usize::try_from(a[2]).is_ok_and(|slot| slot < store::SLOTS)
                    && a[3] != 0;
                let delay = Duration::from_micros(a[4].min(10_000_000));
                let read = Read {
                    due: Instant::now() + delay,
                    index: a[0],
                    dest: a[1],
                    slot: a[2],
                    id: a[3],
                };
                if !valid {
                    false
                } else if self.held.pages.contains(&read.index) {
                    // Bounded: one read per slot is outstanding at a time.
                    self.held.reads.retain(|r| r.slot != read.slot);
                    self.held.reads.push(read);
                    true
                } else {
                    self.tx.send(read).is_ok()
                }
            }
            store::HOLD => {
                let fits = a[0] < store::PAGES
                    && (self.held.pages.contains(&a[0]) || self.held.pages.len() < store::MAX_HELD_PAGES);
                if fits && !self.held.pages.contains(&a[0]) {
                    self.held.pages.push(a[0]);
                }
                fits
            }
            store::RELEASE => {
                self.held.pages.retain(|&p| p != a[0]);
                let now = Instant::now();
                let (go, keep): (Vec<Read>, Vec<Read>) = std::mem::take(&mut self.held.reads)
                    .into_iter()
                    .partition(|r| r.index == a[0]);
                self.held.reads = keep;
                go.into_iter()
                    .all(|r| self.tx.send(Read { due: now, ..r }).is_ok())
            }
            store::STATS => match self.mem.read_obj::<GuestStats>(GuestAddress(a[0])) {
                Ok(s) => {
                    if let Ok(mut cell) = self.stats.lock() {
                        *cell = Some(s);
                    }
                    true
                }
                Err(_) => false,
            },
            _ => false,
        };
        let st = if ok { status::OK } else { status::REJECTED };
        if !ok {
            (self.sink)(DeviceEvent::BadRequest(format!(
                "page-store request kind {:#x} rejected",
                req.kind
            )));
        }
        let _ = self.mem.write_obj(st, GuestAddress(gpa.wrapping_add(4)));
        st
    }
}

/// Serves reads in deadline order (delays may differ per request).
fn worker(mem: &GuestRam, completion: &Mutex<Option<u64>>, rx: &Receiver<Read>) {
    let mut queue: Vec<Read> = Vec::new();
    loop {
        let now = Instant::now();
        // Serve everything due.
        queue.sort_by_key(|r| std::cmp::Reverse(r.due));
        while queue.last().is_some_and(|r| r.due <= now) {
            if let Some(r) = queue.pop() {
                serve(mem, completion, &r);
            }
        }
        let wait = queue.last().map(|r| r.due.saturating_duration_since(now));
        let next = match wait {
            Some(w) => rx.recv_timeout(w),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(r) => queue.push(r),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn serve(mem: &GuestRam, completion: &Mutex<Option<u64>>, r: &Read) {
    let mut page = [0u8; 4096];
    const _: () = assert!(PAGE_SIZE == 4096);
    for (k, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&store::word(r.index, k as u64).to_le_bytes());
    }
    if mem.write_slice(&page, GuestAddress(r.dest)).is_err() {
        return;
    }
    let Some(area) = completion.lock().ok().and_then(|c| *c) else {
        return;
    };
    // The data is written before the id: x86 stores are not reordered, and the
    // fence keeps the compiler from doing it.
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    let _ = mem.write_obj(r.id, GuestAddress(area + r.slot * 8));
}

impl MutDevicePio for PageStore {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            (self.sink)(DeviceEvent::BadRequest(
                "page-store doorbell needs a 32-bit out".into(),
            ));
            return;
        };
        self.handle(u64::from(u32::from_le_bytes(raw)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_is_answered_later_with_the_page_and_the_id() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let stats: GuestStatsCell = Arc::default();
        let mut dev = PageStore::new(mem.clone(), Arc::new(|_| {}), stats.clone()).unwrap();
        let init = PvRequest {
            kind: store::INIT,
            status: 0,
            args: [0x1000, 0, 0, 0, 0, 0],
        };
        mem.write_obj(init, GuestAddress(0x100)).unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        let read = PvRequest {
            kind: store::READ,
            status: 0,
            args: [7, 0x3000, 5, 42, 20_000, 0],
        };
        mem.write_obj(read, GuestAddress(0x100)).unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        assert_eq!(
            mem.read_obj::<PvRequest>(GuestAddress(0x100)).unwrap().status,
            status::OK
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1000 + 5 * 8)).unwrap(),
            0,
            "not answered yet"
        );
        let start = Instant::now();
        while mem.read_obj::<u64>(GuestAddress(0x1000 + 5 * 8)).unwrap() != 42 {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(start.elapsed() >= Duration::from_millis(10));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x3000 + 8 * 3)).unwrap(),
            store::word(7, 3)
        );
        // Hostile: bad slot, unaligned frame.
        let bad = PvRequest {
            kind: store::READ,
            status: 0,
            args: [7, 0x3001, 99, 1, 0, 0],
        };
        mem.write_obj(bad, GuestAddress(0x100)).unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        assert_eq!(
            mem.read_obj::<PvRequest>(GuestAddress(0x100)).unwrap().status,
            status::REJECTED
        );
        let st = PvRequest {
            kind: store::STATS,
            status: 0,
            args: [0x5000, 0, 0, 0, 0, 0],
        };
        mem.write_obj(
            GuestStats {
                faults: 3,
                ..Default::default()
            },
            GuestAddress(0x5000),
        )
        .unwrap();
        mem.write_obj(st, GuestAddress(0x100)).unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        assert_eq!(stats.lock().unwrap().unwrap().faults, 3);
    }

    fn send(dev: &mut PageStore, mem: &GuestRam, kind: u32, args: [u64; 6]) -> u32 {
        mem.write_obj(
            PvRequest {
                kind,
                status: 0,
                args,
            },
            GuestAddress(0x100),
        )
        .unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        mem.read_obj::<PvRequest>(GuestAddress(0x100)).unwrap().status
    }

    fn wait_for_id(mem: &GuestRam, slot: u64, id: u64) {
        let start = Instant::now();
        while mem.read_obj::<u64>(GuestAddress(0x1000 + slot * 8)).unwrap() != id {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "slot {slot} never got id {id}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn held_reads_wait_for_the_release_and_others_do_not() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut dev = PageStore::new(mem.clone(), Arc::new(|_| {}), Arc::default()).unwrap();
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [0x1000, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(send(&mut dev, &mem, store::HOLD, [9, 0, 0, 0, 0, 0]), status::OK);
        assert_eq!(
            send(&mut dev, &mem, store::READ, [9, 0x3000, 1, 7, 0, 0]),
            status::OK
        );
        // Another page is not held: answered after its (zero) delay.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [4, 0x4000, 2, 8, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 2, 8);
        // The worker served page 4 after the held read was queued: had page 9
        // gone to the worker, it would be answered by now (same zero delay,
        // sent first). Check once more after the worker had every chance.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000 + 8)).unwrap(), 0, "held");
        assert_eq!(
            send(&mut dev, &mem, store::RELEASE, [9, 0, 0, 0, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 1, 7);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x3000 + 8 * 511)).unwrap(),
            store::word(9, 511)
        );
        // Released: later reads of it are answered again.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [9, 0x5000, 3, 9, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 3, 9);
        // Hostile: out-of-range page, too many held pages.
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [store::PAGES, 0, 0, 0, 0, 0]),
            status::REJECTED
        );
        for p in 0..store::MAX_HELD_PAGES as u64 {
            assert_eq!(send(&mut dev, &mem, store::HOLD, [p, 0, 0, 0, 0, 0]), status::OK);
        }
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [100, 0, 0, 0, 0, 0]),
            status::REJECTED
        );
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [0, 0, 0, 0, 0, 0]),
            status::OK,
            "already held"
        );
    }
}
