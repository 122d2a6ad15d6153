//! Watching a running emulator: serial log, exit and time limit.

use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process::KillOnDrop;
use crate::report::{End, ReportCollector};
use crate::serial::{FileTail, LineBuffer, strip_ansi};

/// How often the serial log and the child are polled: short enough to feel
/// live, long enough to cost nothing next to an emulator.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What watching an emulator to its end produced.
#[derive(Debug)]
pub(crate) struct Watched {
    pub end: End,
    pub elapsed: Duration,
    pub collector: ReportCollector,
    /// How many serial bytes arrived (0 means the guest never spoke).
    pub serial_bytes: usize,
}

/// Follows `serial_log` while `child` runs, feeding every line to a report
/// collector and, with `echo`, to the terminal; kills the child when
/// `timeout` runs out.
pub(crate) fn watch(
    child: &mut KillOnDrop,
    serial_log: &Path,
    timeout: Duration,
    echo: bool,
    on_line: Option<&super::LineHook>,
) -> Result<Watched> {
    let started = Instant::now();
    let mut tail = FileTail::new(serial_log);
    let mut lines = LineBuffer::default();
    let mut collector = ReportCollector::default();
    let mut serial_bytes = 0;
    let mut take = |bytes: Vec<u8>, collector: &mut ReportCollector| {
        serial_bytes += bytes.len();
        for line in lines.push(&bytes) {
            consume(collector, &line, echo);
            if let Some(hook) = on_line {
                (hook.0)(&line);
            }
        }
    };

    let end = loop {
        // Check for the exit before reading, so that the read after an exit
        // sees everything the emulator wrote.
        let exited = child.try_wait().context("waiting for the emulator")?;
        take(read(&mut tail, serial_log)?, &mut collector);
        if let Some(status) = exited {
            break End::Exited(status.code());
        }
        if started.elapsed() >= timeout {
            child.kill();
            take(read(&mut tail, serial_log)?, &mut collector);
            break End::TimedOut(timeout);
        }
        thread::sleep(POLL_INTERVAL);
    };
    if let Some(last) = lines.finish() {
        consume(&mut collector, &last, echo);
        if let Some(hook) = on_line {
            (hook.0)(&last);
        }
    }
    Ok(Watched {
        end,
        elapsed: started.elapsed(),
        collector,
        serial_bytes,
    })
}

fn read(tail: &mut FileTail, serial_log: &Path) -> Result<Vec<u8>> {
    tail.read_new()
        .with_context(|| format!("reading {}", serial_log.display()))
}

fn consume(collector: &mut ReportCollector, line: &str, echo: bool) {
    collector.feed_line(line);
    if echo {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (say, piped into `head`) must not end the run.
        let _ = writeln!(stdout, "{}", strip_ansi(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A shell standing in for an emulator that writes `script`'s output to
    /// a serial log.
    fn fake_emulator(name: &str, script: &str) -> (KillOnDrop, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("xtask-watch-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let _ = std::fs::remove_file(&log);
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("LOG", &log)
            .spawn()
            .unwrap();
        (KillOnDrop::new(child), log)
    }

    #[test]
    fn reads_the_report_up_to_the_exit() {
        let (mut child, log) = fake_emulator(
            "exit",
            r#"printf 'GRUB\n@hv {"cpus":{"possible":2}}\n' > "$LOG"; sleep 0.1;
               printf '@hv {"done":true}' >> "$LOG"; exit 33"#,
        );
        let watched = watch(&mut child, &log, Duration::from_secs(20), false, None).unwrap();
        assert_eq!(watched.end, End::Exited(Some(33)));
        assert_eq!(
            watched.collector.report(),
            &serde_json::json!({"cpus": {"possible": 2}, "done": true})
        );
        assert_eq!(watched.collector.lines_seen(), 3);
    }

    #[test]
    fn kills_the_emulator_when_time_runs_out() {
        let (mut child, log) = fake_emulator("timeout", r#"echo started > "$LOG"; exec sleep 30"#);
        let started = Instant::now();
        let watched = watch(&mut child, &log, Duration::from_millis(300), false, None).unwrap();
        assert_eq!(watched.end, End::TimedOut(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(child.try_wait().unwrap().is_some(), "the child still runs");
    }
}
