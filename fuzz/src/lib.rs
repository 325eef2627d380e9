//! What the fuzz targets share: small guest memories, devices with a no-op
//! event sink, and the restore of the device states a snapshot or a
//! migration carries (the parts of a restore that need no KVM).

use abi::layout::ram_ranges;
use devices::page_store::{GuestStatsCell, PageStore, PageStoreArgs, PageStoreHandle, PageStoreState};
use devices::serial::{SerialConsole, SerialConsoleArgs, SerialConsoleState, SerialOutput};
use devices::{DeviceEventSink, GuestRam};
use persist::Persist;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::GuestAddress;

/// Guest memory of `ranges` `(gpa, len)`.
pub fn ram(ranges: &[(u64, u64)]) -> GuestRam {
    let ranges: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(gpa, len)| (GuestAddress(gpa), usize::try_from(len).expect("64-bit host")))
        .collect();
    GuestRam::from_ranges(&ranges).expect("guest memory of valid ranges")
}

/// The guest RAM of a VM with `mem_size` bytes, laid out as the VMM lays
/// it out (`abi::layout::ram_ranges`). Mapped without reserve: untouched, it
/// costs only address space.
pub fn vm_ram(mem_size: u64) -> GuestRam {
    ram(&ram_ranges(mem_size))
}

/// A sink that drops the devices' events.
pub fn no_events() -> DeviceEventSink {
    Arc::new(|_| {})
}

/// Restores a page store from `state` over `mem`, as a restored VM does
/// (paused or not). A state that restores must save again once the device
/// is paused, and that saved state must restore as well.
pub fn restore_page_store(mem: &GuestRam, state: &PageStoreState, start_paused: bool) -> Option<PageStore> {
    let args = PageStoreArgs {
        mem: mem.clone(),
        sink: no_events(),
        stats: GuestStatsCell::default(),
        start_paused,
        // Fuzzing runs no filter: the fuzzer's own threads would need rules.
        seccomp: sandbox::SeccompMode::Off,
    };
    let dev = PageStore::restore(args, state).ok()?;
    let saved = save_page_store(&dev);
    let again = PageStoreArgs {
        mem: mem.clone(),
        sink: no_events(),
        stats: GuestStatsCell::default(),
        start_paused: true,
        seccomp: sandbox::SeccompMode::Off,
    };
    if let Err(e) = PageStore::restore(again, &saved) {
        panic!("a page-store state saved from a restored device does not restore: {e}\nsaved: {saved:?}\nfrom: {state:?}");
    }
    Some(dev)
}

/// Pauses `dev`, saves it and resumes it.
pub fn save_page_store(dev: &PageStore) -> PageStoreState {
    let handle: PageStoreHandle = dev.handle();
    // The worker writes plain anonymous memory: it cannot block for long.
    handle
        .pause(Duration::from_secs(10))
        .expect("the page store pauses");
    let saved = dev.save().expect("a paused page store saves");
    handle.resume();
    saved
}

/// Restores a serial console from `state`, output captured.
pub fn restore_serial(state: &SerialConsoleState) -> Option<SerialConsole> {
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let args = SerialConsoleArgs {
        irq,
        out: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
        first_output: Arc::default(),
    };
    SerialConsole::restore(args, state).ok()
}

/// A real snapshot of the bundled guest (`fuzz/fixtures/`, made as
/// `docs/fuzzing.md` says): its manifest, state and page hashes as written,
/// and its memory file's data extents, concatenated in extent order (the
/// rest of the file is holes, which nothing reads).
pub struct SnapFixture {
    /// `manifest.json`.
    pub manifest: &'static [u8],
    /// `state.json`.
    pub state: &'static [u8],
    /// `memory.hashes`.
    pub hashes: &'static [u8],
    /// The data of every extent, in extent order.
    pub data: &'static [u8],
    /// The snapshot key it was written with, if any.
    pub key: Option<vmm::snapshot::SnapshotKey>,
}

/// The plain snapshot (no key).
pub fn plain_snapshot() -> SnapFixture {
    SnapFixture {
        manifest: include_bytes!("../fixtures/snapshot/manifest.json"),
        state: include_bytes!("../fixtures/snapshot/state.json"),
        hashes: include_bytes!("../fixtures/snapshot/memory.hashes"),
        data: include_bytes!("../fixtures/snapshot/memory.data"),
        key: None,
    }
}

/// The snapshot written with `--snapshot-key fixtures/snapshot-keyed/key`.
pub fn keyed_snapshot() -> SnapFixture {
    let key: [u8; 32] = include_bytes!("../fixtures/snapshot-keyed/key")
        .as_slice()
        .try_into()
        .expect("a 32-byte key file");
    SnapFixture {
        manifest: include_bytes!("../fixtures/snapshot-keyed/manifest.json"),
        state: include_bytes!("../fixtures/snapshot-keyed/state.json"),
        hashes: include_bytes!("../fixtures/snapshot-keyed/memory.hashes"),
        data: include_bytes!("../fixtures/snapshot-keyed/memory.data"),
        key: Some(vmm::snapshot::SnapshotKey::new(key)),
    }
}

/// A memory file in memory: the data extents of `manifest` at the offsets
/// its layout gives them, taken in order from `data`; zero elsewhere.
pub struct MemoryFile {
    /// `(file offset, bytes)`, ascending.
    pieces: Vec<(u64, Vec<u8>)>,
}

impl MemoryFile {
    /// Lays `data` (the extents' bytes, concatenated) out as `manifest` says.
    /// A `data` shorter than the extents leaves the rest zero.
    pub fn new(manifest: &vmm::snapshot::Manifest, data: &[u8]) -> MemoryFile {
        let m = &manifest.memory;
        let mut at = 0usize;
        let mut pieces = Vec::new();
        for e in &m.extents {
            let len = usize::try_from(e.len).unwrap_or(0);
            let mut piece = vec![0u8; len];
            let have = data.len().saturating_sub(at).min(len);
            piece[..have].copy_from_slice(&data[at..at + have]);
            at = at.saturating_add(len);
            if let Some(off) = m.layout.file_offset(e.gpa, e.len) {
                pieces.push((off, piece));
            }
        }
        pieces.sort_by_key(|p| p.0);
        MemoryFile { pieces }
    }

    /// Fills `buf` from offset `off`, as `read_exact_at` on the file would.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        buf.fill(0);
        let end = off + buf.len() as u64;
        for (p, bytes) in &self.pieces {
            let p_end = p + bytes.len() as u64;
            if p_end <= off || *p >= end {
                continue;
            }
            let lo = off.max(*p);
            let hi = end.min(p_end);
            let dst = usize::try_from(lo - off).unwrap_or(0);
            let src = usize::try_from(lo - p).unwrap_or(0);
            let len = usize::try_from(hi - lo).unwrap_or(0);
            buf[dst..dst + len].copy_from_slice(&bytes[src..src + len]);
        }
        Ok(())
    }
}
