//! Crash safety of the image store: a child process applies epochs in a loop
//! and is killed with SIGKILL at a random instant; recovery must then yield the
//! image of exactly the epoch it last reported committed, or the next one (if
//! the kill came after the commit point but before the report), page for page.
//!
//! Runs as its own harness: `cargo test -p understudy-checkpoint --test crash`.
//! With `UNDERSTUDY_CRASH_CHILD=<dir>` it is the child.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Model, Rng, ship, synced_store};
use understudy_checkpoint::epoch::EpochKind;
use understudy_checkpoint::store::{ImageStatus, ImageStore, Recovery};
use understudy_checkpoint::{CodecPolicy, CommittedImage};

const PAGES: u32 = 4096;
const WRITES_PER_EPOCH: usize = 1500;
const TRIALS: u64 = 40;

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
    let (mut sender, mut store) = synced_store(std::path::Path::new(dir), &model, CodecPolicy::ADAPTIVE);
    let mut out = std::io::stdout();
    writeln!(out, "committed 1").unwrap();
    for epoch in 2.. {
        let touched: Vec<u32> = (0..WRITES_PER_EPOCH).map(|_| model.mutate(&mut rng)).collect();
        ship(&mut sender, &mut store, &model, epoch, EpochKind::Checkpoint, &touched);
        writeln!(out, "committed {epoch}").unwrap();
        out.flush().unwrap();
    }
}

fn main() {
    if let Ok(dir) = std::env::var("UNDERSTUDY_CRASH_CHILD") {
        let seed = std::env::var("UNDERSTUDY_CRASH_SEED").unwrap().parse().unwrap();
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
                if let Some(n) = line.strip_prefix("committed ").and_then(|n| n.parse::<u64>().ok()) {
                    let _ = tx.send(n);
                }
            }
        });
        // Wait for the first commit, then kill somewhere in the next epochs.
        let first = rx.recv_timeout(Duration::from_secs(120)).expect("child committed epoch 1");
        std::thread::sleep(Duration::from_micros(rng.below(400_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let reported = rx.try_iter().last().unwrap_or(first);

        let (store, recovery) = ImageStore::open(&dir, Default::default())
            .unwrap_or_else(|e| panic!("trial {trial}: recovery failed: {e}"));
        let ImageStatus::Committed { epoch } = store.status() else {
            panic!("trial {trial}: image not committed after recovery: {:?}", store.status());
        };
        assert!(
            epoch == reported || epoch == reported + 1,
            "trial {trial}: recovered epoch {epoch}, child had reported {reported}"
        );
        let model = model_at(seed, epoch);
        assert!(store.memory() == &model.mem[..], "trial {trial}: image differs from epoch {epoch}");
        assert_eq!(store.device_state(), format!("device@{epoch}").as_bytes());
        let outcome = match recovery {
            Recovery::Clean => "clean".to_owned(),
            Recovery::Replayed { .. } => "journal replayed".to_owned(),
            Recovery::Discarded { .. } => "journal discarded".to_owned(),
        };
        let next = if epoch == reported { "N-1" } else { "N" };
        *outcomes.entry(format!("{outcome}, recovered {next}")).or_default() += 1;
        let _ = store.digest();
    }
    println!("crash: {TRIALS} SIGKILL trials in {:.1}s, every recovery exact:", started.elapsed().as_secs_f64());
    for (outcome, n) in outcomes {
        println!("  {n:>3}  {outcome}");
    }
    println!("test result: ok. {TRIALS} passed; 0 failed");
}
