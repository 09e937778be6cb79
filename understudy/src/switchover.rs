//! `understudyctl switchover`: a planned role swap of a running pair. Finds
//! the host that runs the VM, asks it to hand the VM over (final checkpoint
//! with the guest paused, its ack, `Handover`), and then follows the new
//! primary until the old one, now its backup, has synced and the VM is
//! protected again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use understudy_proto::SwitchoverReply;

use crate::config::Config;
use crate::daemon::Role;
use crate::remote;

/// What one switchover did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The config section of the host that handed the VM over.
    pub from: Role,
    /// What the old primary answered.
    pub reply: SwitchoverReply,
    /// Request sent → answer (the operator's view of the swap).
    pub request_time: Duration,
    /// Answer → the new primary protected by the old one (None: not waited for).
    pub reprotect_time: Option<Duration>,
    /// The new primary's control address.
    pub new_primary: SocketAddr,
}

/// Swaps the roles of the pair `config` describes. With `wait`, also waits
/// (up to that long) until the VM is protected again.
pub async fn run(config: &Config, wait: Option<Duration>) -> Result<Outcome> {
    let tls = config.tls_files();
    let (from, control) = remote::find_primary(config).await?;
    let new_primary = config.host(from.other()).control;
    let sent = Instant::now();
    let reply = remote::request_switchover(control, tls.as_ref()).await?;
    let request_time = sent.elapsed();
    let answered = Instant::now();
    let reprotect_time = match wait {
        None => None,
        Some(limit) => {
            loop {
                if let Ok(s) = remote::fetch_status(new_primary, tls.as_ref()).await
                    && s.role == Role::Primary.name()
                    && s.protected
                {
                    break;
                }
                if answered.elapsed() > limit {
                    bail!(
                        "the VM runs on the other host ({new_primary}) but was not protected again within {limit:?}: \
                         check the old primary's log (it should now be the backup, syncing)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(answered.elapsed())
        }
    };
    Ok(Outcome {
        from,
        reply,
        request_time,
        reprotect_time,
        new_primary,
    })
}

/// [`run`] on a task, waiting up to a minute for the VM to be protected
/// again (drills and benchmarks follow the console meanwhile).
pub fn spawn(config: Config) -> tokio::task::JoinHandle<Result<Outcome>> {
    tokio::spawn(async move { run(&config, Some(Duration::from_secs(60))).await })
}

/// The text `understudyctl switchover` prints.
pub fn render(o: &Outcome, config: &Config) -> String {
    let r = &o.reply;
    let ms = |us: u64| us as f64 / 1e3;
    let mut text = format!(
        "switchover: VM {} now runs on the [{}] table's host (control {}), generation {}\n\
         \x20 downtime          {:>8.1} ms  guest paused for the final checkpoint → running on the other host\n\
         \x20   restore         {:>8.1} ms  the other host maps its image and restores the VM\n\
         \x20 final checkpoint  epoch {}: {} dirty pages, {:.1} KiB shipped\n\
         \x20 request           {:>8.1} ms  understudyctl's request → answer\n",
        config.name,
        o.from.other().name(),
        o.new_primary,
        r.generation,
        ms(r.downtime_micros),
        ms(r.resume_micros),
        r.final_epoch,
        r.final_pages,
        r.final_bytes as f64 / 1024.0,
        o.request_time.as_secs_f64() * 1e3,
    );
    match o.reprotect_time {
        Some(t) => text.push_str(&format!(
            "  protected again   {:>8.2} s   the old primary's host ([{}] table) synced as the backup\n",
            t.as_secs_f64(),
            o.from.name()
        )),
        None => text.push_str(&format!(
            "  the old primary's host ([{}] table) is the backup now; the VM is protected again once it has synced\n",
            o.from.name()
        )),
    }
    text
}
