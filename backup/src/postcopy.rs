//! Post-copy migration, on the destination: the VM runs before its memory
//! has arrived.
//!
//! ```text
//!  Handover{postcopy, valid pages} ─▶ RAM: fresh anonymous memory, the valid
//!  pages copied in from the image, the rest registered with userfaultfd ─▶
//!  VM restored and resumed ─▶ Postcopy phase:
//!    fault thread: a missing page faults ─▶ its index goes to the source on
//!                  the session's ack stream (`Ack.want_pages`)
//!    stream:       pages arrive (pushed in order, or asked for) ─▶ installed
//!                  with UFFDIO_COPY / ZEROPAGE, which wakes the waiter
//!    `postcopy_done` and no page missing ─▶ unregister ─▶ the VM goes to
//!                  the primary role (HandedOver), like after a handover
//!  the source's stream ends, a bad message, or a fault waits 10 s ─▶ the VM
//!    cannot go on without its pages: it is stopped and the role fails
//! ```
//!
//! Until the last page is in, the VM depends on the source: that is
//! post-copy's price (QEMU's too), said in the docs and tested.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;
use understudy_common::ids::{Generation, Incarnation, SessionId};
use understudy_common::payload::CheckpointPayload;
use understudy_common::role::RunningVm;
use understudy_common::status::StateKind;
use understudy_common::wire;
use understudy_proto::{Ack, EpochChunk};
use understudy_vmm::uffd::{Uffd, UffdError};
use understudy_vmm::{DirtyBitmap, GuestRam, PAGE_SIZE, RamBacking, Vm, VmShell, VmState};

use crate::promotion::{Promoted, PromotionError};
use crate::{Phase, Shared};

/// A fault that waits this long for its page means the source is gone.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the fault thread looks at its stop flag and at old faults.
const FAULT_POLL: Duration = Duration::from_millis(20);

/// Why a page from the source cannot be installed.
#[derive(Debug, thiserror::Error)]
enum InstallError {
    #[error("page {page} is outside guest RAM ({pages} pages)")]
    OutsideRam { page: u32, pages: usize },
    #[error("cannot install page {page}")]
    Uffd {
        page: u32,
        #[source]
        source: UffdError,
    },
}

/// The pages of a VM running here before they all arrived (shared by the
/// fault thread and the stream that installs pages).
#[derive(Debug)]
pub(crate) struct Pager {
    pub session: SessionId,
    uffd: Uffd,
    pages: usize,
    state: Mutex<PagerState>,
    faults: AtomicU64,
    stop: AtomicBool,
}

#[derive(Debug)]
struct PagerState {
    /// Valid pages that are zero: installed (as the zero page) at their
    /// first fault, without asking the source.
    lazy_zero: DirtyBitmap,
    /// When the source last sent pages (it pushes without pause until the
    /// last one, so a long silence means it is gone).
    heard: Instant,
    have: DirtyBitmap,
    /// Faulted pages not here yet, since when.
    waiting: HashMap<u32, Instant>,
    /// Pages to ask the source for.
    requests: Vec<u32>,
    /// Microseconds each fault waited.
    waits_us: Vec<u64>,
}

impl Pager {
    fn lock(&self) -> std::sync::MutexGuard<'_, PagerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs one page (None: zero). Counts it the first time.
    fn install(&self, page: u32, content: Option<&[u8; PAGE_SIZE]>) -> Result<(), InstallError> {
        let p = page as usize;
        if p >= self.pages {
            return Err(InstallError::OutsideRam {
                page,
                pages: self.pages,
            });
        }
        let installed = match content {
            None => self.uffd.zero(p),
            Some(c) => self.uffd.copy(p, c),
        }
        .map_err(|source| InstallError::Uffd { page, source })?;
        let mut state = self.lock();
        state.have.set(p);
        if let Some(since) = state.waiting.remove(&page) {
            state.waits_us.push(since.elapsed().as_micros() as u64);
        }
        drop(state);
        if !installed {
            // Present already (the guest's own fault raced it): wake anyone.
            let _ = self.uffd.wake(p);
        }
        Ok(())
    }

    /// Pages still at the source.
    fn missing(&self) -> usize {
        self.pages - self.lock().have.count()
    }

    /// The pages to ask the source for now.
    pub(crate) fn take_requests(&self) -> Vec<u32> {
        std::mem::take(&mut self.lock().requests)
    }

    /// Fault waits: count, p50, p99 (µs).
    fn waits(&self) -> (u64, u64, u64) {
        let mut w = self.lock().waits_us.clone();
        w.sort_unstable();
        let q = |f: f64| {
            if w.is_empty() {
                0
            } else {
                w[((w.len() - 1) as f64 * f).round() as usize]
            }
        };
        (self.faults.load(Ordering::Acquire), q(0.5), q(0.99))
    }
}

/// The fault thread: every missing page the VM touches becomes a request.
fn serve_faults(pager: Arc<Pager>, shared: Arc<Shared>) {
    while !pager.stop.load(Ordering::Acquire) {
        match pager.uffd.next_fault(FAULT_POLL) {
            Ok(Some(page)) => {
                let mut state = pager.lock();
                if state.have.contains(page) {
                    let zero = state.lazy_zero.contains(page);
                    drop(state);
                    // A valid zero page's first touch, or a page installed
                    // while its fault was queued.
                    let _ = if zero {
                        pager.uffd.zero(page).map(drop)
                    } else {
                        pager.uffd.wake(page)
                    };
                    continue;
                }
                let page = page as u32;
                if let std::collections::hash_map::Entry::Vacant(e) = state.waiting.entry(page) {
                    e.insert(Instant::now());
                    pager.faults.fetch_add(1, Ordering::AcqRel);
                    state.requests.push(page);
                    drop(state);
                    shared.postcopy_notify.notify_one();
                }
            }
            Ok(None) => {
                let state = pager.lock();
                let silent = state.heard.elapsed();
                let stuck = state
                    .waiting
                    .iter()
                    .find(|(_, since)| since.elapsed() > PAGE_TIMEOUT)
                    .map(|(&p, _)| p);
                let missing = pager.pages - state.have.count();
                drop(state);
                if silent > PAGE_TIMEOUT && missing > 0 {
                    fail_from(
                        &shared,
                        format!("the source sent no page for {PAGE_TIMEOUT:?}"),
                        true,
                    );
                    return;
                }
                if let Some(page) = stuck {
                    fail_from(
                        &shared,
                        format!("page {page} did not come from the source within {PAGE_TIMEOUT:?}"),
                        true,
                    );
                    return;
                }
            }
            Err(e) => {
                fail_from(&shared, format!("userfaultfd: {}", wire::chain(&e)), true);
                return;
            }
        }
    }
}

/// The VM while its pages arrive (the role's phase).
pub(crate) struct PostcopyVm {
    pub vm: Vm,
    output: crossbeam_channel::Receiver<u8>,
    generation: Generation,
    incarnation: Option<Incarnation>,
    pager: Arc<Pager>,
    console_stop: Arc<AtomicBool>,
    console_thread: Option<std::thread::JoinHandle<()>>,
    fault_thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl std::fmt::Debug for PostcopyVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyVm")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The byte ranges of `file` that hold data (the rest are holes, which read
/// as zero); the whole file where the filesystem cannot say.
fn data_extents(file: &std::fs::File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an fd this function borrows.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data past `pos`.
                Some(libc::ENXIO) => Ok(out),
                // SEEK_DATA unsupported: all of it may be data.
                Some(libc::EINVAL) => Ok(vec![(0, len)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(vec![(0, len)]);
        }
        out.push((data as u64, (hole as u64).min(len)));
        pos = hole;
    }
    Ok(out)
}

/// Parses the handover's bitmap of valid pages.
fn valid_pages(bytes: &[u8], pages: usize) -> Result<DirtyBitmap, PromotionError> {
    let words = pages.div_ceil(64);
    if bytes.len() != words * 8 {
        return Err(PromotionError::Postcopy(format!(
            "the valid-page bitmap has {} bytes, not {} for {pages} pages",
            bytes.len(),
            words * 8
        )));
    }
    let words = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .collect();
    Ok(DirtyBitmap::from_words(words, pages))
}

/// A post-copy handover: runs the VM here from `state` (the source's
/// checkpoint payload at the switch) on the image's `valid` pages (`zero`
/// of them all zero, not read), the rest
/// to come from the source over session `session`'s stream, whose pre-copy
/// epochs up to `epoch` are committed. Nothing changes if a check fails.
pub(crate) fn promote(
    shared: &Arc<Shared>,
    session: SessionId,
    epoch: u64,
    valid: &[u8],
    zero: &[u8],
    state_bytes: &[u8],
) -> Result<Promoted, PromotionError> {
    let started = Instant::now();
    // The witness's key moves here first, or the source runs on; asked
    // without the state lock (see `promotion::promote`).
    let witnessed = match &shared.opts.witness {
        Some(w) => {
            let generation = {
                let state = shared.lock();
                let Phase::Standby(standby) = &state.phase else {
                    return Err(PromotionError::AlreadyRunning(shared.generation()));
                };
                standby.generation
            };
            let won = crate::promotion::claim_witness(
                w,
                "take over by post-copy",
                false,
                generation,
                generation.next(),
            )?;
            Some((w, won, generation))
        }
        None => None,
    };
    let result = promote_locked(
        shared,
        started,
        session,
        epoch,
        valid,
        zero,
        state_bytes,
        witnessed.as_ref().map(|w| w.2),
    );
    if let Some((w, won, _)) = &witnessed
        && result.is_err()
    {
        crate::promotion::give_back(w, won);
    }
    result
}

/// The post-copy promotion under the state lock; `seen`: the generation the
/// witness's claim was for (None: no witness).
#[allow(clippy::too_many_arguments)]
fn promote_locked(
    shared: &Arc<Shared>,
    started: Instant,
    session: SessionId,
    epoch: u64,
    valid: &[u8],
    zero: &[u8],
    state_bytes: &[u8],
    seen: Option<Generation>,
) -> Result<Promoted, PromotionError> {
    let mut state = shared.lock();
    let Phase::Standby(standby) = &mut state.phase else {
        return Err(PromotionError::AlreadyRunning(shared.generation()));
    };
    if seen.is_some_and(|g| g != standby.generation) {
        return Err(PromotionError::WitnessRefused(
            "this host's generation changed while the witness was asked".into(),
        ));
    }
    let ours = standby
        .session
        .as_ref()
        .is_some_and(|s| s.id == session && s.migration);
    if !ours {
        return Err(PromotionError::HandoverMismatch {
            epoch,
            session,
            committed: standby.store.committed_epoch(),
        });
    }
    let payload = CheckpointPayload::decode(state_bytes).map_err(PromotionError::Payload)?;
    let vm_state = VmState::decode(&payload.vm_state).map_err(PromotionError::VmState)?;
    if vm_state.memory.size_bytes != shared.opts.ram_bytes {
        return Err(PromotionError::Postcopy(format!(
            "the state is of a VM with {} bytes of RAM, not {}",
            vm_state.memory.size_bytes, shared.opts.ram_bytes
        )));
    }
    let incarnation = standby.store.incarnation();
    let size = vm_state.memory.size_bytes as usize;
    let pages = size / PAGE_SIZE;
    let valid = valid_pages(valid, pages)?;
    // Valid pages the source saw all zero: not read, installed at their
    // first touch (an empty bitmap: none known).
    let known_zero = if zero.is_empty() {
        DirtyBitmap::new(pages)
    } else {
        valid_pages(zero, pages)?
    };
    // The VM built ahead for this (over fresh anonymous memory of the
    // configured size, which the state's was checked against above), or
    // one built now.
    let shell = match standby.postcopy_shell.take() {
        Some(shell) => shell,
        None => {
            VmShell::new(GuestRam::new(size, RamBacking::Anonymous).map_err(PromotionError::Ram)?)
                .map_err(PromotionError::Restore)?
        }
    };
    let ram = shell.ram();
    // The pages the image holds current, copied in before the registration
    // (present pages never fault). Only the image's data extents are read:
    // a valid page in a hole is zero, installed when first touched.
    let path = standby.store.memory_path();
    let open_err = |source| PromotionError::OpenRam {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(open_err)?;
    let mut in_data = DirtyBitmap::new(pages);
    for (start, end) in data_extents(&file, size as u64).map_err(open_err)? {
        let first = (start as usize) / PAGE_SIZE;
        let last = (end as usize).div_ceil(PAGE_SIZE).min(pages);
        for page in first..last {
            in_data.set(page);
        }
    }
    // Read in runs of up to 1 MiB: a page at a time made a 256 MiB image
    // take ~300 ms of the guest's stop.
    const RUN: usize = 256;
    let mut buf = vec![0u8; RUN * PAGE_SIZE];
    let mut lazy_zero = DirtyBitmap::new(pages);
    for run_start in (0..pages).step_by(RUN) {
        use std::os::unix::fs::FileExt;
        let run_end = (run_start + RUN).min(pages);
        let mut wanted = Vec::new();
        for p in run_start..run_end {
            if !valid.contains(p) {
                continue;
            }
            if known_zero.contains(p) {
                lazy_zero.set(p);
            } else {
                wanted.push(p);
            }
        }
        if wanted.is_empty() {
            continue;
        }
        if !wanted.iter().any(|&p| in_data.contains(p)) {
            wanted.iter().for_each(|&p| lazy_zero.set(p));
            continue;
        }
        let bytes = &mut buf[..(run_end - run_start) * PAGE_SIZE];
        file.read_exact_at(bytes, (run_start * PAGE_SIZE) as u64)
            .map_err(open_err)?;
        for page in wanted {
            let at = (page - run_start) * PAGE_SIZE;
            let content = &bytes[at..at + PAGE_SIZE];
            if content.iter().all(|&b| b == 0) {
                lazy_zero.set(page);
            } else {
                ram.write_at((page * PAGE_SIZE) as u64, content)
                    .map_err(PromotionError::Ram)?;
            }
        }
    }
    let uffd = Uffd::register(ram).map_err(|e| PromotionError::Postcopy(wire::chain(&e)))?;
    let have = valid.clone();
    let (vm, console) = Vm::restore_in(shell, &vm_state, true).map_err(PromotionError::Restore)?;
    let missing = pages - have.count();
    let pager = Arc::new(Pager {
        session,
        uffd,
        pages,
        state: Mutex::new(PagerState {
            heard: Instant::now(),
            lazy_zero,
            have,
            waiting: HashMap::new(),
            requests: Vec::new(),
            waits_us: Vec::new(),
        }),
        faults: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let new_generation = standby.generation.next();
    let console_stop = Arc::new(AtomicBool::new(false));
    let console_thread = crate::promotion::start_console_output(
        console.output.clone(),
        shared.host.log.clone(),
        console_stop.clone(),
    )?;
    let fault_thread = {
        let (pager, shared) = (pager.clone(), shared.clone());
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve_faults(pager, shared))
            .map_err(PromotionError::Thread)?
    };
    // ── Point of no return: the generation that fences the source. ──
    if let Err(source) = standby.store.go_live(new_generation.0) {
        pager.stop.store(true, Ordering::Release);
        console_stop.store(true, Ordering::Release);
        return Err(PromotionError::RecordGeneration {
            generation: new_generation,
            source,
        });
    }
    shared.set_generation(new_generation, true);
    shared.watch.arm(false);
    shared.watch.set_session(None);
    let host = &shared.host;
    host.log.set_generation(new_generation.0);
    host.log
        .take_over(payload.console_offset, &payload.console_out);
    host.log.set_raw_start(Some(payload.console_offset));
    host.input.set(Some(console.input));
    *shared.postcopy.lock().unwrap_or_else(|p| p.into_inner()) = Some(pager.clone());
    if let Err(e) = vm.resume() {
        tracing::error!(error = %e, "the post-copy VM did not resume");
    }
    let resumed = started.elapsed();
    crate::promotion::record(
        shared,
        crate::promotion::Trigger::Handover {
            session,
            epoch,
            replay: false,
        },
        epoch,
        new_generation,
        resumed,
        Incarnation::from_raw(incarnation),
    );
    host.stats.set_state(
        StateKind::Postcopy,
        format!("post-copy: running, {missing} of {pages} pages still at the source"),
    );
    tracing::info!(
        epoch,
        generation = %new_generation,
        missing,
        pages,
        resume_us = resumed.as_micros() as u64,
        "post-copy: VM running here; fetching the rest from the source"
    );
    state.phase = Phase::Postcopy(Box::new(PostcopyVm {
        vm,
        output: console.output,
        generation: new_generation,
        incarnation: Incarnation::from_raw(incarnation),
        pager,
        console_stop,
        console_thread: Some(console_thread),
        fault_thread: Some(fault_thread),
        started,
    }));
    Ok(Promoted {
        generation: new_generation,
        epoch,
        resumed,
    })
}

/// Pages from the source (or its `done`). Returns the ack that says every
/// page is in, once it is.
pub(crate) fn receive(shared: &Arc<Shared>, msg: &EpochChunk) -> Result<Option<Ack>, Status> {
    let pager = shared
        .postcopy
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|p| SessionId::from_raw(msg.session) == Some(p.session))
        .ok_or_else(|| {
            Status::failed_precondition("no post-copy migration of this session runs here")
        })?;
    pager.lock().heard = Instant::now();
    if !msg.postcopy_pages.is_empty() {
        if let Err(point) = understudy_common::fault::check("backup.postcopy.pages") {
            fail(shared, format!("injected fault ({point})"));
            return Err(Status::internal(format!("injected fault ({point})")));
        }
        let installed =
            understudy_common::postcopy::decode(&msg.postcopy_pages, |page, content| {
                pager.install(page, content)
            });
        let why = match installed {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(wire::chain(&why)),
            Err(e) => Some(wire::chain(&e)),
        };
        if let Some(why) = why {
            fail(shared, format!("a bad page message from the source: {why}"));
            return Err(Status::invalid_argument(format!(
                "post-copy pages refused: {why}"
            )));
        }
        shared
            .host
            .stats
            .bytes_shipped
            .fetch_add(msg.postcopy_pages.len() as u64, Ordering::Relaxed);
    }
    if !msg.postcopy_done {
        return Ok(None);
    }
    let missing = pager.missing();
    if missing > 0 {
        let why = format!("the source says it sent every page, yet {missing} are missing");
        fail(shared, why.clone());
        return Err(Status::data_loss(why));
    }
    let (faults, p50, p99) = pager.waits();
    finish(shared);
    Ok(Some(Ack {
        generation: shared.generation().0,
        postcopy_done: true,
        postcopy_faults: faults,
        fault_wait_p50_micros: p50,
        fault_wait_p99_micros: p99,
        ..Ack::default()
    }))
}

impl PostcopyVm {
    /// Stops the helper threads (joined unless `from_fault_thread`: the
    /// fault thread itself may be the caller) and ends the registration:
    /// faults are ordinary from here on, and a vCPU waiting on a page that
    /// will never come is let go (a stop alone would wait for it forever).
    fn release(&mut self, from_fault_thread: bool) {
        self.pager.stop.store(true, Ordering::Release);
        self.console_stop.store(true, Ordering::Release);
        if let Err(e) = self.pager.uffd.unregister() {
            tracing::error!(error = %wire::chain(&e), "cannot end the post-copy registration");
        }
        if !from_fault_thread && let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.console_thread.take() {
            let _ = t.join();
        }
    }

    /// The role ends while pages are still missing: the VM stops.
    pub(crate) fn stop(mut self) {
        self.release(false);
        drop(self.vm.stop());
    }
}

/// Every page is in: the VM no longer needs the source; it goes to the
/// primary role.
fn finish(shared: &Arc<Shared>) {
    let mut state = shared.lock();
    let phase = std::mem::replace(&mut state.phase, Phase::HandedOver(None));
    let Phase::Postcopy(mut p) = phase else {
        state.phase = phase;
        return;
    };
    p.release(false);
    let (faults, p50, p99) = p.pager.waits();
    *shared.postcopy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    tracing::info!(
        took_ms = p.started.elapsed().as_secs_f64() * 1e3,
        faults,
        fault_wait_p50_us = p50,
        fault_wait_p99_us = p99,
        "post-copy done: every page is here; the VM no longer needs the source"
    );
    shared
        .host
        .stats
        .set_state(StateKind::Promoted, "post-copy done: running");
    let PostcopyVm {
        vm,
        output,
        generation,
        incarnation,
        ..
    } = *p;
    state.phase = Phase::HandedOver(Some(Box::new(RunningVm {
        vm,
        output,
        generation,
        incarnation,
        trace: None,
        output_taken: 0,
        by_handover: true,
    })));
    drop(state);
    shared.handed_over.cancel();
}

/// The VM cannot go on without the source: it is stopped, and the role
/// ends with the reason. `from_fault_thread`: the fault thread calls.
fn fail_from(shared: &Arc<Shared>, why: String, from_fault_thread: bool) {
    let mut state = shared.lock();
    let phase = std::mem::replace(&mut state.phase, Phase::HandedOver(None));
    let Phase::Postcopy(mut p) = phase else {
        state.phase = phase;
        return;
    };
    let missing = p.pager.missing();
    let why = format!(
        "post-copy migration failed after the switch: {why}; {missing} pages never arrived, so \
         the VM cannot run here (it ran here after leaving the source, so the source cannot \
         resume it either): the VM is lost"
    );
    tracing::error!("{why}");
    *shared.postcopy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    p.release(from_fault_thread);
    drop(p.vm.stop());
    shared.host.input.set(None);
    shared
        .host
        .stats
        .set_state(StateKind::PromotionFailed, why.clone());
    state.phase = Phase::Failed(why);
    drop(state);
    shared.handed_over.cancel();
}

/// [`fail_from`] anywhere but the fault thread.
pub(crate) fn fail(shared: &Arc<Shared>, why: String) {
    fail_from(shared, why, false);
}

/// The session's stream ended: if it carried a post-copy, the VM is lost.
pub(crate) fn stream_ended(shared: &Arc<Shared>, session: SessionId) {
    let running = shared
        .postcopy
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|p| p.session == session);
    if running {
        fail(
            shared,
            "the source's stream ended before the last page".into(),
        );
    }
}
