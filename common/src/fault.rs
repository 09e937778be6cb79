//! Fault injection for tests: named points in the daemons that fail on
//! demand, so the tests can prove that an internal error ends like a crash
//! (and is survived like one) without waiting for real hardware to fail.
//!
//! `UNDERSTUDY_FAULTS=point[@n][~ms][,…]` makes [`check`] at `point` fail
//! from its n-th call on (default: the first); with `~ms` it stalls that many
//! milliseconds instead of failing (a slow disk, a stuck thread). Unset,
//! every check passes and costs one atomic load. A daemon started with faults
//! says so loudly.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The environment variable that arms fault points.
pub const ENV: &str = "UNDERSTUDY_FAULTS";

struct Point {
    /// Fail (or stall) from this call on.
    from: u64,
    calls: u64,
    /// Stall this long instead of failing.
    stall: Option<std::time::Duration>,
}

struct Armed {
    points: Mutex<HashMap<String, Point>>,
}

fn parse(spec: &str) -> (String, Point) {
    let (rest, stall) = match spec.split_once('~') {
        Some((rest, ms)) => (rest, ms.parse().ok().map(std::time::Duration::from_millis)),
        None => (spec, None),
    };
    let (name, from) = match rest.split_once('@') {
        Some((name, n)) => (name, n.parse().unwrap_or(1).max(1)),
        None => (rest, 1),
    };
    (
        name.to_owned(),
        Point {
            from,
            calls: 0,
            stall,
        },
    )
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let points = spec
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| parse(p.trim()))
                .collect();
            Some(Armed {
                points: Mutex::new(points),
            })
        })
        .as_ref()
}

/// The armed fault points, if any (for a warning at start-up).
pub fn describe() -> Option<String> {
    armed().map(|_| std::env::var(ENV).unwrap_or_default())
}

/// Fails (with the point's name) if `point` is armed and its turn has come.
pub fn check(point: &'static str) -> Result<(), &'static str> {
    if let Some(stall) = turn(point)? {
        std::thread::sleep(stall);
    }
    Ok(())
}

/// [`check`] for async code: a stall sleeps the task, not its thread.
pub async fn check_async(point: &'static str) -> Result<(), &'static str> {
    if let Some(stall) = turn(point)? {
        tokio::time::sleep(stall).await;
    }
    Ok(())
}

/// Counts a call at `point`: its failure, or how long it stalls.
fn turn(point: &'static str) -> Result<Option<std::time::Duration>, &'static str> {
    let Some(armed) = armed() else {
        return Ok(None);
    };
    let mut points = armed.points.lock().unwrap_or_else(|p| p.into_inner());
    let Some(p) = points.get_mut(point) else {
        return Ok(None);
    };
    p.calls += 1;
    if p.calls < p.from {
        return Ok(None);
    }
    tracing::warn!(point, call = p.calls, stall = ?p.stall, "injected fault");
    match p.stall {
        Some(stall) => Ok(Some(stall)),
        None => Err(point),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_points() {
        let (name, p) = parse("backup.apply@3~400");
        assert_eq!(
            (name.as_str(), p.from, p.stall),
            (
                "backup.apply",
                3,
                Some(std::time::Duration::from_millis(400))
            )
        );
        let (name, p) = parse("primary.capture");
        assert_eq!(
            (name.as_str(), p.from, p.stall),
            ("primary.capture", 1, None)
        );
    }
}
