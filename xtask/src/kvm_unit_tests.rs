//! Real guests: kernels given to hv as `guest` boot modules, and the
//! `kvm-unit-tests` command, which runs the suite's cfg entries as such
//! guests in Bochs and compares hv's results with QEMU TCG's.
//!
//! - [`parse_cfg`] reads `unittests.cfg`, [`parse_reference`] the results
//!   of the same binaries under this machine's QEMU 7.2 TCG;
//! - [`plan`] turns an entry into a guest (vCPUs, memory, x2APIC,
//!   arguments) or a skip with the reason: features hv does not offer to
//!   guests (nested VMX/SVM, Hyper-V and KVM paravirtual interfaces, the
//!   PMU, an IOMMU) are never run, so never pass;
//! - [`run()`] boots hv with several entries per boot, in Bochs (VMX) or in
//!   QEMU TCG with `-cpu max` (SVM) ([`Backend`]), follows each guest's
//!   report line as it comes, and [`table`] shows the outcome.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::iso::BootModule;
use crate::report::model::{Field, Guest};
use crate::run::{self, BochsOptions, LineHook, QemuOptions, RunOutcome};

/// A guest boot module from `FILE [WORDS]`: the file, and the words of
/// its `guest` module line.
pub fn guest_module(spec: &str) -> Result<BootModule> {
    let spec = spec.trim();
    let (file, words) = spec.split_once(char::is_whitespace).unwrap_or((spec, ""));
    if file.is_empty() {
        bail!("--guest needs a file");
    }
    let file = PathBuf::from(file);
    if !file.is_file() {
        bail!("no guest kernel at {}", file.display());
    }
    let words = words.trim();
    Ok(BootModule {
        file,
        cmdline: if words.is_empty() {
            "guest".to_owned()
        } else {
            format!("guest {words}")
        },
    })
}

/// The entries CI runs (`tests/tests/kvm_unit_tests.rs`): the fast ones,
/// one Bochs boot of about a minute, covering several vCPUs (`smptest3`),
/// real mode, exceptions, interrupts and NMIs (`eventinj`), RDTSCP.
pub const CI_SUBSET: &[&str] = &[
    "smptest", "smptest3", "realmode", "setjmp", "memory", "rdpru", "eventinj", "tsc",
];

/// The entries CI runs with the SVM backend under QEMU TCG
/// (`tests/tests/kvm_unit_tests.rs`), one boot of a few seconds: several
/// vCPUs (`smptest3`), real mode, exceptions, interrupts and NMIs
/// (`eventinj`), IPIs through the virtual local APIC (`vmexit_ipi`), its
/// TSC-deadline timer (`vmexit_tscdeadline`), RDTSCP and TSC_AUX (`tsc`).
pub const CI_SUBSET_SVM: &[&str] = &[
    "smptest3",
    "realmode",
    "eventinj",
    "vmexit_ipi",
    "vmexit_tscdeadline",
    "tsc",
];

/// Which backend of hv's the suite runs on, and so in which emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// VMX, in Bochs.
    #[default]
    Vmx,
    /// SVM, in QEMU TCG (`-cpu max`: SVM with nested paging).
    Svm,
}

impl Backend {
    /// The name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmx => "vmx",
            Self::Svm => "svm",
        }
    }

    /// The entries CI runs on this backend.
    pub fn ci_subset(self) -> &'static [&'static str] {
        match self {
            Self::Vmx => CI_SUBSET,
            Self::Svm => CI_SUBSET_SVM,
        }
    }
}

/// A guest's time limit under QEMU TCG unless its cfg entry gives one:
/// upstream's runner's default (90 s), as in the reference run.
pub const QEMU_GUEST_TIMEOUT_MS: u64 = 90_000;

/// The Bochs CPU model the suite runs on: Tiger Lake, the newest Bochs 2.7
/// has, so that the entries testing SMAP, UMIP, PKU and RDPID find them
/// (xtask's other runs use Haswell, the oldest with what hv needs).
pub const CPU_MODEL: &str = "tigerlake";

/// Where the suite is looked for when `--suite` is not given.
pub fn default_suite_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVM_UNIT_TESTS_DIR") {
        return PathBuf::from(dir);
    }
    let root = crate::paths::workspace_root();
    let candidates = [
        root.join("../shared/guests/kvm-unit-tests"),
        root.join("../../shared/guests/kvm-unit-tests"),
        PathBuf::from("/work/shared/guests/kvm-unit-tests"),
    ];
    candidates
        .iter()
        .find(|dir| dir.join("unittests.cfg").is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// One section of `unittests.cfg`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CfgEntry {
    /// The section name.
    pub name: String,
    /// `file`.
    pub file: String,
    /// `smp` (a number, or `$MAX_SMP`).
    pub smp: Option<String>,
    /// `test_args` (or the older `extra_params -append`).
    pub test_args: String,
    /// `qemu_params`.
    pub qemu_params: String,
    /// `arch`.
    pub arch: Option<String>,
    /// `groups`.
    pub groups: Vec<String>,
    /// `timeout` in seconds.
    pub timeout: Option<u64>,
    /// `check`.
    pub check: Option<String>,
    /// `accel`.
    pub accel: Option<String>,
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    for quote in ['\'', '"'] {
        if let Some(inner) = value
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            return inner.to_owned();
        }
    }
    value.to_owned()
}

/// Parses `unittests.cfg`: `[name]` sections of `key = value` lines, `#`
/// comments.
pub fn parse_cfg(text: &str) -> Vec<CfgEntry> {
    let mut entries: Vec<CfgEntry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            entries.push(CfgEntry {
                name: name.trim().to_owned(),
                ..CfgEntry::default()
            });
            continue;
        }
        let (Some(entry), Some((key, value))) = (entries.last_mut(), line.split_once('=')) else {
            continue;
        };
        let value = unquote(value);
        match key.trim() {
            "file" => entry.file = value,
            "smp" => entry.smp = Some(value),
            "test_args" => entry.test_args = value,
            "extra_params" | "qemu_params" => {
                if let Some(args) = value.split_once("-append").map(|(_, a)| a) {
                    entry.test_args = unquote(args);
                }
                entry.qemu_params = value;
            }
            "arch" => entry.arch = Some(value),
            "groups" => entry.groups = value.split_whitespace().map(str::to_owned).collect(),
            "timeout" => entry.timeout = value.trim_end_matches('s').parse().ok(),
            "check" => entry.check = Some(value),
            "accel" => entry.accel = Some(value),
            _ => {}
        }
    }
    entries
}

/// A result: PASS, FAIL or SKIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Passed.
    Pass,
    /// Failed (or did not finish).
    Fail,
    /// Not run, or every check skipped.
    Skip,
}

impl Verdict {
    /// `PASS`, `FAIL`, `SKIP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "PASS" => Some(Self::Pass),
            "FAIL" => Some(Self::Fail),
            "SKIP" => Some(Self::Skip),
            _ => None,
        }
    }
}

/// Parses `qemu-tcg-results.txt` (`PASS name (detail)` lines).
pub fn parse_reference(text: &str) -> BTreeMap<String, (Verdict, String)> {
    let mut results = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.trim().splitn(3, ' ');
        let (Some(verdict), Some(name)) = (words.next().and_then(Verdict::parse), words.next())
        else {
            continue;
        };
        let detail = words.next().unwrap_or("").trim();
        let detail = detail
            .strip_prefix('(')
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or(detail);
        results.insert(name.to_owned(), (verdict, detail.to_owned()));
    }
    results
}

/// How an entry runs as a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPlan {
    /// The `.flat` file.
    pub file: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub mem_mib: u32,
    /// Whether CPUID offers x2APIC.
    pub x2apic: bool,
    /// Whether CPUID offers PCIDs.
    pub pcid: bool,
    /// Whether CPUID offers INVPCID.
    pub invpcid: bool,
    /// Its arguments.
    pub args: String,
    /// What of `qemu_params` hv does not reproduce (for the reason column).
    pub ignored: Vec<String>,
    /// Whether it runs long (TSC-bound loops, large memory): batched apart.
    pub long: bool,
    /// hv's time limit for it, in the guest's milliseconds.
    pub timeout_ms: u64,
}

/// What to do with an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not run: the reason.
    Skip(String),
    /// Run as this guest.
    Run(GuestPlan),
}

/// QEMU's default RAM, which the cfg entries assume when they give none.
const DEFAULT_MEM_MIB: u32 = 128;

fn unsupported(entry: &CfgEntry) -> Option<&'static str> {
    let name = entry.name.as_str();
    let file = entry.file.trim_end_matches(".flat");
    let in_group = |g: &str| entry.groups.iter().any(|x| x == g);
    if in_group("vmx") || in_group("svm") || in_group("nested_exception") {
        return Some("nested virtualization (VMX/SVM inside a guest) is not offered");
    }
    if name.starts_with("vmx") || name.starts_with("ept") || file.starts_with("svm") {
        return Some("nested virtualization (VMX/SVM inside a guest) is not offered");
    }
    if in_group("hyperv") || name.starts_with("hyperv") {
        return Some("the Hyper-V paravirtual interface is not offered");
    }
    if matches!(name, "kvmclock_test" | "asyncpf") {
        return Some("the KVM paravirtual interface (kvmclock, async page faults) is not offered");
    }
    if in_group("pmu") || name.starts_with("pmu") {
        return Some("no PMU is offered (CPUID leaf 0xA is zero)");
    }
    if name == "vmware_backdoors" {
        return Some("the VMware backdoor is not offered");
    }
    if name == "intel_iommu" {
        return Some("needs an IOMMU (VT-d) and the edu PCI device, which hv does not offer");
    }
    None
}

/// Decides how entry `entry` runs, with the suite's binaries in
/// `suite/x86/` and `cpus` emulated CPUs for `$MAX_SMP`.
pub fn plan(entry: &CfgEntry, suite: &Path, cpus: u32) -> Plan {
    if entry.arch.as_deref() == Some("i386") {
        return Plan::Skip("i386 only (hv runs the x86_64 build)".to_owned());
    }
    if let Some(reason) = unsupported(entry) {
        return Plan::Skip(format!("unsupported: {reason}"));
    }
    if entry.groups.iter().any(|g| g == "nodefault") {
        return Plan::Skip("marked as manual run only (nodefault)".to_owned());
    }
    if let Some(accel) = &entry.accel {
        return Plan::Skip(format!("runs only with accel = {accel}"));
    }
    if let Some(check) = &entry.check {
        return Plan::Skip(format!("needs a host KVM setting: {check}"));
    }
    let file = suite.join("x86").join(&entry.file);
    if !file.is_file() {
        return Plan::Skip(format!("{} is not built", entry.file));
    }
    let vcpus = match entry.smp.as_deref() {
        None => 1,
        Some(text) if text.contains("MAX_SMP") => cpus,
        Some(text) => text.trim().parse().unwrap_or(1),
    };
    let mut mem_mib = DEFAULT_MEM_MIB;
    let mut x2apic = true;
    let (mut pcid, mut invpcid) = (true, true);
    let mut ignored = Vec::new();
    let mut words = entry.qemu_params.split_whitespace();
    while let Some(word) = words.next() {
        match word {
            "-m" => {
                let value = words.next().unwrap_or("");
                let (digits, scale) = match value.strip_suffix(['g', 'G']) {
                    Some(d) => (d, 1024),
                    None => (value.trim_end_matches(['m', 'M']), 1),
                };
                match digits.parse::<u32>() {
                    Ok(n) => mem_mib = n * scale,
                    Err(_) => ignored.push(format!("-m {value}")),
                }
            }
            "-cpu" => {
                for flag in words.next().unwrap_or("").split(',').skip(1) {
                    match flag {
                        "-x2apic" => x2apic = false,
                        "-pcid" => pcid = false,
                        "-invpcid" => invpcid = false,
                        "+x2apic" | "+tsc-deadline" | "+pcid" | "+invpcid" => {}
                        other => ignored.push(format!("-cpu ...,{other}")),
                    }
                }
            }
            "-machine" | "-M" | "-device" | "-global" | "-overcommit" => {
                ignored.push(format!("{word} {}", words.next().unwrap_or("")));
            }
            other => ignored.push(other.to_owned()),
        }
    }
    if mem_mib > GUEST_MEMORY_MIB {
        return Plan::Skip(format!(
            "needs {mem_mib} MiB of RAM; a Bochs boot holds {GUEST_MEMORY_MIB} MiB of guests"
        ));
    }
    let long = entry.name.starts_with("vmexit") || entry.name == "sieve";
    // Bochs' CPU is a 10 MHz one: a TSC-bound loop of 2^31 cycles takes
    // 215 s of its time, and long entries share cores; give them twenty
    // minutes, others two.
    let timeout_ms = if long { 1_200_000 } else { 120_000 };
    Plan::Run(GuestPlan {
        file,
        vcpus,
        mem_mib,
        x2apic,
        pcid,
        invpcid,
        args: entry.test_args.clone(),
        ignored,
        long,
        timeout_ms,
    })
}

/// [`plan`] for `backend`: under QEMU TCG (SVM) a guest's time limit is
/// the reference run's: the cfg entry's `timeout`, else
/// [`QEMU_GUEST_TIMEOUT_MS`].
pub fn plan_on(entry: &CfgEntry, suite: &Path, cpus: u32, backend: Backend) -> Plan {
    match (plan(entry, suite, cpus), backend) {
        (Plan::Run(mut run), Backend::Svm) => {
            run.timeout_ms = entry
                .timeout
                .map_or(QEMU_GUEST_TIMEOUT_MS, |secs| secs.saturating_mul(1000));
            Plan::Run(run)
        }
        (plan, _) => plan,
    }
}

/// The `guest` module line of entry `name` run as `plan`.
pub fn module_line(name: &str, plan: &GuestPlan) -> String {
    let mut line = format!(
        "guest name={name} smp={} mem={}M timeout_ms={}",
        plan.vcpus, plan.mem_mib, plan.timeout_ms
    );
    if !plan.x2apic {
        line.push_str(" x2apic=off");
    }
    if !plan.pcid {
        line.push_str(" pcid=off");
    }
    if !plan.invpcid {
        line.push_str(" invpcid=off");
    }
    if !plan.args.is_empty() {
        let _ = write!(line, " -- {}", plan.args);
    }
    line
}

/// An entry's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryResult {
    /// The cfg section name.
    pub name: String,
    /// QEMU 7.2 TCG's result (`PASS`, `FAIL`, `SKIP`, or `?` when the
    /// reference does not name it).
    pub qemu_tcg: String,
    /// hv's result.
    pub hv: Verdict,
    /// Why (the skip reason, the failure, parameters hv ignored).
    pub reason: String,
    /// Wall-clock seconds in Bochs, from the start of its boot's guest
    /// run to its stop (0 for entries not run).
    pub seconds: f64,
    /// The guest's own milliseconds (hv's clock), when it ran.
    pub guest_ms: Option<u64>,
}

pub use crate::judge::guest as judge_guest;

/// What `run` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// hv's ELF.
    pub elf: PathBuf,
    /// The suite (`unittests.cfg`, `qemu-tcg-results.txt`, `x86/`).
    pub suite: PathBuf,
    /// Entries whose name matches (every entry with `all`).
    pub filter: Option<String>,
    /// Every entry of the cfg (else [`CI_SUBSET`], or the filter's).
    pub all: bool,
    /// Emulated CPUs.
    pub cpus: u32,
    /// Most entries per boot.
    pub per_boot: usize,
    /// Wall-clock limit of one boot.
    pub boot_timeout: Duration,
    /// The Bochs CPU model ([`CPU_MODEL`] when `None`).
    pub cpu_model: Option<String>,
    /// Show progress (a bar and a line per result) on stderr.
    pub progress: bool,
    /// Run directory prefix under `build/`.
    pub run_name: String,
    /// The backend, and so the emulator.
    pub backend: Backend,
}

impl Options {
    /// The defaults: CI's subset, 4 CPUs, 16 entries a boot (hv's most:
    /// TSC-bound entries finish as soon sharing cores as alone, so packing
    /// them saves the most).
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        Self {
            elf: elf.into(),
            suite: default_suite_dir(),
            filter: None,
            all: false,
            cpus: 4,
            per_boot: 16,
            boot_timeout: Duration::from_secs(4 * 3600),
            cpu_model: None,
            progress: false,
            run_name: "kvm-unit-tests".to_owned(),
            backend: Backend::Vmx,
        }
    }
}

/// The whole run: every selected entry's result, and the boots.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One per selected cfg entry, in cfg order.
    pub results: Vec<EntryResult>,
    /// Each boot: its entries, run directory, whether hv's run was ok and
    /// why not.
    pub boots: Vec<BootSection>,
}

/// One Bochs (or QEMU) boot of a run: `kvm_unit_tests_boots[]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootSection {
    /// The cfg entries it ran.
    pub entries: Vec<String>,
    /// Its run directory (its own run report is there); null when it
    /// could not start.
    pub run_dir: Option<PathBuf>,
    /// Whether hv's run was ok.
    pub ok: bool,
    /// Why not.
    pub reason: Option<String>,
}

/// One cfg entry's outcome: `kvm_unit_tests[]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntrySection {
    pub name: String,
    pub qemu_tcg: String,
    pub hv: &'static str,
    pub reason: String,
    /// Rounded to a tenth.
    pub seconds: f64,
    pub guest_ms: Option<u64>,
}

/// `kvm_unit_tests_summary`: the counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummarySection {
    pub entries: usize,
    pub hv_pass: usize,
    pub hv_fail: usize,
    pub hv_skip: usize,
    pub qemu_tcg_pass: usize,
    pub both_pass: usize,
}

/// The report `cargo xtask kvm-unit-tests --report FILE` writes
/// (`xtask/REPORT.md`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvmUnitTestsReport {
    pub kvm_unit_tests: Vec<EntrySection>,
    pub kvm_unit_tests_summary: SummarySection,
    pub kvm_unit_tests_boots: Vec<BootSection>,
}

impl Outcome {
    /// The report's `kvm_unit_tests` array.
    pub fn results_json(&self) -> Value {
        serde_json::to_value(self.entries()).unwrap_or(Value::Null)
    }

    fn entries(&self) -> Vec<EntrySection> {
        self.results
            .iter()
            .map(|r| EntrySection {
                name: r.name.clone(),
                qemu_tcg: r.qemu_tcg.clone(),
                hv: r.hv.as_str(),
                reason: r.reason.clone(),
                seconds: (r.seconds * 10.0).round() / 10.0,
                guest_ms: r.guest_ms,
            })
            .collect()
    }

    /// The typed report: `kvm_unit_tests`, the boots and the counts.
    pub fn sections(&self) -> KvmUnitTestsReport {
        let count =
            |pred: &dyn Fn(&EntryResult) -> bool| self.results.iter().filter(|r| pred(r)).count();
        KvmUnitTestsReport {
            kvm_unit_tests: self.entries(),
            kvm_unit_tests_summary: SummarySection {
                entries: self.results.len(),
                hv_pass: count(&|r| r.hv == Verdict::Pass),
                hv_fail: count(&|r| r.hv == Verdict::Fail),
                hv_skip: count(&|r| r.hv == Verdict::Skip),
                qemu_tcg_pass: count(&|r| r.qemu_tcg == "PASS"),
                both_pass: count(&|r| r.qemu_tcg == "PASS" && r.hv == Verdict::Pass),
            },
            kvm_unit_tests_boots: self.boots.clone(),
        }
    }

    /// The JSON report: `kvm_unit_tests`, the boots and the counts.
    pub fn report(&self) -> Value {
        serde_json::to_value(self.sections()).unwrap_or(Value::Null)
    }
}

/// Selected entries of the cfg, in cfg order.
pub fn select(entries: &[CfgEntry], options: &Options) -> Result<Vec<CfgEntry>> {
    let filter = options
        .filter
        .as_deref()
        .map(regex_lite::Regex::new)
        .transpose()
        .context("--filter is not a regular expression")?;
    Ok(entries
        .iter()
        .filter(|e| match &filter {
            Some(re) => re.is_match(&e.name),
            None => options.all || options.backend.ci_subset().contains(&e.name.as_str()),
        })
        .cloned()
        .collect())
}

/// Bochs 2.7 runs with at most 2048 MiB of memory.
pub const BOCHS_MAX_MEMORY_MIB: u32 = 2048;
/// What hv itself needs of a boot's memory beside its guests.
const HV_MEMORY_MIB: u32 = 192;
/// Guest memory one boot can hold.
const GUEST_MEMORY_MIB: u32 = BOCHS_MAX_MEMORY_MIB - HV_MEMORY_MIB;

/// Groups the entries that run into boots: short ones together, long
/// ones (TSC-bound loops) apart, at most `per_boot` each and no more
/// guest memory than a Bochs boot holds.
fn batches(runs: &[(String, GuestPlan)], per_boot: usize) -> Vec<Vec<(String, GuestPlan)>> {
    let mut batches = Vec::new();
    for long in [false, true] {
        let mut batch: Vec<(String, GuestPlan)> = Vec::new();
        let mut memory = 0;
        for run in runs.iter().filter(|(_, p)| p.long == long) {
            if !batch.is_empty()
                && (batch.len() == per_boot.max(1) || memory + run.1.mem_mib > GUEST_MEMORY_MIB)
            {
                batches.push(std::mem::take(&mut batch));
                memory = 0;
            }
            memory += run.1.mem_mib;
            batch.push(run.clone());
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }
    batches
}

/// What the line hook saw of the guests of one boot.
#[derive(Debug, Default)]
struct Seen {
    /// When hv had created every guest and began to run them.
    started: Option<Instant>,
    stopped: BTreeMap<String, (Instant, Value)>,
}

/// What [`run()`] would do: each selected entry's plan, and the boots.
pub fn describe(options: &Options) -> Result<String> {
    let cfg_path = options.suite.join("unittests.cfg");
    let cfg = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut text = String::new();
    let mut runs = Vec::new();
    for entry in select(&parse_cfg(&cfg), options)? {
        match plan_on(&entry, &options.suite, options.cpus, options.backend) {
            Plan::Skip(reason) => {
                let _ = writeln!(text, "{:<28} SKIP  {reason}", entry.name);
            }
            Plan::Run(plan) => {
                let _ = writeln!(
                    text,
                    "{:<28} RUN   {}",
                    entry.name,
                    module_line(&entry.name, &plan)
                );
                runs.push((entry.name, plan));
            }
        }
    }
    for (number, batch) in batches(&runs, options.per_boot).iter().enumerate() {
        let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
        let memory: u32 = batch.iter().map(|(_, p)| p.mem_mib).sum();
        let _ = writeln!(
            text,
            "boot {number}: {} MiB of guests: {}",
            memory,
            names.join(" ")
        );
    }
    Ok(text)
}

/// Runs the selected entries and returns every one's result.
pub fn run(options: &Options) -> Result<Outcome> {
    let cfg_path = options.suite.join("unittests.cfg");
    let cfg = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let reference_path = options.suite.join("qemu-tcg-results.txt");
    let reference = std::fs::read_to_string(&reference_path)
        .map(|text| parse_reference(&text))
        .unwrap_or_default();
    let entries = select(&parse_cfg(&cfg), options)?;
    if entries.is_empty() {
        bail!("no cfg entry selected");
    }
    let mut results: BTreeMap<String, EntryResult> = BTreeMap::new();
    let mut runs = Vec::new();
    for entry in &entries {
        let qemu_tcg = reference
            .get(&entry.name)
            .map_or("?", |(v, _)| v.as_str())
            .to_owned();
        match plan_on(entry, &options.suite, options.cpus, options.backend) {
            Plan::Skip(reason) => {
                results.insert(
                    entry.name.clone(),
                    EntryResult {
                        name: entry.name.clone(),
                        qemu_tcg,
                        hv: Verdict::Skip,
                        reason,
                        seconds: 0.0,
                        guest_ms: None,
                    },
                );
            }
            Plan::Run(plan) => runs.push((entry.name.clone(), plan)),
        }
    }
    let bar = crate::stress::progress_bar(entries.len() as u64, options.progress);
    bar.inc(results.len() as u64);
    let mut boots = Vec::new();
    for (number, batch) in batches(&runs, options.per_boot).into_iter().enumerate() {
        let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
        bar.set_message(names.join(" "));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let hook = {
            let seen = Arc::clone(&seen);
            let bar = bar.clone();
            let progress = options.progress;
            LineHook(Arc::new(move |line: &str| {
                watch_line(line, &seen, &bar, progress);
            }))
        };
        let memory_mib = batch.iter().map(|(_, p)| p.mem_mib).sum::<u32>() + HV_MEMORY_MIB;
        let run_name = format!("{}-{}-{number}", options.run_name, options.backend.as_str());
        let modules: Vec<BootModule> = batch
            .iter()
            .map(|(name, plan)| BootModule {
                file: plan.file.clone(),
                cmdline: module_line(name, plan),
            })
            .collect();
        let outcome = match options.backend {
            Backend::Vmx => {
                let mut bochs = BochsOptions::new(&options.elf);
                bochs.cpus = options.cpus;
                bochs.memory_mib = memory_mib;
                bochs.timeout = options.boot_timeout;
                bochs.run_name = Some(run_name);
                bochs.cpu_model = Some(
                    options
                        .cpu_model
                        .clone()
                        .unwrap_or_else(|| CPU_MODEL.to_owned()),
                );
                bochs.on_line = Some(hook);
                bochs.modules = modules;
                run::bochs(&bochs)
            }
            Backend::Svm => {
                let mut qemu = QemuOptions::new(&options.elf);
                qemu.smp = options.cpus;
                qemu.memory_mib = memory_mib;
                qemu.timeout = options.boot_timeout;
                qemu.run_name = Some(run_name);
                // GRUB carries the modules (direct boot takes one).
                qemu.boot = run::Boot::GrubBios;
                qemu.force_tcg = true;
                // The lockup detector's 100 ms tick would be the guests'
                // timer resolution: off, the SVM backend arms the APIC
                // timer for each guest deadline.
                qemu.append = vec!["watchdog=0".to_owned()];
                qemu.on_line = Some(hook);
                qemu.modules = modules;
                run::qemu(&qemu)
            }
        };
        let seen = seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let (run_ok, run_reason, run_dir) = match &outcome {
            Ok(run) => (run.ok, run.reason.clone(), Some(run.run_dir.clone())),
            Err(error) => (false, Some(format!("{error:#}")), None),
        };
        boots.push(BootSection {
            entries: names.iter().map(|name| (*name).to_owned()).collect(),
            run_dir,
            ok: run_ok,
            reason: run_reason,
        });
        for (name, plan) in &batch {
            let qemu_tcg = reference
                .get(name)
                .map_or("?", |(v, _)| v.as_str())
                .to_owned();
            let result = entry_result(name, plan, qemu_tcg, &seen, outcome.as_ref().ok());
            if !seen.stopped.contains_key(name) {
                bar.inc(1);
                if options.progress {
                    crate::stress::say(
                        &bar,
                        format!("{:<28} {}  {}", name, result.hv.as_str(), result.reason),
                    );
                }
            }
            results.insert(name.clone(), result);
        }
    }
    bar.finish_and_clear();
    let results = entries
        .iter()
        .filter_map(|e| results.remove(&e.name))
        .collect();
    Ok(Outcome { results, boots })
}

/// Follows one serial line of a boot: guest creations and stops.
fn watch_line(line: &str, seen: &Mutex<Seen>, bar: &indicatif::ProgressBar, progress: bool) {
    if line.contains("guest modules created")
        && let Ok(mut seen) = seen.lock()
    {
        seen.started = Some(Instant::now());
    }
    let Some(start) = line.find("@hv {") else {
        return;
    };
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&line[start + 4..]) else {
        return;
    };
    let Some(Value::Object(guests)) = object.get("guests") else {
        return;
    };
    let Ok(mut seen) = seen.lock() else {
        return;
    };
    for guest in guests.values() {
        let view = guest_view(guest);
        let name = view.name.as_str().unwrap_or("").to_owned();
        let finished = matches!(view.state.as_str(), Some("stopped" | "refused"));
        if !finished || seen.stopped.contains_key(&name) {
            continue;
        }
        let (verdict, reason) = judge_guest(guest);
        seen.stopped
            .insert(name.clone(), (Instant::now(), guest.clone()));
        bar.inc(1);
        if progress {
            crate::stress::say(bar, format!("{name:<28} {}  {reason}", verdict.as_str()));
        }
    }
}

/// A guest's report object, typed (empty when it is not an object).
fn guest_view(guest: &Value) -> Guest {
    serde::Deserialize::deserialize(guest)
        .map(|guest: Field<Guest>| guest.or_empty())
        .unwrap_or_default()
}

fn entry_result(
    name: &str,
    plan: &GuestPlan,
    qemu_tcg: String,
    seen: &Seen,
    run: Option<&RunOutcome>,
) -> EntryResult {
    let guest = run
        .and_then(|run| run.report["guests"].as_object())
        .and_then(|guests| {
            guests.values().find(|g| {
                let view = guest_view(g);
                view.name.as_str() == Some(name) && view.state.as_str() != Some("created")
            })
        })
        .or_else(|| seen.stopped.get(name).map(|(_, g)| g));
    let (hv, mut reason) = match guest {
        Some(guest) => judge_guest(guest),
        None => (
            Verdict::Fail,
            format!(
                "the hv run ended before the guest stopped: {}",
                run.and_then(|r| r.reason.clone())
                    .unwrap_or_else(|| "the run failed".to_owned())
            ),
        ),
    };
    if !plan.ignored.is_empty() && hv != Verdict::Skip {
        let _ = write!(
            reason,
            "; hv did not apply qemu_params {}",
            plan.ignored.join(" ")
        );
    }
    let seconds = match (seen.started, seen.stopped.get(name)) {
        (Some(started), Some((stopped, _))) => stopped.duration_since(started).as_secs_f64(),
        _ => 0.0,
    };
    EntryResult {
        name: name.to_owned(),
        qemu_tcg,
        hv,
        reason: reason.trim_start_matches("; ").to_owned(),
        seconds,
        guest_ms: guest.and_then(|g| guest_view(g).ms.value()),
    }
}

/// The results as a table: entry, QEMU TCG, hv, seconds, reason.
pub fn table(results: &[EntryResult]) -> String {
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut text = format!(
        "{:<width$}  {:<8}  {:<4}  {:>7}  reason\n",
        "entry", "QEMU TCG", "hv", "seconds"
    );
    for r in results {
        let seconds = if r.seconds > 0.0 {
            format!("{:.1}", r.seconds)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            text,
            "{:<width$}  {:<8}  {:<4}  {:>7}  {}",
            r.name,
            r.qemu_tcg,
            r.hv.as_str(),
            seconds,
            r.reason
        );
    }
    let tcg_pass: Vec<_> = results.iter().filter(|r| r.qemu_tcg == "PASS").collect();
    let both = tcg_pass.iter().filter(|r| r.hv == Verdict::Pass).count();
    let hv_only: Vec<&str> = results
        .iter()
        .filter(|r| r.hv == Verdict::Pass && r.qemu_tcg != "PASS")
        .map(|r| r.name.as_str())
        .collect();
    let _ = writeln!(
        text,
        "\nhv passes {} of {} entries; of the {} QEMU TCG passes, hv passes {}{}",
        results.iter().filter(|r| r.hv == Verdict::Pass).count(),
        results.len(),
        tcg_pass.len(),
        both,
        if tcg_pass.is_empty() {
            String::new()
        } else {
            format!(" ({}%)", both * 100 / tcg_pass.len())
        }
    );
    if !hv_only.is_empty() {
        let _ = writeln!(
            text,
            "passing under hv but not under QEMU TCG: {}",
            hv_only.join(", ")
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CFG: &str = r#"
# comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[xapic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,-x2apic,+tsc-deadline

[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386

[vmx]
file = vmx.flat
qemu_params = -cpu max,+vmx
groups = vmx

[pmu]
file = pmu.flat
accel = kvm
groups = pmu

[sieve]
file = sieve.flat
qemu_params = -m 1g

[huge]
file = sieve.flat
qemu_params = -m 2g
"#;

    #[test]
    fn the_cfg_parses_into_sections() {
        let entries = parse_cfg(CFG);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "x2apic",
                "xapic",
                "vmexit_cpuid",
                "cmpxchg8b",
                "vmx",
                "pmu",
                "sieve",
                "huge"
            ]
        );
        assert_eq!(entries[0].smp.as_deref(), Some("2"));
        assert_eq!(entries[0].timeout, Some(30));
        assert_eq!(entries[0].groups, ["apic"]);
        assert_eq!(entries[2].test_args, "cpuid");
        assert_eq!(entries[3].arch.as_deref(), Some("i386"));
    }

    #[test]
    fn entries_map_to_guests_or_to_skips_with_reasons() {
        let suite = std::env::temp_dir().join(format!("kut-plan-{}", std::process::id()));
        std::fs::create_dir_all(suite.join("x86")).unwrap();
        for file in [
            "apic.flat",
            "vmexit.flat",
            "vmx.flat",
            "pmu.flat",
            "sieve.flat",
        ] {
            std::fs::write(suite.join("x86").join(file), b"x").unwrap();
        }
        let entries = parse_cfg(CFG);
        let plans: Vec<Plan> = entries.iter().map(|e| plan(e, &suite, 4)).collect();
        let Plan::Run(x2apic) = &plans[0] else {
            panic!("{:?}", plans[0])
        };
        assert_eq!(
            (x2apic.vcpus, x2apic.x2apic, x2apic.mem_mib),
            (2, true, 128)
        );
        assert!(x2apic.ignored.is_empty(), "{:?}", x2apic.ignored);
        let Plan::Run(xapic) = &plans[1] else {
            panic!()
        };
        assert!(!xapic.x2apic);
        assert_eq!(
            module_line("xapic", xapic),
            "guest name=xapic smp=2 mem=128M timeout_ms=120000 x2apic=off"
        );
        let Plan::Run(cpuid) = &plans[2] else {
            panic!()
        };
        assert!(cpuid.long);
        assert_eq!(
            module_line("vmexit_cpuid", cpuid),
            "guest name=vmexit_cpuid smp=1 mem=128M timeout_ms=1200000 -- cpuid"
        );
        assert!(matches!(&plans[3], Plan::Skip(r) if r.contains("i386")));
        assert!(matches!(&plans[4], Plan::Skip(r) if r.starts_with("unsupported: nested")));
        assert!(matches!(&plans[5], Plan::Skip(r) if r.starts_with("unsupported: no PMU")));
        let pcid = parse_cfg("[p]\nfile = apic.flat\nqemu_params = -cpu qemu64,-pcid,+invpcid\n");
        let Plan::Run(p) = plan(&pcid[0], &suite, 4) else {
            panic!()
        };
        assert_eq!(
            module_line("p", &p),
            "guest name=p smp=1 mem=128M timeout_ms=120000 pcid=off"
        );
        assert!(p.ignored.is_empty(), "{:?}", p.ignored);
        let Plan::Run(sieve) = &plans[6] else {
            panic!()
        };
        assert_eq!(sieve.mem_mib, 1024);
        assert!(matches!(&plans[7], Plan::Skip(r) if r.starts_with("needs 2048 MiB")));
        std::fs::remove_dir_all(&suite).unwrap();
    }

    #[test]
    fn the_reference_parses_every_verdict() {
        let reference = parse_reference(
            "FAIL x2apic \nPASS smptest (1 tests)\nSKIP pmu (kvm only, but ACCEL=tcg)\nnoise\n",
        );
        assert_eq!(reference["x2apic"], (Verdict::Fail, String::new()));
        assert_eq!(reference["smptest"], (Verdict::Pass, "1 tests".to_owned()));
        assert_eq!(
            reference["pmu"],
            (Verdict::Skip, "kvm only, but ACCEL=tcg".to_owned())
        );
        assert_eq!(reference.len(), 3);
    }

    #[test]
    fn guests_are_judged_from_their_report() {
        let pass = json!({"state": "stopped", "reason": "exit", "verdict": "pass", "summary": "SUMMARY: 1 tests"});
        assert_eq!(
            judge_guest(&pass),
            (Verdict::Pass, "SUMMARY: 1 tests".to_owned())
        );
        let skip = json!({"state": "stopped", "reason": "exit", "verdict": "skip", "summary": "SUMMARY: 1 tests, 1 skipped"});
        assert_eq!(judge_guest(&skip).0, Verdict::Skip);
        let fail = json!({"state": "stopped", "reason": "exit", "verdict": "fail", "detail": "status 3", "first_failure": "FAIL: x"});
        assert_eq!(
            judge_guest(&fail),
            (Verdict::Fail, "status 3 (FAIL: x)".to_owned())
        );
        let fault = json!({"state": "stopped", "reason": "triple_fault", "detail": "vCPU 0"});
        assert_eq!(
            judge_guest(&fault),
            (Verdict::Fail, "triple_fault: vCPU 0".to_owned())
        );
        assert_eq!(judge_guest(&json!({})).0, Verdict::Fail);
    }

    #[test]
    fn selection_defaults_to_the_ci_subset() {
        let entries = parse_cfg("[smptest]\nfile=a\n[vmx]\nfile=b\n[realmode]\nfile=c\n");
        let mut options = Options::new("/hv");
        let names = |o: &Options| -> Vec<String> {
            select(&entries, o)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect()
        };
        assert_eq!(names(&options), ["smptest", "realmode"]);
        options.all = true;
        assert_eq!(names(&options).len(), 3);
        options.filter = Some("^v".to_owned());
        assert_eq!(names(&options), ["vmx"]);
        options.filter = Some("(".to_owned());
        assert!(select(&entries, &options).is_err());
    }

    #[test]
    fn the_svm_backend_has_its_own_subset_and_the_reference_time_limit() {
        let entries = parse_cfg("[smptest]\nfile=a\n[smptest3]\nfile=a\n[realmode]\nfile=c\n");
        let mut options = Options::new("/hv");
        options.backend = Backend::Svm;
        let names: Vec<String> = select(&entries, &options)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["smptest3", "realmode"]);
        let dir = std::env::temp_dir().join(format!("kut-svm-plan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("x86")).unwrap();
        std::fs::write(dir.join("x86/vmexit.flat"), b"x").unwrap();
        let mut entry = CfgEntry {
            name: "vmexit_ipi".to_owned(),
            file: "vmexit.flat".to_owned(),
            ..CfgEntry::default()
        };
        let timeout = |entry: &CfgEntry, backend| match plan_on(entry, &dir, 4, backend) {
            Plan::Run(plan) => plan.timeout_ms,
            Plan::Skip(why) => panic!("{why}"),
        };
        assert_eq!(timeout(&entry, Backend::Svm), QEMU_GUEST_TIMEOUT_MS);
        assert_eq!(timeout(&entry, Backend::Vmx), 1_200_000);
        entry.timeout = Some(180);
        assert_eq!(timeout(&entry, Backend::Svm), 180_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_entries_boot_apart() {
        let plan = |long| GuestPlan {
            file: PathBuf::from("x"),
            vcpus: 1,
            mem_mib: 32,
            x2apic: true,
            pcid: true,
            invpcid: true,
            args: String::new(),
            ignored: Vec::new(),
            long,
            timeout_ms: 1,
        };
        let runs: Vec<_> = (0..5)
            .map(|i| (format!("e{i}"), plan(i % 2 == 1)))
            .collect();
        let names = |batches: Vec<Vec<(String, GuestPlan)>>| -> Vec<Vec<String>> {
            batches
                .iter()
                .map(|b| b.iter().map(|(n, _)| n.clone()).collect())
                .collect()
        };
        assert_eq!(
            names(batches(&runs, 2)),
            [vec!["e0", "e2"], vec!["e4"], vec!["e1", "e3"]]
        );
        // Memory splits boots too: 1856 MiB of guests at most.
        let big: Vec<_> = (0..3)
            .map(|i| {
                let mut p = plan(false);
                p.mem_mib = 900;
                (format!("b{i}"), p)
            })
            .collect();
        assert_eq!(names(batches(&big, 16)), [vec!["b0", "b1"], vec!["b2"]]);
    }
}
