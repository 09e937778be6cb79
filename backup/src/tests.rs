//! The backup's decisions without sockets: the real `Hello` handler, epoch
//! receiver and promotion checks over an image store in a temporary
//! directory, fed chunks made by the primary's own encoder; and the VMs
//! built ahead for a promotion and for a replica (the tests here that need
//! /dev/kvm).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};
use understudy_checkpoint::epoch::StagingBuffers;
use understudy_checkpoint::store::{ImageStore, StoreError, StoreOptions};
use understudy_checkpoint::{CodecPolicy, EpochKind, SenderState};
use understudy_common::ids::{Generation, Role};
use understudy_common::role::HostIo;
use understudy_common::status::Stats;
use understudy_proto::replication_server::Replication;
use understudy_proto::{EpochChunk, HelloRequest, PROTOCOL_VERSION};
use understudy_vmm::{GuestRam, RamBacking};

use crate::promotion::{PromotionError, Trigger};
use crate::service::ReplicationService;
use crate::{BackupOptions, Phase, Shared, Standby, State};

const RAM: u64 = 1 << 20;
const PAGES: u32 = (RAM / 4096) as u32;

/// A standby backup of VM "vm" over a fresh image in `dir`.
fn backup(dir: &std::path::Path) -> Arc<Shared> {
    backup_of(dir, RAM)
}

/// [`backup`] of a VM with `ram_bytes` of RAM.
fn backup_of(dir: &std::path::Path, ram_bytes: u64) -> Arc<Shared> {
    let opts = BackupOptions {
        vm_id: "vm".into(),
        ram_bytes,
        image_dir: dir.join("image"),
        replication_listen: "127.0.0.1:1".parse().unwrap(),
        handover_unavailable: None,
        heartbeat_interval: Duration::from_millis(10),
        heartbeat_timeout: Duration::from_millis(100),
        primary_releases_alone: true,
        fsync: false,
        max_device_state: 64 << 10,
        tls: None,
        auth: understudy_common::auth::Authority::insecure(),
        incoming: false,
        witness: None,
    };
    let store = ImageStore::create(
        &opts.image_dir,
        &opts.vm_id,
        opts.ram_bytes,
        StoreOptions { fsync: false },
    )
    .unwrap();
    let stats = Arc::new(Stats::new("vm", Role::Backup, String::new(), 0));
    let (vm_ended, _) = tokio::sync::watch::channel(None);
    Arc::new(Shared {
        state: Mutex::new(State {
            phase: Phase::Standby(Box::new(Standby {
                store,
                generation: Generation(0),
                buffers: StagingBuffers::default(),
                session: None,
                stale: None,
                shell: None,
                postcopy_shell: None,
                prepared: None,
            })),
        }),
        watch: crate::watch::Watch::new(),
        generation: AtomicU64::new(0),
        runs_here: AtomicBool::new(false),
        warm_stop: Default::default(),
        handed_over: CancellationToken::new(),
        postcopy: Mutex::new(None),
        postcopy_notify: tokio::sync::Notify::new(),
        commits: tokio::sync::Notify::new(),
        vm_ended,
        opts,
        host: HostIo::new(stats, None),
    })
}

fn hello(session: u64, generation: u64) -> HelloRequest {
    hello_of(session, generation, RAM)
}

fn hello_of(session: u64, generation: u64, ram_bytes: u64) -> HelloRequest {
    HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        vm_id: "vm".into(),
        generation,
        ram_bytes,
        session,
        incarnation: 0x77,
        previous: None,
        heartbeat_key: vec![3; 32].into(),
        mode: 0,
        migration: false,
        witness_key: String::new(),
    }
}

/// The primary's side: its encoder, one epoch at a time.
struct Primary {
    sender: SenderState,
    session: u64,
    generation: u64,
}

impl Primary {
    fn new(session: u64, generation: u64) -> Self {
        Self::of(session, generation, PAGES)
    }

    fn of(session: u64, generation: u64, pages: u32) -> Self {
        Self {
            sender: SenderState::new("vm", pages, generation, CodecPolicy::ADAPTIVE).unwrap(),
            session,
            generation,
        }
    }

    fn epoch(&mut self, epoch: u64, kind: EpochKind, pages: &[u32]) -> Vec<EpochChunk> {
        let mut enc = self.sender.begin(epoch, kind).unwrap();
        for &p in pages {
            let mut page = [0u8; 4096];
            page[..8].copy_from_slice(&(epoch * 1000 + u64::from(p)).to_le_bytes());
            enc.add_page(p, &page).unwrap();
        }
        let chunks = enc.finish(b"device state").unwrap().chunks;
        self.messages(chunks)
    }

    /// Encoded chunks as this primary's session sends them.
    fn messages(&self, chunks: Vec<Vec<u8>>) -> Vec<EpochChunk> {
        chunks
            .into_iter()
            .map(|c| EpochChunk {
                session: self.session,
                generation: self.generation,
                chunk: c.into(),
                ..Default::default()
            })
            .collect()
    }
}

/// Feeds `chunks`; the ack's epoch if the last one completed an epoch.
fn feed(shared: &Shared, chunks: Vec<EpochChunk>) -> Result<Option<u64>, tonic::Status> {
    let mut acked = None;
    for c in chunks {
        acked = crate::receiver::receive_chunk(shared, c)?.map(|a| a.epoch);
    }
    Ok(acked)
}

/// `chunks` with a bit flipped in the middle of the last one.
fn damaged(mut chunks: Vec<EpochChunk>) -> Vec<EpochChunk> {
    if let Some(last) = chunks.last_mut() {
        let mut bytes = last.chunk.to_vec();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        last.chunk = bytes.into();
    }
    chunks
}

fn committed(shared: &Shared) -> Option<u64> {
    match &shared.lock().phase {
        Phase::Standby(s) => s.store.committed_epoch(),
        _ => None,
    }
}

fn would_promote(shared: &Shared, trigger: Trigger) -> Result<bool, PromotionError> {
    let mut state = shared.lock();
    crate::promotion::trigger_holds(shared, &mut state.phase, trigger).map(|seen| seen.is_some())
}

/// Whether a silence now would promote.
fn silence_promotes(shared: &Shared) -> bool {
    would_promote(shared, Trigger::Silence(Duration::from_secs(1))).unwrap()
}

/// A Hello, a full sync round and a first checkpoint: protected and armed.
/// A backup of session 42 (generation 1) protected at epoch 2, with all of
/// epoch 3 fed but its last chunk, which is returned.
async fn epoch_3_under_way(dir: &std::path::Path) -> (Arc<Shared>, EpochChunk) {
    let shared = backup(dir);
    let mut primary = Primary::new(42, 1);
    protected(&shared, &mut primary).await;
    let mut chunks = primary.epoch(3, EpochKind::Checkpoint, &[4, 5]);
    let last = chunks.pop().unwrap();
    assert_eq!(feed(&shared, chunks).unwrap(), None);
    (shared, last)
}

async fn protected(shared: &Arc<Shared>, primary: &mut Primary) {
    ReplicationService(shared.clone())
        .hello(Request::new(hello(primary.session, primary.generation)))
        .await
        .unwrap();
    let all: Vec<u32> = (0..PAGES).collect();
    assert_eq!(
        feed(shared, primary.epoch(1, EpochKind::SyncRound, &all)).unwrap(),
        Some(1)
    );
    assert!(!shared.watch.armed(), "a sync round alone protects nothing");
    assert_eq!(
        feed(shared, primary.epoch(2, EpochKind::Checkpoint, &[1, 2, 3])).unwrap(),
        Some(2)
    );
}

#[tokio::test]
async fn a_checkpoint_commits_acks_and_arms_the_detector() {
    let dir = tempfile::tempdir().unwrap();
    let shared = backup(dir.path());
    assert!(
        !silence_promotes(&shared),
        "nothing to promote before a session"
    );
    let mut primary = Primary::new(42, 1);
    assert!(!shared.warm_stop.load(std::sync::atomic::Ordering::Relaxed));
    protected(&shared, &mut primary).await;
    assert!(
        shared.warm_stop.load(std::sync::atomic::Ordering::Relaxed),
        "a Hello stops the image being read ahead"
    );
    assert_eq!(committed(&shared), Some(2));
    assert!(shared.watch.armed());
    assert!(
        shared
            .host
            .stats
            .protected
            .load(std::sync::atomic::Ordering::Acquire)
    );
    assert_eq!(shared.host.stats.state_kind().name(), "protecting");
    assert!(silence_promotes(&shared));
}

#[tokio::test]
async fn a_replay_session_faults_in_the_next_replicas_ram_where_committed_epochs_wrote() {
    // The replica's start copies the image's pages with content into its
    // own RAM; each committed epoch's pages with content are faulted in
    // there ahead (zero pages are not: the copy leaves them untouched), in
    // the VM built ahead for it. Needs /dev/kvm (the VM is KVM's).
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test builds a KVM VM: it needs /dev/kvm"
    );
    const SIZE: u64 = 8 << 20;
    const SIZE_PAGES: u32 = (SIZE / 4096) as u32;
    let dir = tempfile::tempdir().unwrap();
    let shared = backup_of(dir.path(), SIZE);
    let mut primary = Primary::of(42, 1, SIZE_PAGES);
    ReplicationService(shared.clone())
        .hello(Request::new(HelloRequest {
            mode: understudy_proto::ReplicationMode::Replay as i32,
            ..hello_of(42, 1, SIZE)
        }))
        .await
        .unwrap();
    let faulted_in = |shared: &Shared| {
        let state = shared.state.lock().unwrap();
        let Phase::Standby(standby) = &state.phase else {
            panic!("not a standby")
        };
        let session = standby.session.as_ref().expect("a session");
        let follower = session.follower.as_ref().expect("a replay session");
        follower.faulted_in_ahead()
    };
    assert_eq!(faulted_in(&shared), None, "nothing before the first commit");
    let mut round = |epoch: u64, content: &[u32], zero: &[u32]| {
        let mut enc = primary.sender.begin(epoch, EpochKind::SyncRound).unwrap();
        let mut pages: Vec<(u32, bool)> = content.iter().map(|&p| (p, true)).collect();
        pages.extend(zero.iter().map(|&p| (p, false)));
        pages.sort_unstable();
        for (p, with_content) in pages {
            if with_content {
                let mut page = [0u8; 4096];
                page[..8].copy_from_slice(&(epoch * 1000 + u64::from(p)).to_le_bytes());
                enc.add_page(p, &page).unwrap();
            } else {
                enc.add_zero_page(p).unwrap();
            }
        }
        let chunks = enc.finish(b"").unwrap().chunks;
        assert_eq!(
            feed(&shared, primary.messages(chunks)).unwrap(),
            Some(epoch)
        );
    };
    round(1, &[3, 4, 5, 10, 2047], &[6, 7]);
    assert_eq!(faulted_in(&shared), Some(vec![3, 4, 5, 10, 2047]));
    round(2, &[5, 21], &[3, 20]);
    assert_eq!(
        faulted_in(&shared),
        Some(vec![3, 4, 5, 10, 21, 2047]),
        "a page zeroed later stays faulted in until the copy drops it"
    );
}

#[tokio::test]
async fn a_copy_of_the_image_writes_only_its_pages_with_content() {
    // What a replica (and a promotion onto anonymous memory) starts from:
    // the committed image, read and written only where a page has content
    // (a 256 MiB image read whole took ~450 ms before the replica ran).
    const SIZE: u64 = 8 << 20; // the smallest guest RAM
    const SIZE_PAGES: u32 = (SIZE / 4096) as u32;
    let dir = tempfile::tempdir().unwrap();
    let shared = backup_of(dir.path(), SIZE);
    // The backup's Hello answer says its fresh image is zeroed, so the
    // sender sends only the pages with content.
    let mut primary = Primary::of(42, 1, SIZE_PAGES);
    primary.sender =
        SenderState::over_zeroed_image("vm", SIZE_PAGES, 1, CodecPolicy::ADAPTIVE).unwrap();
    ReplicationService(shared.clone())
        .hello(Request::new(hello_of(42, 1, SIZE)))
        .await
        .unwrap();
    // Runs longer than one write of the copy, runs split by zero pages.
    let written: Vec<u32> = (10..700).chain([1000, 1001, 2047]).collect();
    assert_eq!(
        feed(&shared, primary.epoch(1, EpochKind::SyncRound, &written)).unwrap(),
        Some(1)
    );
    assert_eq!(
        feed(
            &shared,
            primary.epoch(2, EpochKind::Checkpoint, &[500, 1500])
        )
        .unwrap(),
        Some(2)
    );
    let state = shared.state.lock().unwrap();
    let Phase::Standby(standby) = &state.phase else {
        panic!("not a standby")
    };
    let store = &standby.store;
    let copy = |size| {
        crate::copy_image(
            store,
            size,
            |e| e.to_string(),
            |path, e| format!("{}: {e}", path.display()),
        )
    };
    // Into fresh RAM, and into RAM with pages faulted in ahead (as a
    // replica's follower does while the epochs commit): some with content,
    // some zero in the image (as a page written in one sync round and
    // zeroed by a later one), which the copy drops again.
    let ahead = || {
        let ram = GuestRam::new(SIZE as usize, RamBacking::Anonymous).unwrap();
        let mut touched = vec![false; SIZE_PAGES as usize];
        for (first, n) in [(5, 10), (600, 200), (1500, 1), (2040, 8)] {
            ram.populate(first, n).unwrap();
            touched[first..first + n].fill(true);
        }
        crate::copy_image_into(store, &ram, &touched).unwrap();
        ram
    };
    for (what, ram) in [
        ("fresh RAM", copy(SIZE as usize).unwrap()),
        ("RAM faulted in ahead", ahead()),
    ] {
        // Before any read (a read maps a zero page): nothing else was touched.
        let untouched = ram.untouched_pages().expect("pagemap of anonymous RAM");
        let mut page = [0u8; 4096];
        for p in 0..SIZE_PAGES {
            let content = !store.page_is_zero(p);
            assert_eq!(
                untouched[p as usize], !content,
                "{what}, page {p}: content {content}, untouched {}",
                untouched[p as usize]
            );
            ram.copy_page(p as usize, &mut page).unwrap();
            let at = p as usize * 4096;
            assert_eq!(
                &page[..],
                &store.memory()[at..at + 4096],
                "{what}, page {p}"
            );
        }
    }
    // The epochs wrote `written` and page 1500, nothing else.
    let with_content = (0..SIZE_PAGES).filter(|&p| !store.page_is_zero(p)).count();
    assert_eq!(with_content, written.len() + 1);
    // A VM state that disagrees with the image about the RAM's size.
    let err = copy(2 * SIZE as usize).map(|_| ()).unwrap_err();
    assert!(
        err.contains("the image holds 8388608 bytes of RAM, the VM's state says 16777216"),
        "{err}"
    );
}

#[tokio::test]
async fn a_backup_says_its_image_is_zeroed_only_while_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let shared = backup(dir.path());
    let hello_says_zeroed = |session| {
        let service = ReplicationService(shared.clone());
        async move {
            service
                .hello(Request::new(hello(session, 1)))
                .await
                .unwrap()
                .into_inner()
                .image_zeroed
        }
    };
    assert!(hello_says_zeroed(42).await, "a created image holds zeros");
    // A primary that takes the answer sends only pages with content: none
    // in this sync round (every page zero), one in the checkpoint.
    let mut primary = Primary::new(42, 1);
    primary.sender = SenderState::over_zeroed_image("vm", PAGES, 1, CodecPolicy::ADAPTIVE).unwrap();
    let mut round = primary.sender.begin(1, EpochKind::SyncRound).unwrap();
    for p in 0..PAGES {
        round.add_zero_page(p).unwrap();
    }
    let round = round.finish(b"").unwrap();
    assert_eq!(
        (round.report.pages, round.report.pages_held),
        (0, u64::from(PAGES))
    );
    assert_eq!(
        feed(&shared, primary.messages(round.chunks)).unwrap(),
        Some(1)
    );
    assert_eq!(
        feed(&shared, primary.epoch(2, EpochKind::Checkpoint, &[3])).unwrap(),
        Some(2),
        "the checkpoint's digest holds over the zeros left out"
    );
    // The primary comes back: the image holds page 3 now.
    assert!(!hello_says_zeroed(43).await);
}

#[tokio::test]
async fn chunks_outside_the_session_are_refused_and_the_image_keeps_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let shared = backup(dir.path());
    let mut primary = Primary::new(42, 1);
    protected(&shared, &mut primary).await;

    // Another session's chunk: the stream must say Hello first.
    let mut stranger = Primary::new(7, 1);
    let e = feed(&shared, stranger.epoch(3, EpochKind::SyncRound, &[1])).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // An older generation: deposed, with the backup's generation on it.
    let mut old = Primary::new(42, 0);
    let e = feed(&shared, old.epoch(3, EpochKind::SyncRound, &[1])).unwrap_err();
    assert!(
        understudy_common::wire::deposed_generation(&e).is_some(),
        "{e}"
    );

    // A damaged chunk: the session ends, the image stays at epoch 2, and a
    // silence would still promote that commit.
    let e = feed(
        &shared,
        damaged(primary.epoch(3, EpochKind::Checkpoint, &[1, 2])),
    )
    .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert_eq!(committed(&shared), Some(2));
    let e = feed(&shared, primary.epoch(4, EpochKind::Checkpoint, &[1])).unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "a refused stream stays closed until a new Hello: {e}"
    );
    assert!(silence_promotes(&shared));
}

#[tokio::test]
async fn the_promotion_checks_follow_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let shared = backup(dir.path());
    let mut primary = Primary::new(42, 1);
    protected(&shared, &mut primary).await;

    // A handover names the committed checkpoint of this session, or nothing.
    let handover = |session: u64, epoch| Trigger::Handover {
        session: understudy_common::ids::SessionId::from_raw(session).unwrap(),
        epoch,
        replay: false,
    };
    assert!(would_promote(&shared, handover(42, 2)).unwrap());
    for (session, epoch) in [(42, 1), (42, 3), (7, 2)] {
        assert!(
            matches!(
                would_promote(&shared, handover(session, epoch)),
                Err(PromotionError::HandoverMismatch { .. })
            ),
            "session {session} epoch {epoch}"
        );
    }

    // An operator may not promote while the primary is heard.
    shared.watch.heard();
    assert!(matches!(
        would_promote(&shared, Trigger::Operator),
        Err(PromotionError::PrimaryHeard(_))
    ));

    // A stale image does not promote on silence.
    if let Phase::Standby(s) = &mut shared.lock().phase {
        s.stale = Some("test".into());
    }
    assert!(!silence_promotes(&shared));

    // A new session (the primary came back): silence promotes nothing until
    // that session's first checkpoint commits.
    let mut again = Primary::new(43, 1);
    ReplicationService(shared.clone())
        .hello(Request::new(hello(again.session, again.generation)))
        .await
        .unwrap();
    assert!(!silence_promotes(&shared));
    let all: Vec<u32> = (0..PAGES).collect();
    feed(&shared, again.epoch(1, EpochKind::SyncRound, &all)).unwrap();
    feed(&shared, again.epoch(2, EpochKind::Checkpoint, &[9])).unwrap();
    assert!(silence_promotes(&shared));

    // A goodbye: the primary stopped on purpose; silence never promotes,
    // and the image is retired (a restarted backup does not resume it).
    let reply = ReplicationService(shared.clone())
        .goodbye(Request::new(understudy_proto::GoodbyeRequest {
            generation: 1,
            session: 43,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.committed_epoch, 2);
    assert!(!silence_promotes(&shared));
    assert!(!shared.watch.armed());
    if let Phase::Standby(s) = &shared.lock().phase {
        assert!(
            s.store.promotable().is_err(),
            "a retired image is not promotable"
        );
    }
    // The session that stood down takes no more epochs: a late commit
    // would record the image as not retired again.
    let e = feed(&shared, again.epoch(3, EpochKind::Checkpoint, &[9])).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("said goodbye"), "{e}");
    assert_eq!(committed(&shared), Some(2));
    if let Phase::Standby(s) = &shared.lock().phase {
        assert!(s.store.promotable().is_err(), "the image is retired still");
    }
}

/// A migration's switch says goodbye behind its final checkpoint: the
/// backup stands down once that epoch commits, and says which epoch it
/// held; an epoch that does not come in time closes the session and
/// refuses the goodbye (the source resumes the VM, protected no more).
#[tokio::test]
async fn a_goodbye_after_an_epoch_stands_down_once_it_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, last) = epoch_3_under_way(dir.path()).await;
    let goodbye = |wait: u32| {
        let shared = shared.clone();
        tokio::spawn(async move {
            ReplicationService(shared)
                .goodbye(Request::new(understudy_proto::GoodbyeRequest {
                    generation: 1,
                    session: 42,
                    after_epoch: 3,
                    commit_wait_millis: wait,
                }))
                .await
                .map(|r| r.into_inner().committed_epoch)
        })
    };
    let waiting = goodbye(30_000);
    settle().await;
    assert!(
        !waiting.is_finished(),
        "stood down before its epoch committed"
    );
    assert!(silence_promotes(&shared), "protected until then");
    assert_eq!(feed(&shared, vec![last]).unwrap(), Some(3));
    let held = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the commit did not wake the goodbye")
        .unwrap()
        .unwrap();
    assert_eq!(held, 3);
    assert!(!silence_promotes(&shared));
    if let Phase::Standby(s) = &shared.lock().phase {
        assert!(matches!(
            s.store.promotable(),
            Err(StoreError::Retired { epoch: 3 })
        ));
    }

    // Its epoch never completes: refused at the end of the wait, and the
    // session is closed, so the epoch cannot commit after the refusal.
    let dir = tempfile::tempdir().unwrap();
    let (shared, last) = epoch_3_under_way(dir.path()).await;
    let e = ReplicationService(shared.clone())
        .goodbye(Request::new(understudy_proto::GoodbyeRequest {
            generation: 1,
            session: 42,
            after_epoch: 3,
            commit_wait_millis: 50,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("goodbye refused"), "{e}");
    assert!(feed(&shared, vec![last]).is_err());
    assert_eq!(committed(&shared), Some(2));
}

/// A handover of epoch 3 of `session` waiting for its commit (at most
/// `wait`), once it has looked and found the epoch missing.
async fn waiting_handover(
    shared: &Arc<Shared>,
    session: u64,
    wait: Duration,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let session = understudy_common::ids::SessionId::from_raw(session).unwrap();
    let waiting = tokio::spawn({
        let shared = shared.clone();
        async move { crate::service::await_commit(&shared, session, 3, wait, "handover").await }
    });
    settle().await;
    waiting
}

/// Lets spawned tasks run as far as they can.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// The waiting handover's result once `why` woke it.
async fn woken(
    waiting: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    why: &str,
) -> Result<(), tonic::Status> {
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap_or_else(|_| panic!("{why} did not wake the handover"))
        .unwrap()
}

/// A waiting request refused at the end of its wait (saying `says`), and
/// its session closed first: the rest of epoch 3 (`last`) arriving late is
/// refused, nothing more committed.
async fn refused_and_closed(
    shared: &Shared,
    waiting: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    last: EpochChunk,
    says: &str,
) {
    let e = woken(waiting, "the end of the wait").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains(says), "{e}");
    let e = feed(shared, vec![last]).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_eq!(committed(shared), Some(2));
}

/// Whether a handover of epoch 3 of `session` would promote now.
fn handover_of_3(shared: &Shared, session: u64) -> Result<bool, PromotionError> {
    let trigger = Trigger::Handover {
        session: understudy_common::ids::SessionId::from_raw(session).unwrap(),
        epoch: 3,
        replay: false,
    };
    would_promote(shared, trigger)
}

/// A migration's handover sent right behind its final epoch waits for the
/// epoch, and returns as soon as it commits.
#[tokio::test]
async fn a_handover_waiting_for_its_epoch_goes_on_when_the_epoch_commits() {
    let dir = tempfile::tempdir().unwrap();
    let shared = backup(dir.path());
    let mut primary = Primary::new(42, 1);
    protected(&shared, &mut primary).await;
    let waiting = waiting_handover(&shared, 42, Duration::from_secs(30)).await;
    assert!(
        !waiting.is_finished(),
        "returned before its epoch committed"
    );
    // Part of the epoch: still waiting.
    let mut chunks = primary.epoch(3, EpochKind::Checkpoint, &[4, 5]);
    let last = chunks.pop().unwrap();
    assert_eq!(feed(&shared, chunks).unwrap(), None);
    settle().await;
    assert!(!waiting.is_finished(), "returned on part of its epoch");
    assert_eq!(feed(&shared, vec![last]).unwrap(), Some(3));
    woken(waiting, "the commit").await.unwrap();
    assert!(handover_of_3(&shared, 42).unwrap());
}

/// A handover whose epoch does not commit within its wait is refused, and
/// the session is closed first: the epoch can never commit afterwards (the
/// source, told no, resumes the VM; nothing here may run it too).
#[tokio::test]
async fn a_handover_refused_for_a_late_epoch_closes_the_session_so_it_never_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, last) = epoch_3_under_way(dir.path()).await;
    let waiting = waiting_handover(&shared, 42, Duration::from_millis(50)).await;
    refused_and_closed(&shared, waiting, last, "did not commit within").await;
    assert!(matches!(
        handover_of_3(&shared, 42),
        Err(PromotionError::HandoverMismatch { .. })
    ));
    // A session that ended while a handover waited (a damaged chunk): the
    // wait ends at once and the promotion's own check refuses.
    let mut again = Primary::new(43, 1);
    ReplicationService(shared.clone())
        .hello(Request::new(hello(again.session, again.generation)))
        .await
        .unwrap();
    let all: Vec<u32> = (0..PAGES).collect();
    feed(&shared, again.epoch(1, EpochKind::SyncRound, &all)).unwrap();
    feed(&shared, again.epoch(2, EpochKind::Checkpoint, &[9])).unwrap();
    let waiting = waiting_handover(&shared, 43, Duration::from_secs(30)).await;
    assert!(!waiting.is_finished());
    feed(
        &shared,
        damaged(again.epoch(3, EpochKind::Checkpoint, &[1, 2])),
    )
    .unwrap_err();
    woken(waiting, "the session's end").await.unwrap();
    assert!(matches!(
        handover_of_3(&shared, 43),
        Err(PromotionError::HandoverMismatch { .. })
    ));
}

/// A replay handover whose log's tail does not arrive within its wait is
/// refused, and the session is closed first: nothing more arrives after
/// the refusal (the source, told no, resumes the VM; the replica here must
/// never run past what it had). A session with no log at all holds none.
#[tokio::test]
async fn a_handover_refused_for_a_late_log_tail_closes_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, last) = epoch_3_under_way(dir.path()).await;
    let session = understudy_common::ids::SessionId::from_raw(42).unwrap();
    let waiting = tokio::spawn({
        let shared = shared.clone();
        async move { crate::service::await_log(&shared, session, 5000, Duration::from_millis(50)).await }
    });
    settle().await;
    refused_and_closed(&shared, waiting, last, "did not arrive within").await;
    // Another session's wait ends at once (the promotion's checks answer).
    let other = understudy_common::ids::SessionId::from_raw(7).unwrap();
    crate::service::await_log(&shared, other, 5000, Duration::from_secs(30))
        .await
        .unwrap();
}

/// Whether the standby holds a VM built ahead.
fn has_shell(shared: &Shared) -> bool {
    matches!(&shared.lock().phase, Phase::Standby(s) if s.shell.is_some())
}

/// The RAM a VM built ahead over the standby's image would map.
fn image_ram(shared: &Shared) -> Option<Result<understudy_vmm::GuestRam, String>> {
    match &shared.lock().phase {
        Phase::Standby(s) => crate::shell_ram(&s.store),
        _ => unreachable!("a fresh backup stands by"),
    }
}

/// The VM a promotion restores into is built after the backup listens, on
/// a thread of its own, and reaches the standby; one that comes when the
/// standby is gone (a promotion came first) is dropped and changes nothing.
/// Needs /dev/kvm (the VM is KVM's).
#[test]
fn the_vm_built_after_listening_reaches_the_standby_or_is_dropped() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test builds a KVM VM: it needs /dev/kvm"
    );
    // The smallest RAM a VM takes (the other tests' images are smaller).
    const VM_RAM: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let shared = backup_of(dir.path(), VM_RAM);
    assert!(!has_shell(&shared));
    let thread = crate::build_shell_later(shared.clone(), image_ram(&shared))
        .expect("an image in a temporary directory may be mapped");
    assert!(
        thread.join().unwrap(),
        "the standby did not take the VM built ahead (see the warning logged: is /dev/kvm usable?)"
    );
    assert!(has_shell(&shared));
    // The standby gone before the VM is built: it is dropped, and the
    // phase is left as it was.
    let other = backup_of(&dir.path().join("other"), VM_RAM);
    let ram = image_ram(&other);
    other.lock().phase = Phase::Failed("gone".into());
    let thread = crate::build_shell_later(other.clone(), ram).unwrap();
    assert!(!thread.join().unwrap(), "a VM handed to no standby");
    assert!(matches!(&other.lock().phase, Phase::Failed(why) if why == "gone"));
    assert!(has_shell(&shared), "the first standby keeps its VM");
}
