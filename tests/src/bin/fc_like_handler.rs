//! A page-fault handler for the project's tests that behaves as
//! Firecracker's example handlers do (`src/firecracker/examples/uffd/` of
//! v1.7 to main: `uffd_utils.rs`, `on_demand_handler.rs`,
//! `malicious_handler.rs`), written from their documented behaviour, not
//! from their code:
//!
//! - binds SOCKET and accepts one connection; like v1.10 and later, reads
//!   the peer's pid (`SO_PEERCRED`) and installs a panic hook that SIGKILLs
//!   it (not in `malicious` mode: Firecracker's malicious handler has none);
//! - maps MEMFILE read-only and private: its length is the backing size;
//! - polls the connection and the userfaultfds without a timeout; a readable
//!   connection is a new handshake: up to 1024 bytes with a file descriptor;
//!   a read without one (EOF) or an error is retried 5 times, 100 ms apart,
//!   then it panics (v1.12 and later; so a peer that closes the connection
//!   is SIGKILLed);
//! - checks the mappings as Firecracker's do: the sizes add up to the
//!   backing size, the page size is a power of two. The page size is the
//!   message's `page_size` (v1.12 and later) or, with `--field
//!   page_size_kib`, that field (v1.7 to v1.11);
//! - a page fault: the region holding the page, the source at
//!   `offset + (page - base)` in the backing, `UFFDIO_COPY` of one page with
//!   wake-up; EAGAIN defers the event, EEXIST is fine, any other error
//!   panics (and so kills the peer). A page outside every region panics;
//! - REMOVE events unregister the range (`on_demand_handler`).
//!
//! `fc_like_handler SOCKET MEMFILE [--mode serve|malicious|die-after:N|stall-after:N] [--field page_size|page_size_kib]`
//! - `serve` (default): as above;
//! - `malicious`: panics at the first page fault, as Firecracker's;
//! - `die-after:N`: panics after serving N faults (the peer is killed);
//! - `stall-after:N`: after serving N faults, lives on, connected, and never
//!   reads the userfaultfd again.
//!
//! It prints `served N` on stderr every 1000 faults and when it ends.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    Malicious,
    DieAfter(u64),
    StallAfter(u64),
}

#[derive(Clone, Copy)]
struct Region {
    base: u64,
    size: u64,
    offset: u64,
}

struct Handler {
    uffd: OwnedFd,
    regions: Vec<Region>,
    page_size: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

fn peer_pid(stream: &UnixStream) -> i32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap();
    // SAFETY: `cred`/`len` describe a writable ucred.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_PEERCRED of the connection failed");
    cred.pid
}

fn install_panic_hook(pid: i32) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // SAFETY: kill takes plain values.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            eprintln!("fc-like handler: cannot SIGKILL its peer (pid {pid})");
        }
        default(info);
    }));
}

/// One handshake: the mappings and the userfaultfd, retried on EOF.
fn receive(stream: &UnixStream, backing_len: u64, field: &str) -> Handler {
    for _ in 1..=5 {
        let mut buf = vec![0u8; 1024];
        match stream.recv_with_fd(&mut buf) {
            Ok((n, Some(file))) => {
                let body = String::from_utf8(buf[..n].to_vec()).expect("the handshake is not UTF-8");
                let maps: Vec<serde_json::Value> = serde_json::from_str(&body)
                    .unwrap_or_else(|_| panic!("fc-like handler: the mappings do not parse: {body}"));
                let first = maps.first().unwrap_or_else(|| panic!("no mapping in {body}"));
                let page_size = first[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no `{field}` in {body}"));
                let regions: Vec<Region> = maps
                    .iter()
                    .map(|m| Region {
                        base: m["base_host_virt_addr"].as_u64().unwrap(),
                        size: m["size"].as_u64().unwrap(),
                        offset: m["offset"].as_u64().unwrap(),
                    })
                    .collect();
                let memsize: u64 = regions.iter().map(|r| r.size).sum();
                // Firecracker's consistency check.
                assert_eq!(
                    memsize, backing_len,
                    "the regions do not add up to the memory file"
                );
                assert!(page_size.is_power_of_two(), "page size {page_size}");
                // SAFETY: the descriptor just arrived by SCM_RIGHTS; it is ours.
                let uffd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) };
                return Handler {
                    uffd,
                    regions,
                    page_size,
                };
            }
            Ok((n, None)) => eprintln!("fc-like handler: {n} bytes and no userfaultfd; trying again"),
            Err(e) => eprintln!("fc-like handler: receiving the handshake failed: {e}; trying again"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("fc-like handler: no userfaultfd after 5 attempts");
}

impl Handler {
    /// Serves one fault; `false` to try again later (EAGAIN).
    fn serve(&self, addr: u64, backing: *const u8) -> bool {
        let page = addr & !(self.page_size - 1);
        let r = self
            .regions
            .iter()
            .find(|r| page >= r.base && page < r.base + r.size)
            .unwrap_or_else(|| panic!("fc-like handler: {addr:#x} is in no region"));
        let src = backing as u64 + r.offset + (page - r.base);
        let mut copy = UffdioCopy {
            dst: page,
            src,
            len: self.page_size,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY with a valid struct; `src` lies in the mapped backing.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        if ret == 0 {
            assert!(copy.copy > 0, "UFFDIO_COPY copied nothing");
            return true;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => false,
            Some(libc::EEXIST) => true,
            _ => panic!("fc-like handler: UFFDIO_COPY failed: {e}"),
        }
    }

    fn unregister(&self, start: u64, end: u64) {
        let range = UffdioRange {
            start,
            len: end - start,
        };
        // SAFETY: UFFDIO_UNREGISTER reads a valid range.
        let r = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &range) };
        assert_eq!(r, 0, "fc-like handler: UFFDIO_UNREGISTER failed");
    }

    /// Reads every queued event: (kind, a, b).
    fn read_events(&self) -> Vec<(u8, u64, u64)> {
        let mut out = Vec::new();
        loop {
            let mut msg = [0u8; 32];
            // SAFETY: reads at most 32 bytes into `msg`.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN),
                    "fc-like handler: reading the userfaultfd: {e}"
                );
                return out;
            }
            assert_eq!(n, 32, "short uffd_msg");
            let word = |i: usize| u64::from_ne_bytes(msg[8 + 8 * i..16 + 8 * i].try_into().unwrap());
            out.push((msg[0], word(0), word(1)));
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .expect("usage: fc_like_handler SOCKET MEMFILE [--mode M] [--field F]");
    let memfile = args
        .next()
        .expect("usage: fc_like_handler SOCKET MEMFILE [--mode M] [--field F]");
    let mut mode = Mode::Serve;
    let mut field = "page_size".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                let m = args.next().expect("--mode takes a value");
                mode = match m.as_str() {
                    "serve" => Mode::Serve,
                    "malicious" => Mode::Malicious,
                    other => {
                        let n = |prefix: &str| other.strip_prefix(prefix).and_then(|n| n.parse().ok());
                        match (n("die-after:"), n("stall-after:")) {
                            (Some(n), _) => Mode::DieAfter(n),
                            (_, Some(n)) => Mode::StallAfter(n),
                            _ => panic!("unknown mode {other}"),
                        }
                    }
                };
            }
            "--field" => field = args.next().expect("--field takes a value"),
            other => panic!("unknown argument {other}"),
        }
    }
    let file = File::open(&memfile).expect("cannot open the memory file");
    let backing_len = file.metadata().unwrap().len();
    // SAFETY: a private read-only mapping of the whole file.
    let backing = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            usize::try_from(backing_len).unwrap(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(backing, libc::MAP_FAILED, "cannot map the memory file");
    let backing = backing.cast::<u8>().cast_const();

    let listener = UnixListener::bind(&socket).expect("cannot bind the socket");
    let (stream, _) = listener.accept().expect("cannot accept a connection");
    if mode != Mode::Malicious {
        install_panic_hook(peer_pid(&stream));
    }
    let mut handlers: Vec<Handler> = Vec::new();
    let mut stream_open = true;
    let mut served = 0u64;
    let mut deferred: Vec<(usize, u64)> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        if stream_open {
            fds.push(libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for h in &handlers {
            fds.push(libc::pollfd {
                fd: h.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        assert!(n >= 0, "poll failed");
        for pfd in &fds {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            if stream_open && pfd.fd == stream.as_raw_fd() {
                // A new handshake (or the peer's EOF: retried, then panic).
                handlers.push(receive(&stream, backing_len, &field));
                if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
                    stream_open = false;
                }
                continue;
            }
            let Some(i) = handlers
                .iter()
                .position(|h| h.uffd.as_raw_fd() == pfd.fd as RawFd)
            else {
                continue;
            };
            let mut events: Vec<(usize, u64)> = std::mem::take(&mut deferred);
            for (kind, a, b) in handlers[i].read_events() {
                match kind {
                    EVENT_PAGEFAULT => {
                        if mode == Mode::Malicious {
                            panic!("fc-like handler: malicious, panicking at the first page fault");
                        }
                        events.push((i, b));
                    }
                    EVENT_REMOVE => handlers[i].unregister(a, b),
                    other => panic!("fc-like handler: unexpected userfaultfd event {other:#x}"),
                }
            }
            for (h, addr) in events {
                if handlers[h].serve(addr, backing) {
                    served += 1;
                    if served.is_multiple_of(1000) {
                        eprintln!("fc-like handler: served {served}");
                    }
                    match mode {
                        Mode::DieAfter(n) if served >= n => {
                            panic!("fc-like handler: dying after {served} faults, as asked")
                        }
                        Mode::StallAfter(n) if served >= n => {
                            // Alive, connected, and never reading again.
                            eprintln!("fc-like handler: stalling after {served} faults, as asked");
                            loop {
                                std::thread::sleep(Duration::from_secs(3600));
                            }
                        }
                        _ => {}
                    }
                } else {
                    deferred.push((h, addr));
                }
            }
        }
    }
}
