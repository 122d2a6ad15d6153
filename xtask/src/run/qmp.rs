//! The platform's NMI button, as QEMU offers it: `inject-nmi` on its QMP
//! socket (what a BMC's "diagnostic interrupt" or a front-panel NMI button
//! does to a real machine: an NMI through each CPU's LINT1).
//!
//! QMP speaks one JSON object per line: a greeting, then a reply to each
//! command (`{"return": ...}` or `{"error": ...}`), with events
//! (`{"event": ...}`) in between, which are skipped. A session starts with
//! `qmp_capabilities`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// How long QEMU may take to open its socket, and to answer.
const PATIENCE: Duration = Duration::from_secs(5);

/// The longest path a Unix socket takes (`sun_path`, with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Where a run's QMP socket goes: its directory, or (when that path is too
/// long for a Unix socket) a name in the temporary directory made from it.
pub(crate) fn socket_path(run_dir: &Path) -> PathBuf {
    let inside = run_dir.join("qmp.sock");
    if inside.as_os_str().len() <= SOCKET_PATH_MAX {
        return inside;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in run_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    std::env::temp_dir().join(format!("xtask-qmp-{hash:016x}.sock"))
}

/// QEMU's arguments for a QMP server on `socket` that does not wait for a
/// client.
pub(crate) fn qemu_args(socket: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", socket.display()).into(),
    ]
}

/// Presses the NMI button: connects to QEMU's QMP socket, negotiates and
/// sends `inject-nmi`; the error says where it went wrong.
pub(crate) fn inject_nmi(socket: &Path) -> Result<()> {
    let stream = connect(socket)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let greeting = next_message(&mut reader).context("reading QMP's greeting")?;
    if greeting.get("QMP").is_none() {
        bail!("QMP greeted with {greeting}, not a QMP banner");
    }
    command(&mut reader, &mut writer, "qmp_capabilities")?;
    command(&mut reader, &mut writer, "inject-nmi")
}

/// Connects, waiting for QEMU to open the socket.
fn connect(socket: &Path) -> Result<UnixStream> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(error) if started.elapsed() < PATIENCE => {
                let _ = error;
                thread::sleep(Duration::from_millis(50));
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("connecting to QMP at {}", socket.display()));
            }
        }
    }
}

/// Sends `execute: name` and waits for its reply.
fn command(reader: &mut impl BufRead, writer: &mut impl Write, name: &str) -> Result<()> {
    writeln!(writer, "{}", serde_json::json!({ "execute": name }))
        .with_context(|| format!("sending {name}"))?;
    writer.flush()?;
    loop {
        let message = next_message(reader).with_context(|| format!("waiting for {name}"))?;
        if message.get("event").is_some() {
            continue;
        }
        if message.get("return").is_some() {
            return Ok(());
        }
        if let Some(error) = message.get("error") {
            bail!(
                "QMP refused {name}: {}",
                error["desc"].as_str().unwrap_or("no description")
            );
        }
        bail!("QMP answered {name} with {message}");
    }
}

/// The next JSON object QMP sends.
fn next_message(reader: &mut impl BufRead) -> Result<Value> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("QMP closed the connection");
    }
    serde_json::from_str(line.trim()).with_context(|| format!("QMP sent `{}`", line.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server on `socket` that greets, answers each command
    /// line with `answers` in turn, and returns what it was sent.
    fn fake_server(socket: PathBuf, answers: Vec<&'static str>) -> thread::JoinHandle<String> {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut got = String::new();
            for answer in answers {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                got.push_str(&line);
                stream.write_all(answer.as_bytes()).unwrap();
            }
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            got
        })
    }

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-qmp-test-{name}-{}", std::process::id()))
    }

    #[test]
    fn the_button_negotiates_then_injects_skipping_events() {
        let path = socket("ok");
        let server = fake_server(
            path.clone(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"event\": \"NMI\", \"data\": {}}\r\n{\"return\": {}}\r\n",
            ],
        );
        inject_nmi(&path).unwrap();
        let sent = server.join().unwrap();
        assert_eq!(
            sent,
            "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"inject-nmi\"}\n"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_refusal_is_named() {
        let path = socket("refused");
        let server = fake_server(
            path.clone(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no NMI here\"}}\r\n",
            ],
        );
        let error = inject_nmi(&path).unwrap_err().to_string();
        assert_eq!(error, "QMP refused inject-nmi: no NMI here");
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn long_run_directories_get_a_short_socket_elsewhere() {
        let short = Path::new("/w/build/run");
        assert_eq!(socket_path(short), PathBuf::from("/w/build/run/qmp.sock"));
        let long = PathBuf::from(format!("/w/{}", "x".repeat(120)));
        let path = socket_path(&long);
        assert!(path.as_os_str().len() <= SOCKET_PATH_MAX, "{path:?}");
        assert_eq!(path, socket_path(&long), "the same for the same run");
        assert_ne!(path, socket_path(&long.join("y")));
        let args: Vec<String> = qemu_args(short.join("qmp.sock").as_path())
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["-qmp", "unix:/w/build/run/qmp.sock,server=on,wait=off"]
        );
    }
}
