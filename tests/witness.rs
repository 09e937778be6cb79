//! The etcd witness (`[witness]`): its key moves only by compare-and-swap
//! against a real etcd (Debian's `etcd-server`), a failover moves it to the
//! promoted host, a witness that does not answer stops every new role, and
//! a pair whose hosts disagree about the witness does not start. The
//! partition checks with a witness are in `chaos.rs` (namespaces).
//! Needs etcd and etcdctl (`apt-get install etcd-server etcd-client`); the
//! pair tests need /dev/kvm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Etcd, Pair};
use understudy_common::ids::Generation;
use understudy_common::status::Stats;
use understudy_common::witness::{Claim, Swap, Witness, WitnessConfig, WitnessError};

fn config(etcd: &Etcd) -> WitnessConfig {
    WitnessConfig {
        endpoints: vec![format!("http://{}", etcd.client)],
        tls: None,
        server_name: None,
        prefix: "/understudy/".into(),
        timeout: Duration::from_millis(300),
        check_interval: Duration::from_millis(200),
    }
}

fn witness(etcd: &Etcd, me: &str) -> (Witness, Arc<Stats>) {
    let stats = Arc::new(Stats::new(
        "vm1",
        understudy_common::ids::Role::Primary,
        String::new(),
        1,
    ));
    let w = Witness::new(&config(etcd), "vm1", me.into(), stats.clone()).unwrap();
    (w, stats)
}

fn claim(generation: u64, owner: &str, protected: bool) -> Claim {
    Claim {
        generation: Generation(generation),
        owner: owner.into(),
        protected,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_moves_only_by_compare_and_swap() {
    let etcd = Etcd::start(None, common::free_addr());
    let (a, a_stats) = witness(&etcd, "a:1");
    let (b, _) = witness(&etcd, "b:1");
    assert_eq!(a.read().await.unwrap(), None);

    // Only one host creates the key.
    let first = a.swap("boot", None, &claim(1, "a:1", false)).await.unwrap();
    let Swap::Won(held) = first else {
        panic!("{first:?}")
    };
    let second = b.swap("boot", None, &claim(1, "b:1", false)).await.unwrap();
    assert!(
        matches!(&second, Swap::Lost(Some(h)) if h.claim == claim(1, "a:1", false)),
        "{second:?}"
    );
    assert_eq!(
        etcd.get("/understudy/vm1"),
        "generation=1 owner=a:1 state=unprotected"
    );

    // Two hosts racing from the same revision: exactly one wins, every
    // time, and the loser learns what the key holds.
    let mut held = held;
    for round in 0..20u64 {
        let g = held.claim.generation.0;
        let to_a = claim(g, "a:1", round % 2 == 0);
        let to_b = claim(g + 1, "b:1", false);
        let (ra, rb) = tokio::join!(
            a.swap("race", Some(&held), &to_a),
            b.swap("race", Some(&held), &to_b)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        match (&ra, &rb) {
            (Swap::Won(h), Swap::Lost(Some(now))) | (Swap::Lost(Some(now)), Swap::Won(h)) => {
                assert_eq!(h, now, "round {round}");
                held = h.clone();
            }
            other => panic!("round {round}: {other:?}"),
        }
        if held.claim.owner == "b:1" {
            // Give it back for the next round.
            let back = claim(held.claim.generation.0, "a:1", false);
            let Swap::Won(h) = b.swap("back", Some(&held), &back).await.unwrap() else {
                panic!("round {round}: cannot move the key back")
            };
            held = h;
        }
    }

    // A swap whose answer was lost and is sent again finds its own claim:
    // won, not lost.
    let target = claim(held.claim.generation.0, "a:1", true);
    let Swap::Won(now) = a.swap("once", Some(&held), &target).await.unwrap() else {
        panic!("first swap")
    };
    let again = a.swap("again", Some(&held), &target).await.unwrap();
    assert_eq!(again, Swap::Won(now.clone()));
    let status = a_stats.witness().unwrap();
    assert!(status.reachable);
    assert_eq!(status.last_decision, "again");
    assert_eq!(status.last_outcome, "won");
    assert_eq!(status.claim, target.to_string());

    // Something understudy never writes: an error naming the fix, never a
    // claim.
    assert!(
        etcd.ctl(&["put", "/understudy/vm1", "junk"])
            .status
            .success()
    );
    let garbled = a.read().await.unwrap_err();
    assert!(
        matches!(garbled, WitnessError::Garbled { .. })
            && garbled.to_string().contains("etcdctl del /understudy/vm1"),
        "{garbled}"
    );
    let stale = a.swap("over junk", Some(&now), &target).await.unwrap_err();
    assert!(matches!(stale, WitnessError::Garbled { .. }), "{stale}");

    // A witness that does not answer: "unreachable" within the timeout,
    // in status and metrics.
    etcd.freeze(true);
    let asked = Instant::now();
    let e = a.read().await.unwrap_err();
    let took = asked.elapsed();
    etcd.freeze(false);
    assert!(matches!(e, WitnessError::Unreachable(_)), "{e}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(!a_stats.witness().unwrap().reachable);
    let metrics = a_stats.render_metrics();
    assert!(
        metrics.contains("understudy_witness_reachable 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("understudy_witness_decisions_total{outcome=\"won\"}"),
        "{metrics}"
    );
}

fn witness_settings(etcd: &Etcd) -> String {
    format!(
        "[witness]\nendpoints = [\"http://{}\"]\ntimeout = \"300ms\"\ncheck_interval = \"200ms\"\n",
        etcd.client
    )
}

/// A kill -9 of the primary: the backup moves the key to itself before it
/// runs the VM, the old primary comes back as the backup, and the key says
/// protected again. Every acked write survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_moves_the_key_to_the_promoted_host() {
    let _serial = common::serial().await;
    let etcd = Etcd::start(None, common::free_addr());
    // Deposed, the primary rejoins as the backup.
    let mut pair = Pair::switchable("kv", &witness_settings(&etcd));
    pair.start_primary();
    pair.wait_protected().await;
    let key = "/understudy/test-vm";
    let primary = pair.addrs.primary_control.to_string();
    let backup = pair.addrs.backup_control.to_string();
    common::wait_for(Duration::from_secs(10), || {
        etcd.get(key) == format!("generation=1 owner={primary} state=protected")
    })
    .unwrap_or_else(|()| panic!("key: {:?}\n{}", etcd.get(key), pair.logs()));
    let status = common::status(pair.addrs.primary_control).await.unwrap();
    let w = status.witness.expect("status shows the witness");
    assert!(w.reachable && w.claim.contains("state=protected"), "{w:?}");

    let mut client = common::kv_client(pair.addrs.primary_console).await;
    for i in 0..20 {
        client.send(&format!("SET k{i} v{i}")).await.unwrap();
        client.expect_line("OK").await;
    }
    pair.kill_primary();
    pair.wait_promoted().await;
    assert_eq!(
        etcd.get(key),
        format!("generation=2 owner={backup} state=unprotected"),
        "{}",
        pair.logs()
    );
    let promoted = common::status(pair.addrs.backup_control).await.unwrap();
    let w = promoted.witness.unwrap();
    assert_eq!(w.last_decision, "promote after silence", "{w:?}");
    assert_eq!(w.last_outcome, "won");
    eprintln!(
        "failover with the witness: detect {} µs, promote to running {} µs, of which the swap {} µs",
        promoted.promotion_detect_micros, promoted.promotion_resume_micros, w.last_decision_micros
    );
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    for i in 0..20 {
        client.send(&format!("GET k{i}")).await.unwrap();
        assert_eq!(
            client.next(Duration::from_secs(10)).await.unwrap(),
            Some(format!("VALUE v{i}"))
        );
    }
    // The old primary's host restarts: deposed, it rejoins as the backup
    // and the new primary's key says protected.
    pair.start_primary();
    common::wait_for(Duration::from_secs(60), || {
        etcd.get(key) == format!("generation=2 owner={backup} state=protected")
    })
    .unwrap_or_else(|()| panic!("key: {:?}\n{}", etcd.get(key), pair.logs()));
}

/// A witness that does not answer: the pair runs on protected, but when
/// the primary dies the backup does not promote until the witness answers
/// again; then it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_answer_from_the_witness_nobody_takes_a_new_role() {
    let _serial = common::serial().await;
    let etcd = Etcd::start(None, common::free_addr());
    let mut pair = Pair::new("counter", &witness_settings(&etcd));
    pair.start_primary();
    pair.wait_protected().await;
    let key = "/understudy/test-vm";
    common::wait_for(Duration::from_secs(10), || {
        etcd.get(key).ends_with("state=protected")
    })
    .unwrap_or_else(|()| panic!("key: {:?}\n{}", etcd.get(key), pair.logs()));

    etcd.freeze(true);
    // Still protected: no role changes, nothing to ask.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = common::status(pair.addrs.primary_control).await.unwrap();
    assert!(s.protected && s.role == "primary", "{s:?}");

    pair.kill_primary();
    common::wait_status(
        &pair,
        pair.addrs.backup_control,
        "backup waits for the witness",
        Duration::from_secs(10),
        |s| s.state_kind == "witness-unreachable",
    )
    .await;
    // Hellos keep the backup's async side taking its state lock while the
    // backup asks the witness again and again. A promotion that held that
    // lock across its request to etcd once starved the runtime that carries
    // the request, and the backup hung for good (found by the long chaos run).
    let replication = pair.addrs.replication;
    let callers: Vec<_> = (0..4u64)
        .map(|i| {
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    let Ok(mut c) =
                        understudy_proto::replication_client::ReplicationClient::connect(format!(
                            "http://{replication}"
                        ))
                        .await
                    else {
                        continue;
                    };
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), c.hello(hello(i))).await;
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let s = tokio::time::timeout(
        Duration::from_secs(2),
        common::status(pair.addrs.backup_control),
    )
    .await
    .unwrap_or_else(|_| panic!("the backup stopped answering\n{}", pair.logs()))
    .unwrap();
    assert_eq!(s.role, "backup", "promoted without the witness: {s:?}");

    let thawed = Instant::now();
    etcd.freeze(false);
    pair.wait_promoted().await;
    eprintln!(
        "promoted {:?} after the witness answered again",
        thawed.elapsed()
    );
    assert!(
        etcd.get(key).starts_with("generation=2 "),
        "{}",
        etcd.get(key)
    );
}

/// A Hello as a primary of the test pair would send it (session `n`).
fn hello(n: u64) -> understudy_proto::HelloRequest {
    understudy_proto::HelloRequest {
        protocol_version: understudy_proto::PROTOCOL_VERSION,
        vm_id: "test-vm".into(),
        generation: 1,
        ram_bytes: 16 << 20,
        session: n + 1,
        incarnation: 0x1234_5678,
        previous: None,
        heartbeat_key: vec![7; 32].into(),
        mode: 0,
        migration: false,
        witness_key: "/understudy/test-vm".into(),
    }
}

/// One host with a witness and one without: the primary is refused at its
/// first Hello, with the fix named, and never boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_disagree_about_the_witness_do_not_pair() {
    let _serial = common::serial().await;
    let etcd = Etcd::start(None, common::free_addr());
    let mut pair = Pair::new("counter", "");
    let endpoints = format!("witness.endpoints=[\"http://{}\"]", etcd.client);
    pair.primary = Some(pair.spawn("primary", &[&endpoints]));
    let exit = pair.wait_primary_exit(Duration::from_secs(20));
    assert!(!exit.success());
    let logs = pair.logs();
    assert!(
        logs.contains("Give both hosts the same [witness] section"),
        "{logs}"
    );
    assert_eq!(etcd.get("/understudy/test-vm"), "", "it never claimed");
}
