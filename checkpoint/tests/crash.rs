//! Crash safety of the image store: a child process applies epochs in a loop
//! and is killed with SIGKILL at a random instant inside an apply (the child
//! says "applying N" just before `apply()`, and the parent picks a random point
//! within the apply time it has observed); recovery must then yield the image
//! of exactly epoch N-1 or epoch N, page for page.
//!
//! Runs as its own harness: `cargo test -p understudy-checkpoint --test crash`.
//! With `UNDERSTUDY_CRASH_CHILD=<dir>` it is the child.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Model, Rng, decode, encode, synced_store};
use understudy_checkpoint::CodecPolicy;
use understudy_checkpoint::epoch::EpochKind;
use understudy_checkpoint::store::{ImageStatus, ImageStore, Recovery};

const PAGES: u32 = 4096;
const WRITES_PER_EPOCH: usize = 1500;
const UNCHANGED_PER_EPOCH: usize = 500;
const TRIALS: u64 = 60;

fn initial_model(seed: u64) -> (Model, Rng) {
    let mut rng = Rng(seed);
    let mut model = Model::new(PAGES);
    for _ in 0..PAGES {
        model.mutate(&mut rng);
    }
    (model, rng)
}

/// The sender's memory at `epoch` (epoch 1 = the synced initial model).
fn model_at(seed: u64, epoch: u64) -> Model {
    let (mut model, mut rng) = initial_model(seed);
    for _ in 2..=epoch {
        for _ in 0..WRITES_PER_EPOCH {
            model.mutate(&mut rng);
        }
    }
    model
}

fn child(dir: &str, seed: u64) {
    let (mut model, mut rng) = initial_model(seed);
    let (mut sender, mut store) =
        synced_store(std::path::Path::new(dir), &model, CodecPolicy::ADAPTIVE);
    let mut out = std::io::stdout();
    writeln!(out, "committed 1").unwrap();
    for epoch in 2.. {
        let mut touched: Vec<u32> = (0..WRITES_PER_EPOCH)
            .map(|_| model.mutate(&mut rng))
            .collect();
        // Pages dirtied to the bytes they had: staged, not journaled (the
        // journal holds only what the image must change).
        let mut same = Rng(seed ^ epoch);
        touched.extend((0..UNCHANGED_PER_EPOCH).map(|_| same.below(PAGES.into()) as u32));
        let device = format!("device@{epoch}");
        let encoded = encode(
            &mut sender,
            &model,
            epoch,
            EpochKind::Checkpoint,
            &touched,
            device.as_bytes(),
        );
        let staged = decode(&store, &encoded.chunks).unwrap();
        writeln!(out, "applying {epoch}").unwrap();
        out.flush().unwrap();
        store.apply(&staged).unwrap();
        writeln!(out, "committed {epoch}").unwrap();
        out.flush().unwrap();
    }
}

fn main() {
    if let Ok(dir) = std::env::var("UNDERSTUDY_CRASH_CHILD") {
        let seed = std::env::var("UNDERSTUDY_CRASH_SEED")
            .unwrap()
            .parse()
            .unwrap();
        child(&dir, seed);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0x5eed);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    let started = Instant::now();
    for trial in 0..TRIALS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        let seed = rng.next();
        let mut child = Command::new(&exe)
            .env("UNDERSTUDY_CRASH_CHILD", &dir)
            .env("UNDERSTUDY_CRASH_SEED", seed.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = match line.split_once(' ') {
                    Some(("applying", n)) => (true, n.parse::<u64>().unwrap(), Instant::now()),
                    Some(("committed", n)) => (false, n.parse::<u64>().unwrap(), Instant::now()),
                    _ => continue,
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        // Watch epochs before the target to learn how long an apply takes,
        // then kill at a random instant inside the target epoch's apply.
        let target = 4 + rng.below(3);
        let mut reported = 0;
        let mut window = Duration::ZERO;
        let mut applying_since = None;
        loop {
            let (applying, n, at) = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("child progresses");
            if applying {
                if n == target {
                    let nanos = window.as_nanos().max(1) as u64;
                    std::thread::sleep(Duration::from_nanos(rng.below(nanos + nanos / 4)));
                    break;
                }
                applying_since = Some(at);
            } else {
                reported = n;
                if let Some(since) = applying_since.take() {
                    window = window.max(at - since);
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for (applying, n, _) in rx.try_iter() {
            if !applying {
                reported = n;
            }
        }

        let (store, recovery) = ImageStore::open(&dir, Default::default())
            .unwrap_or_else(|e| panic!("trial {trial}: recovery failed: {e}"));
        let ImageStatus::Committed { epoch } = store.status() else {
            panic!(
                "trial {trial}: image not committed after recovery: {:?}",
                store.status()
            );
        };
        assert!(
            epoch == reported || epoch == reported + 1,
            "trial {trial}: recovered epoch {epoch}, child had reported {reported}"
        );
        let model = model_at(seed, epoch);
        assert!(
            store.memory() == &model.mem[..],
            "trial {trial}: image differs from epoch {epoch}"
        );
        assert_eq!(store.device_state(), format!("device@{epoch}").as_bytes());
        if std::env::var_os("CRASH_DEBUG").is_some() {
            eprintln!(
                "trial {trial}: window {window:?} reported {reported} recovered {epoch} {recovery:?}"
            );
        }
        let outcome = match recovery {
            Recovery::Clean => "no journal to act on",
            Recovery::Replayed { .. } => "journal replayed",
            Recovery::Discarded { .. } => "journal discarded",
        };
        let which = if epoch == reported { "N-1" } else { "N" };
        *outcomes
            .entry(format!("{outcome}, recovered epoch {which}"))
            .or_default() += 1;
    }
    println!(
        "crash: {TRIALS} SIGKILL trials inside apply in {:.1}s, every recovery exact:",
        started.elapsed().as_secs_f64()
    );
    for (outcome, n) in outcomes {
        println!("  {n:>3}  {outcome}");
    }
    println!("test result: ok. {TRIALS} passed; 0 failed");
}
