//! Which QEMU program a run starts (issue 14).
//!
//! Every run uses the distribution's `qemu-system-x86_64` (QEMU 7.2 on
//! Debian 12), except the runs that need x2APIC: more than 255 CPUs, or
//! `--x2apic`. QEMU 7.2's TCG has no x2APIC; QEMU 8.1 and later have it.
//! For those runs xtask takes, in this order:
//!
//! 1. the program named by `HV_QEMU_X2APIC`, when set;
//! 2. the distribution's QEMU, when its TCG `-cpu max` offers x2APIC;
//! 3. a private copy unpacked under `build/qemu-x2apic/` (QEMU 10 from
//!    Debian's bookworm-backports), fetched on first use with `apt-get`
//!    under private state directories: nothing is installed system-wide,
//!    so the rest of the suite keeps the distribution's QEMU.
//!
//! Whichever it is, xtask asks it over QMP what its TCG `-cpu max` offers
//! (`query-cpu-model-expansion`) rather than trusting a version number, and
//! the run report records the program, its version and those features
//! (`xtask.qemu`).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::paths;

/// The distribution's program name.
const DISTRIBUTION_PROGRAM: &str = "qemu-system-x86_64";

/// Environment variable naming an x2APIC-capable `qemu-system-x86_64`.
pub const X2APIC_PROGRAM_VAR: &str = "HV_QEMU_X2APIC";

/// The most CPUs QEMU runs in xAPIC mode (APIC IDs 0 to 254; 255 is the
/// broadcast ID).
pub const XAPIC_MAX_CPUS: u32 = 255;

/// From this many CPUs on, QEMU's q35 needs an IOMMU with interrupt
/// remapping in extended interrupt mode (APIC IDs above 255 in I/O APIC and
/// MSI messages): QEMU refuses to start otherwise.
pub const IOMMU_FROM_CPUS: u32 = 257;

/// The Debian suite the private copy comes from.
const BACKPORTS_SUITE: &str = "bookworm-backports";

/// The packages unpacked into the private copy: the emulator, its common
/// files and firmware data, SeaBIOS (the emulator asks for a newer one than
/// bookworm has), and the GUI and OpenGL modules (QEMU loads modules at
/// start-up and aborts on a module of another build: without its own, it
/// would find the distribution's). Every library they link is in bookworm.
const PRIVATE_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "qemu-system-gui",
    "qemu-system-modules-opengl",
    "seabios",
];

/// Where a QEMU program came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `qemu-system-x86_64` on `PATH`.
    Distribution,
    /// The program `HV_QEMU_X2APIC` names.
    Environment,
    /// The private copy under `build/qemu-x2apic/`.
    Private,
}

impl Source {
    /// The report's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Distribution => "distribution",
            Source::Environment => "HV_QEMU_X2APIC",
            Source::Private => "private",
        }
    }
}

/// What TCG's `-cpu max` of a QEMU offers, as its QMP says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// x2APIC mode.
    pub x2apic: bool,
    /// AMD SVM.
    pub svm: bool,
    /// SVM's nested paging.
    pub npt: bool,
    /// Intel VMX.
    pub vmx: bool,
}

/// One QEMU program and how to start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProgram {
    /// The executable.
    pub program: PathBuf,
    /// Where it came from.
    pub source: Source,
    /// Its `--version` line, e.g. `QEMU emulator version 10.0.2 (...)`.
    pub version: String,
    /// Its TCG `-cpu max` features (`None`: not probed).
    pub features: Option<Features>,
    /// Firmware directories (`-L`), before QEMU's own default.
    pub data_dirs: Vec<PathBuf>,
    /// `QEMU_MODULE_DIR` (a private copy's own modules).
    pub module_dir: Option<PathBuf>,
}

impl QemuProgram {
    /// The distribution's QEMU, unprobed: what every run but the x2APIC
    /// ones starts.
    pub fn distribution() -> Self {
        Self {
            program: DISTRIBUTION_PROGRAM.into(),
            source: Source::Distribution,
            version: String::new(),
            features: None,
            data_dirs: Vec::new(),
            module_dir: None,
        }
    }

    /// A command that starts this QEMU, with its firmware directories and
    /// module directory; the caller adds the run's arguments.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        for dir in &self.data_dirs {
            command.arg("-L").arg(dir);
        }
        if let Some(dir) = &self.module_dir {
            command.env("QEMU_MODULE_DIR", dir);
        }
        command
    }

    /// The arguments [`command`](Self::command) puts first, for echoing.
    pub fn leading_args(&self) -> Vec<OsString> {
        self.data_dirs
            .iter()
            .flat_map(|dir| [OsString::from("-L"), dir.clone().into_os_string()])
            .collect()
    }

    /// The run report's `xtask.qemu`.
    pub fn report(&self) -> Value {
        json!({
            "program": self.program.display().to_string(),
            "source": self.source.as_str(),
            "version": self.version,
            "version_number": parse_version(&self.version).map(|(a, b, c)| format!("{a}.{b}.{c}")),
            "cpu_max_features": self.features.map(|f| json!({
                "x2apic": f.x2apic, "svm": f.svm, "npt": f.npt, "vmx": f.vmx,
            })),
        })
    }
}

/// The run report's `xtask.qemu` for `qemu`. An unprobed program (the
/// distribution's, on an ordinary run) is probed once per process; when
/// that fails the report says why (`error`) and the run goes on.
pub fn report_of(qemu: &QemuProgram) -> Value {
    if qemu.features.is_some() {
        return qemu.report();
    }
    static PROBED: std::sync::Mutex<Option<Result<QemuProgram, String>>> =
        std::sync::Mutex::new(None);
    let mut probed = PROBED.lock().unwrap_or_else(|p| p.into_inner());
    let result = probed.get_or_insert_with(|| probe(qemu.clone()).map_err(|e| format!("{e:#}")));
    match result {
        Ok(probed) if probed.program == qemu.program => probed.report(),
        Ok(_) => qemu.report(),
        Err(error) => {
            let mut value = qemu.report();
            value["error"] = json!(error);
            value
        }
    }
}

/// Whether a run with these settings needs an x2APIC-capable QEMU.
pub fn needs_x2apic(smp: u32, x2apic_asked: bool) -> bool {
    x2apic_asked || smp > XAPIC_MAX_CPUS
}

/// The QEMU arguments a run with `smp` CPUs needs beyond the usual ones.
pub fn extra_args_for(smp: u32) -> Vec<OsString> {
    if smp >= IOMMU_FROM_CPUS {
        ["-device", "intel-iommu,intremap=on,eim=on"]
            .iter()
            .map(OsString::from)
            .collect()
    } else {
        Vec::new()
    }
}

/// The QEMU for a run: the distribution's unless the run needs x2APIC,
/// then one that has it (found, or fetched privately).
pub fn for_run(smp: u32, x2apic_asked: bool) -> Result<QemuProgram> {
    if needs_x2apic(smp, x2apic_asked) {
        x2apic_qemu()
    } else {
        Ok(QemuProgram::distribution())
    }
}

/// The private copy's directory.
pub fn private_root() -> PathBuf {
    paths::build_dir().join("qemu-x2apic")
}

/// Finds or fetches a QEMU whose TCG offers x2APIC (see the module doc).
pub fn x2apic_qemu() -> Result<QemuProgram> {
    static FOUND: std::sync::Mutex<Option<QemuProgram>> = std::sync::Mutex::new(None);
    let mut found = FOUND.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(qemu) = found.as_ref() {
        return Ok(qemu.clone());
    }
    let qemu = find_or_fetch()?;
    *found = Some(qemu.clone());
    Ok(qemu)
}

fn find_or_fetch() -> Result<QemuProgram> {
    if let Some(program) = env::var_os(X2APIC_PROGRAM_VAR) {
        let qemu = probe(QemuProgram {
            program: program.into(),
            source: Source::Environment,
            ..QemuProgram::distribution()
        })
        .with_context(|| format!("probing the QEMU {X2APIC_PROGRAM_VAR} names"))?;
        if !qemu.features.is_some_and(|f| f.x2apic) {
            bail!(
                "{X2APIC_PROGRAM_VAR}={} ({}) offers no x2APIC under TCG: QEMU 8.1 or later is needed",
                qemu.program.display(),
                qemu.version
            );
        }
        return Ok(qemu);
    }
    if let Ok(qemu) = probe(QemuProgram::distribution())
        && qemu.features.is_some_and(|f| f.x2apic)
    {
        return Ok(qemu);
    }
    let root = private_root();
    let private = private_program(&root);
    // Other processes (a second xtask, another test binary) take turns.
    let _turn = paths::lock_dir(&root)?;
    if !private.program.is_file() {
        fetch_private(&root).map_err(|error| {
            anyhow::anyhow!(
                "this run needs x2APIC (more than {XAPIC_MAX_CPUS} CPUs, or --x2apic), which the \
                 distribution's QEMU lacks under TCG, and fetching QEMU 10 from {BACKPORTS_SUITE} \
                 into {} failed: {error:#}\nfetch it (no root needed, nothing installed \
                 system-wide) with:\n  cargo xtask qemu-x2apic\nor point {X2APIC_PROGRAM_VAR} at a \
                 qemu-system-x86_64 8.1 or later",
                root.display()
            )
        })?;
    }
    let qemu = probe(private).with_context(|| {
        format!(
            "the private QEMU in {} does not start; remove that directory and run \
             `cargo xtask qemu-x2apic`",
            root.display()
        )
    })?;
    if !qemu.features.is_some_and(|f| f.x2apic) {
        bail!(
            "the private QEMU in {} ({}) offers no x2APIC under TCG",
            root.display(),
            qemu.version
        );
    }
    Ok(qemu)
}

/// The private copy's program, firmware and modules under `root`.
fn private_program(root: &Path) -> QemuProgram {
    let unpacked = root.join("root");
    QemuProgram {
        program: unpacked.join("usr/bin/qemu-system-x86_64"),
        source: Source::Private,
        version: String::new(),
        features: None,
        data_dirs: vec![
            unpacked.join("usr/share/qemu"),
            unpacked.join("usr/share/seabios"),
        ],
        module_dir: Some(unpacked.join("usr/lib/x86_64-linux-gnu/qemu")),
    }
}

/// The deb822 stanza of the private apt source: the distribution's mirror
/// and keyring, the backports suite.
pub fn backports_stanza(uri: &str, signed_by: &str) -> String {
    format!(
        "Types: deb\nURIs: {uri}\nSuites: {BACKPORTS_SUITE}\nComponents: main\nSigned-By: {signed_by}\n"
    )
}

/// The mirror and keyring of the host's `debian.sources` for the main
/// archive (not `-security`), or Debian's defaults.
pub fn main_archive(sources: &str) -> (String, String) {
    let mut uri = "http://deb.debian.org/debian".to_owned();
    let mut signed_by = "/usr/share/keyrings/debian-archive-keyring.gpg".to_owned();
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|value| value.trim().to_owned())
            })
        };
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if suites.split_whitespace().any(|suite| suite == "bookworm") {
            if let Some(first) = uris.split_whitespace().next() {
                uri = first.to_owned();
            }
            if let Some(keyring) = field("Signed-By") {
                signed_by = keyring;
            }
            break;
        }
    }
    (uri, signed_by)
}

/// apt options that keep its sources, lists and cache under `root`.
fn private_apt_options(root: &Path) -> Vec<String> {
    let at = |sub: &str| root.join(sub).display().to_string();
    vec![
        "-o".into(),
        "Dir::Etc::SourceList=/dev/null".into(),
        "-o".into(),
        format!("Dir::Etc::SourceParts={}", at("apt/sources")),
        "-o".into(),
        format!("Dir::State={}", at("apt/state")),
        "-o".into(),
        "Dir::State::status=/var/lib/dpkg/status".into(),
        "-o".into(),
        format!("Dir::Cache={}", at("apt/cache")),
        "-o".into(),
        "APT::Sandbox::User=root".into(),
    ]
}

/// Fetches the backports packages with apt into `root` and unpacks them.
pub fn fetch_private(root: &Path) -> Result<()> {
    for sub in [
        "apt/sources",
        "apt/state/lists/partial",
        "apt/cache/archives/partial",
        "debs",
    ] {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.join(sub).display()))?;
    }
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let (uri, signed_by) = main_archive(&sources);
    fs::write(
        root.join("apt/sources/backports.sources"),
        backports_stanza(&uri, &signed_by),
    )?;
    eprintln!(
        "xtask: fetching QEMU 10 from {BACKPORTS_SUITE} into {} (private: nothing is installed \
         system-wide)",
        root.display()
    );
    let options = private_apt_options(root);
    let apt = |args: &[&str], dir: &Path| -> Result<()> {
        let output = Command::new("apt-get")
            .args(&options)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("could not run apt-get")?;
        if !output.status.success() {
            bail!(
                "apt-get {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    };
    apt(&["update"], root)?;
    let debs = root.join("debs");
    let mut download = vec!["download"];
    let wanted: Vec<String> = PRIVATE_PACKAGES
        .iter()
        .map(|p| format!("{p}/{BACKPORTS_SUITE}"))
        .collect();
    download.extend(wanted.iter().map(String::as_str));
    apt(&download, &debs)?;
    let unpacked = root.join("root.partial");
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            crate::debian::dpkg_extract(&deb, &unpacked)?;
        }
    }
    let done = root.join("root");
    let _ = fs::remove_dir_all(&done);
    fs::rename(&unpacked, &done)?;
    Ok(())
}

/// Runs `--version` and asks QMP what TCG's `-cpu max` offers.
fn probe(mut qemu: QemuProgram) -> Result<QemuProgram> {
    let output = qemu
        .command()
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {}", qemu.program.display()))?;
    if !output.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            qemu.program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    qemu.version = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    qemu.features = Some(cpu_max_features(&qemu)?);
    Ok(qemu)
}

/// `QEMU emulator version 10.0.2 (Debian ...)` -> (10, 0, 2).
pub fn parse_version(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let number = rest.split_whitespace().next()?;
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The QMP exchange that expands TCG's `-cpu max`.
const QMP_EXPAND_MAX: &str = concat!(
    "{\"execute\":\"qmp_capabilities\"}\n",
    "{\"execute\":\"query-cpu-model-expansion\",",
    "\"arguments\":{\"type\":\"full\",\"model\":{\"name\":\"max\"}}}\n",
    "{\"execute\":\"quit\"}\n",
);

fn cpu_max_features(qemu: &QemuProgram) -> Result<Features> {
    let mut child = qemu
        .command()
        .args([
            "-machine",
            "none",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-nodefaults",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start {}", qemu.program.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(QMP_EXPAND_MAX.as_bytes())?;
    }
    let stdout = child.stdout.take();
    let mut child = crate::process::KillOnDrop::new(child);
    // QMP `quit` ends QEMU, which closes stdout; the reader thread ends
    // then. A QEMU that hangs is killed at the deadline (dropping the
    // guard), which also closes stdout.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stdout) = stdout {
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        }
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            child.kill();
            bail!("{} did not answer QMP within 30 s", qemu.program.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let transcript = reader.join().unwrap_or_default();
    features_from_qmp(&transcript).context("QEMU's QMP gave no expansion of -cpu max")
}

/// The features in a QMP transcript's `query-cpu-model-expansion` answer.
pub fn features_from_qmp(transcript: &str) -> Option<Features> {
    transcript.lines().find_map(|line| {
        let value: Value = serde_json::from_str(line).ok()?;
        let props = value.get("return")?.get("model")?.get("props")?;
        let flag = |name: &str| props.get(name).and_then(Value::as_bool).unwrap_or(false);
        Some(Features {
            x2apic: flag("x2apic"),
            svm: flag("svm"),
            npt: flag("npt"),
            vmx: flag("vmx"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_big_or_asked_runs_need_x2apic() {
        assert!(!needs_x2apic(4, false));
        assert!(!needs_x2apic(255, false));
        assert!(needs_x2apic(256, false));
        assert!(needs_x2apic(2, true));
    }

    #[test]
    fn the_iommu_comes_in_beyond_apic_id_255() {
        assert!(extra_args_for(256).is_empty());
        let args = extra_args_for(257);
        assert_eq!(args, ["-device", "intel-iommu,intremap=on,eim=on"]);
        assert_eq!(extra_args_for(512), args);
    }

    #[test]
    fn versions_parse_from_the_banner() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2, 22))
        );
        assert_eq!(parse_version("QEMU emulator version 9.1"), Some((9, 1, 0)));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn features_come_from_the_expansion_answer() {
        let transcript = concat!(
            "{\"QMP\": {\"version\": {}}}\n",
            "{\"return\": {}}\n",
            "{\"return\": {\"model\": {\"name\": \"base\", \"props\": ",
            "{\"x2apic\": true, \"svm\": true, \"npt\": true, \"vmx\": false}}}}\n",
            "{\"return\": {}}\n",
        );
        assert_eq!(
            features_from_qmp(transcript),
            Some(Features {
                x2apic: true,
                svm: true,
                npt: true,
                vmx: false
            })
        );
        assert_eq!(features_from_qmp("{\"return\": {}}\n"), None);
    }

    #[test]
    fn the_private_source_follows_the_hosts_mirror() {
        let sources = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://sec.example\n\
                       Suites: bookworm-security\nSigned-By: /s.gpg\n";
        let (uri, keyring) = main_archive(sources);
        assert_eq!(
            (uri.as_str(), keyring.as_str()),
            ("http://mirror.example/debian", "/k.gpg")
        );
        assert_eq!(
            backports_stanza(&uri, &keyring),
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /k.gpg\n"
        );
        let (uri, _) = main_archive("");
        assert_eq!(uri, "http://deb.debian.org/debian");
    }

    #[test]
    fn a_private_copy_brings_its_own_firmware_and_modules() {
        let qemu = private_program(Path::new("/b/q"));
        assert_eq!(
            qemu.program,
            Path::new("/b/q/root/usr/bin/qemu-system-x86_64")
        );
        assert_eq!(
            qemu.leading_args(),
            [
                "-L",
                "/b/q/root/usr/share/qemu",
                "-L",
                "/b/q/root/usr/share/seabios"
            ]
        );
        let command = qemu.command();
        let module_dir = command
            .get_envs()
            .find(|(key, _)| *key == "QEMU_MODULE_DIR")
            .and_then(|(_, value)| value);
        assert_eq!(
            module_dir,
            Some(std::ffi::OsStr::new(
                "/b/q/root/usr/lib/x86_64-linux-gnu/qemu"
            ))
        );
        assert!(QemuProgram::distribution().leading_args().is_empty());
    }
}
