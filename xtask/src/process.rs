//! Emulator processes: started one way, followed one way, and never
//! outliving the run that started them.
//!
//! Every emulator xtask runs (QEMU and Bochs for hv's runs, QEMU for the
//! benchmarks' Linux references and the capture kernel's self-test) is
//! started by [`spawn`], held by a [`KillOnDrop`] guard, and followed by
//! [`follow`]: its serial log read as it grows, a look at every new piece,
//! its exit noticed, its time limit kept.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::serial::{FileTail, LineBuffer};

/// An emulator process that is killed (and reaped) when dropped.
///
/// Every way out of a run — success, timeout, an early `?`, a panic in a
/// test — drops the guard, so no QEMU or Bochs is ever left spinning on the
/// host's two cores. The emulator stays in xtask's process group, so a
/// Ctrl-C at the terminal ends it with xtask.
#[derive(Debug)]
pub struct KillOnDrop {
    child: Child,
}

impl KillOnDrop {
    /// Takes ownership of a freshly spawned child.
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    /// The child's exit status if it has ended, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the child now and waits for it; harmless if it already ended.
    pub fn kill(&mut self) {
        // Both fail only when the child already ended and was reaped, which
        // is exactly the state we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens `path` for an emulator's stdout and stderr (one file, two
/// handles).
pub fn log_files(path: &Path) -> Result<(File, File)> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let copy = file.try_clone().context("duplicating a log file handle")?;
    Ok((file, copy))
}

/// Starts an emulator: nothing on its stdin, its stdout and stderr into
/// the files given, killed when the guard is dropped. `what` names it in
/// the error when it cannot start.
pub fn spawn(command: &mut Command, stdout: File, stderr: File, what: &str) -> Result<KillOnDrop> {
    let child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("could not start {what}"))?;
    Ok(KillOnDrop::new(child))
}

/// [`spawn`] with stdout and stderr both into the file at `log`.
pub fn spawn_logged(command: &mut Command, log: &Path, what: &str) -> Result<KillOnDrop> {
    let (stdout, stderr) = log_files(log)?;
    spawn(command, stdout, stderr, what)
}

/// An emulator's serial log as it grows: new bytes, and the lines they
/// complete.
#[derive(Debug)]
pub struct SerialLog {
    path: PathBuf,
    tail: FileTail,
    lines: LineBuffer,
}

impl SerialLog {
    /// Follows the log at `path` from its start (it may not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            tail: FileTail::new(path),
            lines: LineBuffer::default(),
        }
    }

    /// What arrived since the last read: the bytes, and the lines now
    /// complete.
    pub fn read(&mut self) -> Result<(Vec<u8>, Vec<String>)> {
        let bytes = self
            .tail
            .read_new()
            .with_context(|| format!("reading {}", self.path.display()))?;
        let lines = self.lines.push(&bytes);
        Ok((bytes, lines))
    }

    /// The unterminated last line, once the emulator has ended.
    pub fn finish(&mut self) -> Option<String> {
        self.lines.finish()
    }
}

/// What one look at a running emulator sees.
#[derive(Debug)]
pub struct Look<'a> {
    /// The serial bytes that arrived since the last look.
    pub bytes: &'a [u8],
    /// The serial lines they complete.
    pub lines: &'a [String],
    /// Whether the emulator has exited (the bytes are then all it wrote).
    pub exited: bool,
}

/// How following an emulator ended.
#[derive(Debug)]
pub enum Followed<T> {
    /// The look found what it waited for (the emulator may still run).
    Found(T),
    /// The emulator exited first.
    Exited(ExitStatus),
    /// The time ran out first (the emulator still runs).
    TimedOut,
}

/// Follows `child` and its serial log until `look` returns something, the
/// emulator exits or `timeout` runs out, looking every `interval`. Each
/// round checks for the exit before it reads, so the read after an exit
/// sees everything the emulator wrote, and that read is looked at too.
/// The emulator is not killed here: the caller decides (its guard does it
/// at the latest).
pub fn follow<T>(
    child: &mut KillOnDrop,
    serial: &mut SerialLog,
    timeout: Duration,
    interval: Duration,
    mut look: impl FnMut(Look<'_>) -> Result<Option<T>>,
) -> Result<Followed<T>> {
    let started = Instant::now();
    loop {
        let exited = child.try_wait().context("waiting for the emulator")?;
        let (bytes, lines) = serial.read()?;
        if let Some(found) = look(Look {
            bytes: &bytes,
            lines: &lines,
            exited: exited.is_some(),
        })? {
            return Ok(Followed::Found(found));
        }
        if let Some(status) = exited {
            return Ok(Followed::Exited(status));
        }
        if started.elapsed() >= timeout {
            return Ok(Followed::TimedOut);
        }
        thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell standing in for an emulator that writes `script`'s output
    /// to a serial log.
    fn fake(name: &str, script: &str) -> (KillOnDrop, PathBuf) {
        let dir = std::env::temp_dir().join(format!("xtask-process-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let _ = std::fs::remove_file(&log);
        let child = spawn_logged(
            Command::new("sh").arg("-c").arg(script).env("LOG", &log),
            &dir.join("emulator.log"),
            "sh",
        )
        .unwrap();
        (child, log)
    }

    /// [`follow`] for 20 s at most, `found` asked of each round's lines;
    /// also every line seen.
    fn follow_lines<T>(
        child: &mut KillOnDrop,
        serial: &mut SerialLog,
        found: impl Fn(&[String]) -> Option<T>,
    ) -> (Followed<T>, Vec<String>) {
        let mut seen = Vec::new();
        let followed = follow(
            child,
            serial,
            Duration::from_secs(20),
            Duration::from_millis(10),
            |look| {
                seen.extend(look.lines.iter().cloned());
                Ok(found(look.lines))
            },
        )
        .unwrap();
        (followed, seen)
    }

    #[test]
    fn finds_a_marker_while_the_emulator_runs() {
        let (mut child, log) = fake(
            "found",
            r#"printf 'a\nb\nmarker here\n' > "$LOG"; exec sleep 30"#,
        );
        let mut serial = SerialLog::new(&log);
        let (followed, seen) = follow_lines(&mut child, &mut serial, |lines| {
            lines.iter().position(|l| l.contains("marker"))
        });
        assert!(matches!(followed, Followed::Found(2)), "{followed:?}");
        assert_eq!(seen, ["a", "b", "marker here"]);
        assert!(child.try_wait().unwrap().is_none(), "not killed by follow");
    }

    #[test]
    fn the_read_after_the_exit_is_looked_at() {
        let (mut child, log) = fake("exit", r#"printf 'x\ny' > "$LOG"; exit 3"#);
        let mut serial = SerialLog::new(&log);
        let (followed, lines) = follow_lines(&mut child, &mut serial, |_| None::<()>);
        let Followed::Exited(status) = followed else {
            panic!("{followed:?}");
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(lines, ["x"]);
        assert_eq!(serial.finish().as_deref(), Some("y"));
    }

    #[test]
    fn time_runs_out() {
        let (mut child, log) = fake("timeout", r#"exec sleep 30"#);
        let started = Instant::now();
        let followed = follow(
            &mut child,
            &mut SerialLog::new(&log),
            Duration::from_millis(200),
            Duration::from_millis(10),
            |_| Ok(None::<()>),
        )
        .unwrap();
        assert!(matches!(followed, Followed::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(10));
        child.kill();
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn an_emulator_that_cannot_start_is_named() {
        let (stdout, stderr) = log_files(
            &std::env::temp_dir().join(format!("xtask-process-missing-{}.log", std::process::id())),
        )
        .unwrap();
        let error = spawn(
            &mut Command::new("/nonexistent/qemu"),
            stdout,
            stderr,
            "qemu-system-x86_64",
        )
        .unwrap_err();
        assert_eq!(error.to_string(), "could not start qemu-system-x86_64");
    }
}
