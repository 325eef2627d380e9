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
    };
    let dev = PageStore::restore(args, state).ok()?;
    let saved = save_page_store(&dev);
    let again = PageStoreArgs {
        mem: mem.clone(),
        sink: no_events(),
        stats: GuestStatsCell::default(),
        start_paused: true,
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
