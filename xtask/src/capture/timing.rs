//! When marker lines reach the serial log, by the wall clock.
//!
//! A second reader of the serial log, next to the run's own, polling every
//! few milliseconds: it notes the first time each marker appears (a marker
//! may have to follow another one, e.g. the capture kernel's banner after
//! the crash). The resolution is the poll interval plus however late the
//! emulator writes its file, a few milliseconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::serial::{FileTail, LineBuffer};

const POLL: Duration = Duration::from_millis(5);

/// A line to time: the first line containing `text`, after the marker
/// numbered `after` was seen (if any).
#[derive(Debug, Clone)]
pub struct Marker {
    /// What the line contains.
    pub text: String,
    /// Index of a marker that must be seen first.
    pub after: Option<usize>,
}

/// The watching thread.
#[derive(Debug)]
pub struct SerialClock {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Option<Duration>>>,
}

impl SerialClock {
    /// Starts watching `serial_log` (which may not exist yet) for
    /// `markers`.
    pub fn start(serial_log: PathBuf, markers: Vec<Marker>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut tail = FileTail::new(&serial_log);
            let mut lines = LineBuffer::default();
            let mut seen: Vec<Option<Duration>> = vec![None; markers.len()];
            loop {
                // Read once more after the stop request: the last lines.
                let last = stopping.load(Ordering::Acquire);
                let bytes = tail.read_new().unwrap_or_default();
                let now = started.elapsed();
                for line in lines.push(&bytes) {
                    note(&markers, &mut seen, &line, now);
                }
                if last {
                    if let Some(line) = lines.finish() {
                        note(&markers, &mut seen, &line, now);
                    }
                    return seen;
                }
                thread::sleep(POLL);
            }
        });
        Self { stop, thread }
    }

    /// Stops watching; when each marker was first seen, from the start.
    pub fn stop(self) -> Vec<Option<Duration>> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

fn note(markers: &[Marker], seen: &mut [Option<Duration>], line: &str, now: Duration) {
    for (i, marker) in markers.iter().enumerate() {
        let ready = marker.after.is_none_or(|first| seen[first].is_some());
        if seen[i].is_none() && ready && line.contains(&marker.text) {
            seen[i] = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    #[test]
    fn markers_are_timed_in_order() {
        let dir = std::env::temp_dir().join(format!("xtask-clock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let _ = fs::remove_file(&log);
        let clock = SerialClock::start(
            log.clone(),
            vec![
                Marker {
                    text: "*** hv: CRASH".into(),
                    after: None,
                },
                Marker {
                    text: "Linux version".into(),
                    after: Some(0),
                },
            ],
        );
        let mut file = fs::File::create(&log).unwrap();
        // A banner before the crash does not count.
        writeln!(file, "Linux version (not this one)").unwrap();
        thread::sleep(Duration::from_millis(30));
        writeln!(file, "*** hv: CRASH on CPU 1").unwrap();
        thread::sleep(Duration::from_millis(100));
        write!(file, "[0.0] Linux version 6.1").unwrap(); // no newline yet
        thread::sleep(Duration::from_millis(30));
        let times = clock.stop();
        fs::remove_dir_all(&dir).unwrap();
        let (crash, linux) = (times[0].unwrap(), times[1].unwrap());
        let gap = linux - crash;
        assert!(
            gap >= Duration::from_millis(90) && gap < Duration::from_secs(2),
            "{gap:?}"
        );
    }

    #[test]
    fn unseen_markers_stay_none() {
        let clock = SerialClock::start(
            std::env::temp_dir().join("xtask-clock-never-written"),
            vec![Marker {
                text: "x".into(),
                after: None,
            }],
        );
        assert_eq!(clock.stop(), [None]);
    }
}
