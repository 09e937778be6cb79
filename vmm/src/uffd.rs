//! userfaultfd over guest RAM, in two modes:
//! - *missing pages*, for post-copy migration: the VM runs before its memory
//!   has arrived, and each page it touches that is not here yet stops the
//!   toucher (the vCPU inside KVM, or a VMM thread) until the page is
//!   installed;
//! - *write-protect*, for checkpoints copied after the guest resumed
//!   ([`crate::wp`]): a write to a protected page stops the writer until the
//!   page is unprotected, so its content can be copied first.
//!
//! The kernel ABI (`linux/userfaultfd.h`) is small and stable: create the fd,
//! agree on the API, register the RAM for missing-page faults, read fault
//! events, install pages with `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` (which wake
//! the waiters). It is written out here rather than taken from the
//! `userfaultfd` crate, whose bindings are generated with bindgen at build
//! time and would make libclang a build dependency of the whole project.
//!
//! Faults raised inside the kernel (KVM touching guest RAM) must be
//! handled, so `UFFD_USER_MODE_ONLY` cannot be used. The fd comes from
//! `/dev/userfaultfd` (Linux 6.1) where this process may open it: the
//! Debian package gives it to group `kvm`, which the daemons run in,
//! unprivileged. Otherwise from the `userfaultfd` system call, which for
//! kernel faults needs root, `CAP_SYS_PTRACE` or
//! `vm.unprivileged_userfaultfd = 1`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::memory::{GuestRam, PAGE_SIZE};

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
/// Protecting a page not populated yet protects it too (a marker in its
/// page-table entry), so "protect this range" has no hole (Linux 6.4).
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOWR(0xAA, nr, size)` and `_IOR(0xAA, nr, size)`.
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3F, 24);
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`: a new userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
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
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes); only page faults are asked for.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

/// What went wrong with userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The fd cannot be made (no permission: run as root, or set
    /// `vm.unprivileged_userfaultfd = 1`; or a kernel without it).
    #[error(
        "cannot create a userfaultfd (it needs read-write access to /dev/userfaultfd, which \
         the package's udev rule gives to group kvm; or root, CAP_SYS_PTRACE or \
         vm.unprivileged_userfaultfd = 1)"
    )]
    Create(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("userfaultfd {what} failed")]
    Ioctl {
        /// Which request.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading fault events failed.
    #[error("cannot read userfaultfd events")]
    Read(#[source] std::io::Error),
    /// A page index outside guest RAM.
    #[error("page {page} is outside guest RAM ({pages} pages)")]
    OutOfRange {
        /// The page.
        page: usize,
        /// Guest RAM in pages.
        pages: usize,
    },
}

/// Guest RAM registered for missing-page or write-protect faults.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    base: u64,
    pages: usize,
}

/// A new userfaultfd (non-blocking reads), from `/dev/userfaultfd` if this
/// process may open it, else from the system call.
fn create() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns
        // a new fd or -1.
        let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if raw >= 0 {
            // SAFETY: `raw` is a new fd this process owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
    }
    // SAFETY: a plain syscall returning a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new fd this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T, what: &'static str) -> Result<(), UffdError> {
    // SAFETY: `arg` is the #[repr(C)] struct the request names, valid for
    // the call; the fd is a userfaultfd.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        return Err(UffdError::Ioctl {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Uffd {
    /// Registers all of `ram` for missing-page faults. Pages already
    /// present (written before this call) never fault.
    pub fn register(ram: &GuestRam) -> Result<Self, UffdError> {
        Self::register_mode(ram, 0, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers all of `ram` for write-protect faults: nothing faults
    /// until [`Self::write_protect`] protects pages. Fails (`REGISTER`,
    /// EINVAL) where the kernel cannot write-protect the mapping: RAM
    /// mapped from a regular file (a promoted host runs on its image).
    pub fn register_write_protect(ram: &GuestRam) -> Result<Self, UffdError> {
        Self::register_mode(ram, UFFD_FEATURE_WP_UNPOPULATED, UFFDIO_REGISTER_MODE_WP)
    }

    fn register_mode(ram: &GuestRam, features: u64, mode: u64) -> Result<Self, UffdError> {
        let fd = create()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api, "API")?;
        let base = ram.host_address();
        let mut register = UffdioRegister {
            range: UffdioRange {
                start: base,
                len: ram.size() as u64,
            },
            mode,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_REGISTER, &mut register, "REGISTER")?;
        Ok(Self {
            fd,
            base,
            pages: ram.pages(),
        })
    }

    fn address(&self, page: usize) -> Result<u64, UffdError> {
        if page >= self.pages {
            return Err(UffdError::OutOfRange {
                page,
                pages: self.pages,
            });
        }
        Ok(self.base + (page * PAGE_SIZE) as u64)
    }

    /// The next faulting page, waiting at most `timeout` (None: none came).
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<usize>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Read(e));
        }
        if n == 0 {
            return Ok(None);
        }
        self.read_fault()
    }

    /// The fd, for polling it together with others (readable: a fault
    /// event waits for [`Self::read_fault`]).
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// The next queued fault's page without waiting (None: none queued, or
    /// an event that is not a page fault in guest RAM).
    pub fn read_fault(&self) -> Result<Option<usize>, UffdError> {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
        // SAFETY: reads at most one 32-byte message into `msg`.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                return Ok(None);
            }
            return Err(UffdError::Read(e));
        }
        if got as usize != std::mem::size_of::<UffdMsg>() {
            return Ok(None);
        }
        // SAFETY: the kernel wrote a whole message.
        let msg = unsafe { msg.assume_init() };
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let page = (msg.address.saturating_sub(self.base) as usize) / PAGE_SIZE;
        Ok((page < self.pages).then_some(page))
    }

    /// Installs `content` at `page` and wakes whoever waits for it. False if
    /// the page was there already (installed before, or never missing).
    pub fn copy(&self, page: usize, content: &[u8; PAGE_SIZE]) -> Result<bool, UffdError> {
        let mut copy = UffdioCopy {
            dst: self.address(page)?,
            src: content.as_ptr() as u64,
            len: PAGE_SIZE as u64,
            mode: 0,
            copy: 0,
        };
        match ioctl(&self.fd, UFFDIO_COPY, &mut copy, "COPY") {
            Ok(()) => Ok(true),
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Installs a zero page at `page` (see [`Self::copy`]).
    pub fn zero(&self, page: usize) -> Result<bool, UffdError> {
        let mut zero = UffdioZeropage {
            range: UffdioRange {
                start: self.address(page)?,
                len: PAGE_SIZE as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut zero, "ZEROPAGE") {
            Ok(()) => Ok(true),
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Write-protects (`protect`) or unprotects `count` pages from `first`.
    /// Unprotecting wakes whoever waits to write them. Protecting a page
    /// also makes KVM drop its writable mapping of it, so a vCPU's next
    /// write faults too.
    pub fn write_protect(
        &self,
        first: usize,
        count: usize,
        protect: bool,
    ) -> Result<(), UffdError> {
        if count == 0 {
            return Ok(());
        }
        let start = self.address(first)?;
        self.address(first + count - 1)?;
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start,
                len: (count * PAGE_SIZE) as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp, "WRITEPROTECT")
    }

    /// Wakes whoever waits on `page` (it was installed while its fault
    /// event was queued).
    pub fn wake(&self, page: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange {
            start: self.address(page)?,
            len: PAGE_SIZE as u64,
        };
        ioctl(&self.fd, UFFDIO_WAKE, &mut range, "WAKE")
    }

    /// Unregisters guest RAM: faults are ordinary again (a missing page
    /// reads as zero), and every thread waiting on a missing page is woken.
    /// Call it once every page is here, and before stopping a VM whose pages
    /// will never come: a vCPU waiting on a missing page inside KVM does not
    /// leave `KVM_RUN` for a stop until then (tested in `vmm/tests/kvm.rs`).
    pub fn unregister(&self) -> Result<(), UffdError> {
        let mut range = UffdioRange {
            start: self.base,
            len: (self.pages * PAGE_SIZE) as u64,
        };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range, "UNREGISTER")
    }
}
