//! Watching a running emulator: serial log, exit and time limit.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::process::{Followed, KillOnDrop, SerialLog, follow};
use crate::report::{End, ReportCollector};
use crate::serial::strip_ansi;

/// What hv's capture mode prints once it has read the crashed
/// hypervisor's ELF core header: `capture: N CPU notes; streaming ...`.
pub const CAPTURE_HEADER_MARKER: &str = " CPU notes; streaming the dump";

/// How long the serial log must stay quiet before xtask ends a run whose
/// crash path is over but which does not end the emulator itself.
const QUIET_BEFORE_STOP: Duration = Duration::from_millis(1500);

/// When xtask ends the emulator itself, before it exits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopWhen {
    /// Never: the emulator ends the run (or the time limit does).
    #[default]
    Exit,
    /// Once hv reported `done` (a command line without `finish=exit`).
    Done,
    /// Once hv's capture mode entered and read the core header (its
    /// `entered` report line and its `N CPU notes; streaming` line): the
    /// dump itself is not waited for.
    CaptureEntered,
    /// Once the crash path and its capture are over, on a command line
    /// without `finish=exit` (hv and its capture image halt): the capture
    /// kernel streamed its dump or failed, hv refused the jump, or, with
    /// no capture kernel loaded, the crash report is out; and the serial
    /// log was quiet for a moment.
    CrashOver,
}

/// The platform's NMI button, pressed through QEMU's QMP socket some time
/// after hv's boot report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NmiButton {
    /// QEMU's QMP socket.
    pub socket: std::path::PathBuf,
    /// How long after the boot report.
    pub after: Duration,
}

/// What became of the NMI button.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pressed {
    /// When, from the emulator's start.
    pub at: Duration,
    /// From the boot report to the press.
    pub after_report: Duration,
    /// QMP's answer: `Ok`, or why it failed.
    pub result: Result<(), String>,
}

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
    /// Why xtask ended the emulator itself (a [`StopWhen`] rule), if it
    /// did.
    pub stopped_by_xtask: Option<&'static str>,
    /// The NMI button, if it was pressed.
    pub pressed: Option<Pressed>,
}

/// How a watch ends early, and what it does on the way.
#[derive(Debug, Clone, Default)]
pub(crate) struct WatchRules {
    /// When xtask ends the emulator itself.
    pub stop: StopWhen,
    /// The NMI button, if it is to be pressed.
    pub button: Option<NmiButton>,
    /// Called with every serial line as it arrives.
    pub on_line: Option<super::LineHook>,
}

/// Whether the boot report is out: its one line carries `smp` and `virt`.
fn boot_reported(report: &Value) -> bool {
    report["smp"].is_object() && report["virt"].is_object()
}

/// Why the run is over by `stop`'s rule, if it is.
fn over(stop: StopWhen, report: &Value, header_read: bool, quiet: bool) -> Option<&'static str> {
    let capture = &report["capture"];
    match stop {
        StopWhen::Exit => None,
        StopWhen::Done => {
            (report["done"] == Value::Bool(true)).then_some("hv reported done (it halts)")
        }
        StopWhen::CaptureEntered => {
            let entered = capture["entered"] == Value::Bool(true);
            (entered && header_read).then_some(
                "the capture kernel entered and read the core header (the dump not waited for)",
            )
        }
        StopWhen::CrashOver => {
            let capture_over = capture["streamed"] == Value::Bool(true)
                || capture["error"].is_string() && capture["entered"] == Value::Bool(true)
                || capture["refused"].is_string()
                || capture["purgatory_refused"].is_string();
            let crash_over = report["crash"].is_object() && capture["loaded"] != Value::Bool(true);
            (quiet && (capture_over || crash_over))
                .then_some("the crash path and its capture are over (hv halts: no finish=exit)")
        }
    }
}

/// Follows `serial_log` while `child` runs, feeding every line to a report
/// collector and, with `echo`, to the terminal; kills the child when
/// `timeout` runs out, or once `rules.stop` says the run is over (the end
/// is then `Exited(None)`); presses the NMI button when `rules` has one.
pub(crate) fn watch(
    child: &mut KillOnDrop,
    serial_log: &Path,
    timeout: Duration,
    echo: bool,
    rules: &WatchRules,
) -> Result<Watched> {
    let started = Instant::now();
    let mut log = SerialLog::new(serial_log);
    let mut serial = Serial {
        collector: ReportCollector::default(),
        bytes: 0,
        header_read: false,
        last_bytes: Instant::now(),
        echo,
        on_line: rules.on_line.as_ref(),
    };
    let mut reported_at = None;
    let mut pressed = None;

    let followed = follow(child, &mut log, timeout, POLL_INTERVAL, |look| {
        serial.take(look.bytes, look.lines);
        if look.exited {
            return Ok(None);
        }
        if let Some(button) = &rules.button
            && pressed.is_none()
        {
            if reported_at.is_none() && boot_reported(serial.collector.report()) {
                reported_at = Some(Instant::now());
            }
            if let Some(at) = reported_at.filter(|at: &Instant| at.elapsed() >= button.after) {
                let result = super::qmp::inject_nmi(&button.socket).map_err(|e| format!("{e:#}"));
                if echo {
                    let said = match &result {
                        Ok(()) => "ok".to_owned(),
                        Err(error) => format!("failed: {error}"),
                    };
                    eprintln!("xtask: NMI button pressed (QMP inject-nmi): {said}");
                }
                pressed = Some(Pressed {
                    at: started.elapsed(),
                    after_report: at.elapsed(),
                    result,
                });
            }
        }
        let quiet = serial.last_bytes.elapsed() >= QUIET_BEFORE_STOP;
        Ok(over(
            rules.stop,
            serial.collector.report(),
            serial.header_read,
            quiet,
        ))
    })?;
    let (end, stopped_by_xtask) = match followed {
        Followed::Exited(status) => (End::Exited(status.code()), None),
        Followed::Found(why) => (End::Exited(None), Some(why)),
        Followed::TimedOut => (End::TimedOut(timeout), None),
    };
    if !matches!(followed, Followed::Exited(_)) {
        child.kill();
        let (bytes, lines) = log.read()?;
        serial.take(&bytes, &lines);
    }
    if let Some(last) = log.finish() {
        consume(&mut serial.collector, &last, echo);
        if let Some(hook) = &rules.on_line {
            (hook.0)(&last);
        }
    }
    Ok(Watched {
        end,
        elapsed: started.elapsed(),
        collector: serial.collector,
        serial_bytes: serial.bytes,
        stopped_by_xtask,
        pressed,
    })
}

/// The serial log as it is read: its report, and what the stop rules ask.
struct Serial<'a> {
    collector: ReportCollector,
    /// How many bytes arrived.
    bytes: usize,
    /// Whether hv's capture mode said it read the core header.
    header_read: bool,
    /// When the last bytes arrived.
    last_bytes: Instant,
    echo: bool,
    on_line: Option<&'a super::LineHook>,
}

impl Serial<'_> {
    /// Takes what arrived and feeds its lines on.
    fn take(&mut self, bytes: &[u8], lines: &[String]) {
        if !bytes.is_empty() {
            self.bytes += bytes.len();
            self.last_bytes = Instant::now();
        }
        for line in lines {
            self.header_read |= line.contains(CAPTURE_HEADER_MARKER);
            consume(&mut self.collector, line, self.echo);
            if let Some(hook) = self.on_line {
                (hook.0)(line);
            }
        }
    }
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
        let watched = watch(
            &mut child,
            &log,
            Duration::from_secs(20),
            false,
            &WatchRules::default(),
        )
        .unwrap();
        assert_eq!(watched.end, End::Exited(Some(33)));
        assert_eq!(
            watched.collector.report(),
            &serde_json::json!({"cpus": {"possible": 2}, "done": true})
        );
        assert_eq!(watched.collector.lines_seen(), 3);
    }

    #[test]
    fn stops_the_emulator_at_done_when_asked() {
        let (mut child, log) = fake_emulator(
            "done",
            r#"printf '@hv {"done":true}\n' > "$LOG"; exec sleep 30"#,
        );
        let started = Instant::now();
        let rules = WatchRules {
            stop: StopWhen::Done,
            ..WatchRules::default()
        };
        let watched = watch(&mut child, &log, Duration::from_secs(20), false, &rules).unwrap();
        assert_eq!(watched.end, End::Exited(None));
        assert!(watched.stopped_by_xtask.is_some());
        assert_eq!(watched.collector.report()["done"], true);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(child.try_wait().unwrap().is_some(), "the child still runs");
    }

    #[test]
    fn kills_the_emulator_when_time_runs_out() {
        let (mut child, log) = fake_emulator("timeout", r#"echo started > "$LOG"; exec sleep 30"#);
        let started = Instant::now();
        let watched = watch(
            &mut child,
            &log,
            Duration::from_millis(300),
            false,
            &WatchRules::default(),
        )
        .unwrap();
        assert_eq!(watched.end, End::TimedOut(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(child.try_wait().unwrap().is_some(), "the child still runs");
    }
}
