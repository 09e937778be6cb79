//! Replay mode's lag: log segments a replica has not replayed yet, with the
//! time each was shipped (primary) or received (backup). How far behind a
//! replica is, in exits and in time, is read off the oldest one it has not
//! passed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Segments not yet replayed: (end exit, when it was shipped or received).
#[derive(Debug, Default)]
pub struct Backlog(VecDeque<(u64, Instant)>);

impl Backlog {
    /// A segment that takes the log to exit `end` left (or arrived) now.
    pub fn push(&mut self, end: u64) {
        self.0.push_back((end, Instant::now()));
    }

    /// Forgets every segment (a new session).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The replica is at exit `at`: forgets what it passed and returns how
    /// far it is behind the newest segment (exits) and since when it has
    /// been behind the oldest one it has not passed.
    pub fn behind(&mut self, at: u64) -> (u64, Duration) {
        while self.0.front().is_some_and(|&(end, _)| end <= at) {
            self.0.pop_front();
        }
        let age = self
            .0
            .front()
            .map(|&(_, t)| t.elapsed())
            .unwrap_or_default();
        let exits = self
            .0
            .back()
            .map(|&(end, _)| end.saturating_sub(at))
            .unwrap_or_default();
        (exits, age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_behind_from_the_oldest_segment_it_has_not_passed() {
        let mut b = Backlog::default();
        assert_eq!(b.behind(0), (0, Duration::ZERO));
        b.push(10);
        std::thread::sleep(Duration::from_millis(20));
        b.push(20);
        let (exits, age) = b.behind(5);
        assert_eq!(exits, 15);
        assert!(age >= Duration::from_millis(20), "{age:?}");
        // Past the first segment: only the second's age counts.
        let (exits, age) = b.behind(10);
        assert_eq!(exits, 10);
        assert!(age < Duration::from_millis(20), "{age:?}");
        assert_eq!(b.behind(20), (0, Duration::ZERO));
    }
}
