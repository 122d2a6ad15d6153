//! `cargo xtask dump FILE`: what a crash dump holds.
//!
//! A dump is an ELF64 core file (see `xtask/CAPTURE.md`): one
//! `NT_PRSTATUS` note per CPU that checked in (the crashing CPU first, as
//! gdb's first thread), the hypervisor's `HVCRASH` note (reason,
//! coordinator, stragglers, per-CPU VMCLEAR ledger) and one `PT_LOAD` per
//! range of RAM. Only the headers and notes are read, never the gigabyte
//! of memory behind them; they are parsed with `kexec-loader`'s reader, the
//! one the hypervisor's writer is tested against.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kexec_loader::crash_note::{VmclearOutcome, VmclearRecord, cpu_flags};
use kexec_loader::elfcore::{
    CoreDump, CpuRegisters, EHDR_LEN, ElfCoreError, PHDR_LEN, PT_LOAD, PT_NOTE, ProgramHeader,
};
use object::{Object, ObjectSymbol, SymbolKind};
use serde_json::{Value, json};

/// What the first read of a dump takes: enough for the headers and notes
/// of hundreds of CPUs.
const FIRST_READ: u64 = 256 << 10;

/// One CPU's `NT_PRSTATUS` note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuNote {
    /// gdb's thread number: the note's position, from 1.
    pub thread: usize,
    /// `pr_pid`.
    pub pid: i32,
    /// The CPU index (`pr_pid - 1`), if `pr_pid` is positive.
    pub cpu_index: Option<u32>,
    /// The interrupted context.
    pub regs: CpuRegisters,
}

/// One CPU's part of the VMCLEAR ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCpu {
    /// CPU index.
    pub cpu_index: u32,
    /// APIC ID.
    pub apic_id: u32,
    /// `kexec_loader::crash_note::cpu_flags`.
    pub flags: u32,
    /// VMCSes loaded on it at the crash (from the vCPUs' own state).
    pub vmcs_loaded: u32,
    /// The VMCLEARs it executed.
    pub vmclears: Vec<VmclearRecord>,
}

impl LedgerCpu {
    /// VMCLEARs that succeeded.
    pub fn cleared(&self) -> usize {
        self.vmclears
            .iter()
            .filter(|v| v.outcome == VmclearOutcome::Succeeded)
            .count()
    }
}

/// The hypervisor's `HVCRASH` note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashInfo {
    /// Why it crashed.
    pub reason: String,
    /// CPU index of the coordinator.
    pub coordinator: u32,
    /// APIC IDs of the CPUs that did not check in.
    pub stragglers: Vec<u32>,
    /// The per-CPU ledger.
    pub ledger: Vec<LedgerCpu>,
}

/// Any other note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherNote {
    /// Its name.
    pub name: String,
    /// `n_type`.
    pub n_type: u32,
    /// Descriptor length.
    pub len: usize,
}

/// Everything `cargo xtask dump` shows, read from a dump's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpInfo {
    /// The file.
    pub path: PathBuf,
    /// Its length.
    pub file_bytes: u64,
    /// Where its last segment ends (`max(p_offset + p_filesz)`): the
    /// length the file must have.
    pub data_end: u64,
    /// The CPUs' notes, in gdb's thread order.
    pub cpus: Vec<CpuNote>,
    /// The crash note, if the dump has one.
    pub crash: Option<CrashInfo>,
    /// The memory: `PT_LOAD` program headers.
    pub segments: Vec<ProgramHeader>,
    /// Notes that are neither `NT_PRSTATUS`, `HVCRASH`, nor the image's
    /// `NT_AUXV` and `NT_FILE` (a Linux `/proc/vmcore` may add its own).
    pub other_notes: Vec<OtherNote>,
    /// hv's image, as its `NT_AUXV` and `NT_FILE` notes describe it.
    pub image: Option<ImageInfo>,
}

/// The hypervisor image a dump names (`NT_AUXV`, `NT_FILE`), and its GNU
/// build ID, read from the dump's memory where the image's program headers
/// say its note is (as drgn reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name in `NT_FILE`.
    pub name: String,
    /// `AT_PHDR`.
    pub phdr_addr: u64,
    /// `AT_PHNUM`.
    pub phnum: u64,
    /// The mapped ranges: (start, end, file offset).
    pub mappings: Vec<(u64, u64, u64)>,
    /// The build ID in hex, when the dump's memory holds it.
    pub build_id: Option<String>,
}

/// A GNU build ID note's type.
const NT_GNU_BUILD_ID: u32 = 3;

impl DumpInfo {
    /// Reads the headers and notes of the dump at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_bytes = file.metadata()?.len();
        let mut want = FIRST_READ.min(file_bytes);
        // At most three reads: the first guess, then what the headers say.
        for _ in 0..3 {
            let header = read_prefix(&mut file, want)?;
            match CoreDump::parse(&header) {
                Ok(core) => {
                    let mut info = Self::from_core(&core, path, file_bytes)?;
                    let build_id = info.read_build_id(&mut file);
                    if let Some(image) = &mut info.image {
                        image.build_id = build_id;
                    }
                    return Ok(info);
                }
                Err(ElfCoreError::Truncated { needed, .. }) if (needed as u64) > want => {
                    want = needed as u64;
                }
                Err(ElfCoreError::NoteSegmentOutOfBounds) if want < file_bytes => {
                    match note_segment_end(&header) {
                        Some(end) if end > want && end <= file_bytes => want = end,
                        _ => bail!(
                            "{}: the PT_NOTE segment lies outside the file",
                            path.display()
                        ),
                    }
                }
                Err(error) => bail!("{} is not a readable dump: {error}", path.display()),
            }
        }
        bail!("{}: the headers keep growing", path.display())
    }

    fn from_core(core: &CoreDump<'_>, path: &Path, file_bytes: u64) -> Result<Self> {
        let cpus = core
            .cpus()
            .enumerate()
            .map(|(i, cpu)| CpuNote {
                thread: i + 1,
                pid: cpu.pid,
                cpu_index: cpu.cpu_index(),
                regs: cpu.regs,
            })
            .collect();
        let crash = core.crash_note().map(|note| CrashInfo {
            reason: note.reason().to_owned(),
            coordinator: note.coordinator(),
            stragglers: note.stragglers().collect(),
            ledger: note
                .cpus()
                .map(|cpu| LedgerCpu {
                    cpu_index: cpu.cpu_index,
                    apic_id: cpu.apic_id,
                    flags: cpu.flags,
                    vmcs_loaded: cpu.vmcs_loaded,
                    vmclears: cpu.vmclears().collect(),
                })
                .collect(),
        });
        let image = core.image_notes().map(|notes| {
            let entries: Vec<_> = notes.files.entries().collect();
            ImageInfo {
                name: entries
                    .first()
                    .map(|(_, name)| String::from_utf8_lossy(name).into_owned())
                    .unwrap_or_default(),
                phdr_addr: notes.phdr_addr,
                phnum: notes.phnum,
                mappings: entries
                    .iter()
                    .map(|(m, _)| (m.start, m.end, m.file_offset))
                    .collect(),
                build_id: None,
            }
        });
        let other_notes = core
            .notes()
            .filter(|note| {
                let core_note = |n_type| note.name == b"CORE" && note.n_type == n_type;
                let crash = note.name == kexec_loader::crash_note::CRASH_NOTE_NAME.as_bytes()
                    && note.n_type == kexec_loader::crash_note::NT_HV_CRASH;
                let known = core_note(kexec_loader::elfcore::NT_PRSTATUS)
                    || (image.is_some()
                        && (core_note(kexec_loader::elfcore::NT_AUXV)
                            || core_note(kexec_loader::elfcore::NT_FILE)));
                !known && !crash
            })
            .map(|note| OtherNote {
                name: String::from_utf8_lossy(note.name).into_owned(),
                n_type: note.n_type,
                len: note.desc.len(),
            })
            .collect();
        let mut data_end = 0u64;
        for phdr in core.program_headers() {
            if phdr.p_type == PT_LOAD || phdr.p_type == PT_NOTE {
                let end = phdr
                    .p_offset
                    .checked_add(phdr.p_filesz)
                    .context("a program header overflows")?;
                data_end = data_end.max(end);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file_bytes,
            data_end,
            cpus,
            crash,
            segments: core.load_segments().collect(),
            other_notes,
            image,
        })
    }

    /// `len` bytes of the crashed machine's memory at virtual `address`,
    /// when one `PT_LOAD`'s file bytes hold them all.
    fn read_memory(&self, file: &mut File, address: u64, len: u64) -> Option<Vec<u8>> {
        let segment = self.segments.iter().find(|s| {
            address >= s.p_vaddr
                && address
                    .checked_add(len)
                    .is_some_and(|end| end <= s.p_vaddr.saturating_add(s.p_filesz))
        })?;
        let offset = segment.p_offset.checked_add(address - segment.p_vaddr)?;
        file.seek(SeekFrom::Start(offset)).ok()?;
        let mut bytes = vec![0; usize::try_from(len).ok()?];
        file.read_exact(&mut bytes).ok()?;
        Some(bytes)
    }

    /// The image's GNU build ID, from its program headers and notes in the
    /// dump's memory.
    fn read_build_id(&self, file: &mut File) -> Option<String> {
        let image = self.image.as_ref()?;
        let count = image.phnum.min(64);
        let table = self.read_memory(file, image.phdr_addr, count * PHDR_LEN as u64)?;
        (0..count as usize).find_map(|i| {
            let field = |at: usize| {
                table
                    .get(i * PHDR_LEN + at..i * PHDR_LEN + at + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            };
            let p_type = field(0)? as u32;
            let (vaddr, filesz) = (field(16)?, field(32)?);
            if p_type != PT_NOTE || filesz > 4096 {
                return None;
            }
            let notes = self.read_memory(file, vaddr, filesz)?;
            gnu_build_id(&notes)
        })
    }

    /// What makes the file unusable as a whole, beyond its headers.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.file_bytes < self.data_end {
            problems.push(format!(
                "the dump is truncated: {} bytes, its segments reach {}",
                self.file_bytes, self.data_end
            ));
        }
        if self.cpus.is_empty() {
            problems.push("the dump has no NT_PRSTATUS note".to_owned());
        }
        if self.crash.is_none() {
            problems.push("the dump has no HVCRASH note".to_owned());
        }
        if self.segments.is_empty() {
            problems.push("the dump has no PT_LOAD segment".to_owned());
        }
        problems
    }

    /// Memory in the dump, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.p_memsz).sum()
    }

    /// The summary as JSON (`cargo xtask dump --json`, and the tests).
    pub fn to_json(&self) -> Value {
        json!({
            "path": self.path,
            "file_bytes": self.file_bytes,
            "data_end": self.data_end,
            "cpus": self.cpus.iter().map(|cpu| json!({
                "thread": cpu.thread,
                "pid": cpu.pid,
                "cpu_index": cpu.cpu_index,
                "rip": cpu.regs.rip,
                "rsp": cpu.regs.rsp,
                "rbp": cpu.regs.rbp,
            })).collect::<Vec<_>>(),
            "crash": self.crash.as_ref().map(|crash| json!({
                "reason": crash.reason,
                "coordinator": crash.coordinator,
                "stragglers": crash.stragglers,
                "ledger": crash.ledger.iter().map(|cpu| json!({
                    "cpu_index": cpu.cpu_index,
                    "apic_id": cpu.apic_id,
                    "flags": flag_names(cpu.flags),
                    "vmcs_loaded": cpu.vmcs_loaded,
                    "vmclears": cpu.vmclears.iter().map(|v| json!({
                        "vmcs": v.vmcs_phys,
                        "outcome": outcome_name(v.outcome),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })),
            "segments": self.segments.iter().map(|s| json!({
                "paddr": s.p_paddr,
                "vaddr": s.p_vaddr,
                "size": s.p_memsz,
                "offset": s.p_offset,
            })).collect::<Vec<_>>(),
            "other_notes": self.other_notes.iter().map(|n| json!({
                "name": n.name, "type": n.n_type, "len": n.len,
            })).collect::<Vec<_>>(),
            "image": self.image.as_ref().map(|image| json!({
                "name": image.name,
                "phdr_addr": image.phdr_addr,
                "phnum": image.phnum,
                "mappings": image.mappings.iter().map(|(start, end, offset)| json!({
                    "start": start, "end": end, "file_offset": offset,
                })).collect::<Vec<_>>(),
                "build_id": image.build_id,
            })),
            "problems": self.problems(),
        })
    }

    /// The human summary; `verbose` adds every register, `symbols` names
    /// each RIP.
    pub fn render(&self, verbose: bool, symbols: Option<&Symbols>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "dump {}: {} bytes, ELF64 core for x86_64",
            self.path.display(),
            self.file_bytes
        );
        for problem in self.problems() {
            let _ = writeln!(out, "  !! {problem}");
        }
        match &self.crash {
            Some(crash) => {
                let _ = writeln!(out, "crash        {}", crash.reason);
                let _ = writeln!(out, "coordinator  CPU {}", crash.coordinator);
                let _ = writeln!(
                    out,
                    "stragglers   {}",
                    if crash.stragglers.is_empty() {
                        "none".to_owned()
                    } else {
                        format!(
                            "APIC IDs {}",
                            crash
                                .stragglers
                                .iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
            }
            None => out.push_str("crash        (no HVCRASH note)\n"),
        }

        let _ = writeln!(
            out,
            "\nCPUs: {} NT_PRSTATUS notes (gdb threads, the first is the crashing CPU)",
            self.cpus.len()
        );
        let _ = writeln!(
            out,
            "  {:>6}  {:>4}  {:>4}  {:<30}  {:<18}  {:<18}  {:<18}",
            "thread", "cpu", "apic", "state", "rip", "rsp", "rbp"
        );
        for cpu in &self.cpus {
            let ledger = self.ledger_of(cpu.cpu_index);
            let _ = writeln!(
                out,
                "  {:>6}  {:>4}  {:>4}  {:<30}  {:#018x}  {:#018x}  {:#018x}",
                cpu.thread,
                cpu.cpu_index
                    .map_or_else(|| format!("pid{}", cpu.pid), |i| i.to_string()),
                ledger.map_or("?".to_owned(), |l| l.apic_id.to_string()),
                ledger.map_or(String::new(), |l| flag_names(l.flags).join(",")),
                cpu.regs.rip,
                cpu.regs.rsp,
                cpu.regs.rbp,
            );
            if let Some(symbols) = symbols {
                let _ = writeln!(
                    out,
                    "          rip in {}",
                    symbols
                        .lookup(cpu.regs.rip)
                        .unwrap_or_else(|| "(no symbol)".to_owned())
                );
            }
            if verbose {
                out.push_str(&registers(&cpu.regs));
            }
        }

        if let Some(crash) = &self.crash {
            let loaded: u64 = crash.ledger.iter().map(|c| u64::from(c.vmcs_loaded)).sum();
            let executed: usize = crash.ledger.iter().map(|c| c.vmclears.len()).sum();
            let cleared: usize = crash.ledger.iter().map(LedgerCpu::cleared).sum();
            // On SVM the table's entries are VMCBs, each cleared by zeroing
            // its clean bits.
            let svm = crash
                .ledger
                .iter()
                .any(|cpu| cpu.flags & cpu_flags::SVM_WAS_ON != 0);
            let _ = if svm {
                writeln!(
                    out,
                    "\nVMCB ledger: {} CPUs, {loaded} VMCB loaded at the crash, {executed} clears, {cleared} succeeded",
                    crash.ledger.len()
                )
            } else {
                writeln!(
                    out,
                    "\nVMCLEAR ledger: {} CPUs, {loaded} VMCS loaded at the crash, {executed} VMCLEARs, {cleared} succeeded",
                    crash.ledger.len()
                )
            };
            for cpu in &crash.ledger {
                let clears = cpu
                    .vmclears
                    .iter()
                    .map(|v| format!("{:#x} {}", v.vmcs_phys, outcome_name(v.outcome)))
                    .collect::<Vec<_>>();
                let _ = writeln!(
                    out,
                    "  CPU {:>3} (APIC {:>3}) {:<30} loaded {:>2}, cleared {:>2}{}{}",
                    cpu.cpu_index,
                    cpu.apic_id,
                    flag_names(cpu.flags).join(","),
                    cpu.vmcs_loaded,
                    cpu.cleared(),
                    if clears.is_empty() { "" } else { ": " },
                    clears.join(", ")
                );
            }
        }

        let _ = writeln!(
            out,
            "\nmemory: {} PT_LOAD segments, {} in all",
            self.segments.len(),
            human_bytes(self.memory_bytes())
        );
        let _ = writeln!(
            out,
            "  {:<37}  {:<18}  {:>10}  {:<12}",
            "physical", "virtual", "size", "file offset"
        );
        for s in &self.segments {
            let _ = writeln!(
                out,
                "  {:#018x}-{:#018x}  {:#018x}  {:>10}  {:#x}",
                s.p_paddr,
                s.p_paddr.saturating_add(s.p_memsz).saturating_sub(1),
                s.p_vaddr,
                human_bytes(s.p_memsz),
                s.p_offset
            );
        }
        for note in &self.other_notes {
            let _ = writeln!(
                out,
                "other note: {} type {:#x}, {} bytes",
                note.name, note.n_type, note.len
            );
        }
        match &self.image {
            Some(image) => {
                let _ = writeln!(
                    out,
                    "image: {} (NT_FILE), program headers at {:#x} (NT_AUXV), build ID {}",
                    image.name,
                    image.phdr_addr,
                    image
                        .build_id
                        .as_deref()
                        .unwrap_or("not in the dump's memory")
                );
                if let (Some(dump), Some(elf)) = (
                    image.build_id.as_deref(),
                    symbols.and_then(|s| s.build_id.as_deref()),
                ) {
                    let _ = writeln!(
                        out,
                        "  {}",
                        if dump == elf {
                            "the --elf file has this build ID: its symbols are this hv's".to_owned()
                        } else {
                            format!(
                                "!! the --elf file's build ID is {elf}: a different build, its \
                                 symbols do not fit this dump"
                            )
                        }
                    );
                }
            }
            None => {
                out.push_str("image: no NT_AUXV/NT_FILE notes (drgn cannot attach hv's symbols)\n")
            }
        }
        out
    }

    fn ledger_of(&self, cpu_index: Option<u32>) -> Option<&LedgerCpu> {
        let index = cpu_index?;
        self.crash
            .as_ref()?
            .ledger
            .iter()
            .find(|l| l.cpu_index == index)
    }
}

/// The GNU build ID among `notes` (4-byte aligned), in hex.
pub fn gnu_build_id(notes: &[u8]) -> Option<String> {
    let mut at = 0usize;
    let word = |at: usize| {
        notes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    };
    while at + 12 <= notes.len() {
        let (namesz, descsz, n_type) = (word(at)?, word(at + 4)?, word(at + 8)? as u32);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
        let end = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        if notes.get(name_at..name_at + namesz) == Some(b"GNU\0".as_slice())
            && n_type == NT_GNU_BUILD_ID
        {
            let id = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
            return Some(id.iter().map(|b| format!("{b:02x}")).collect());
        }
        at = end;
    }
    None
}

/// Reads the first `len` bytes of `file`.
fn read_prefix(file: &mut File, len: u64) -> Result<Vec<u8>> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Where the `PT_NOTE` segment ends, from raw program headers (used when
/// the first read stopped short of the notes).
fn note_segment_end(header: &[u8]) -> Option<u64> {
    let phnum = u16::from_le_bytes(header.get(56..58)?.try_into().ok()?) as usize;
    (0..phnum).find_map(|i| {
        let at = EHDR_LEN + i * PHDR_LEN;
        let field = |o: usize| {
            header
                .get(at + o..at + o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let p_type = u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?);
        (p_type == PT_NOTE).then(|| field(8)?.checked_add(field(32)?))?
    })
}

/// The names of a ledger record's flags.
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (cpu_flags::COORDINATOR, "coordinator"),
        (cpu_flags::CHECKED_IN, "checked-in"),
        (cpu_flags::VMX_WAS_ON, "vmx-was-on"),
        (cpu_flags::VMXOFF_DONE, "vmxoff"),
        (cpu_flags::SVM_WAS_ON, "svm-was-on"),
        (cpu_flags::SVM_OFF, "svm-off"),
        (cpu_flags::NMI_IN_GUEST, "nmi-in-guest"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn outcome_name(outcome: VmclearOutcome) -> String {
    match outcome {
        VmclearOutcome::Succeeded => "ok".to_owned(),
        VmclearOutcome::FailInvalid => "VMfailInvalid".to_owned(),
        VmclearOutcome::FailValid(error) => format!("VMfailValid({error})"),
    }
}

/// Every register of a CPU, three to a line.
fn registers(regs: &CpuRegisters) -> String {
    const NAMES: [&str; 27] = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
        "es", "fs", "gs",
    ];
    let mut out = String::new();
    for (i, (name, value)) in NAMES.iter().zip(regs.to_array()).enumerate() {
        let _ = write!(
            out,
            "{}{name:>8} {value:#018x}",
            if i % 3 == 0 { "        " } else { "  " }
        );
        if i % 3 == 2 || i == NAMES.len() - 1 {
            out.push('\n');
        }
    }
    out
}

fn human_bytes(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB => format!("{:.1} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b if b >= KIB => format!("{:.1} KiB", b as f64 / KIB as f64),
        b => format!("{b} B"),
    }
}

/// The function symbols of an ELF, to name addresses.
#[derive(Debug, Clone, Default)]
pub struct Symbols {
    /// `(start, size, demangled name)`, sorted by start.
    entries: Vec<(u64, u64, String)>,
    /// The ELF's GNU build ID in hex.
    pub build_id: Option<String>,
}

impl Symbols {
    /// Reads the symbol table of `elf`.
    pub fn load(elf: &Path) -> Result<Self> {
        let bytes = std::fs::read(elf).with_context(|| format!("reading {}", elf.display()))?;
        let file = object::File::parse(bytes.as_slice())
            .with_context(|| format!("{} is not an ELF file", elf.display()))?;
        let mut entries: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some((
                    s.address(),
                    s.size(),
                    format!("{:#}", rustc_demangle::demangle(name)),
                ))
            })
            .collect();
        if entries.is_empty() {
            bail!("{} has no function symbols", elf.display());
        }
        entries.sort();
        entries.dedup_by_key(|e| e.0);
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect());
        Ok(Self { entries, build_id })
    }

    /// `name+0xoffset` of the function holding `address`.
    pub fn lookup(&self, address: u64) -> Option<String> {
        let index = self.entries.partition_point(|e| e.0 <= address);
        let (start, size, name) = self.entries.get(index.checked_sub(1)?)?;
        let offset = address - start;
        // A symbol without a size (hand-written assembly) covers up to
        // the next symbol.
        let inside = if *size > 0 {
            offset < *size
        } else {
            self.entries.get(index).is_none_or(|next| address < next.0)
        };
        inside.then(|| {
            if offset == 0 {
                name.clone()
            } else {
                format!("{name}+{offset:#x}")
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kexec_loader::crash_note::{CpuLedger, CrashRecord};
    use kexec_loader::elfcore::{CpuState, MemorySegment, Placement, write_core_header};

    const CLEARS: [VmclearRecord; 2] = [
        VmclearRecord {
            vmcs_phys: 0x7f00_1000,
            outcome: VmclearOutcome::Succeeded,
        },
        VmclearRecord {
            vmcs_phys: 0x7f00_2000,
            outcome: VmclearOutcome::FailValid(5),
        },
    ];

    /// A dump file as hv's capture mode writes it: 3 CPUs (CPU 2 crashed
    /// and coordinated, APIC ID 9 never checked in), two memory ranges
    /// (one page of a pattern, one of zeros, then more pattern).
    pub(crate) fn sample_dump() -> Vec<u8> {
        let cpus: Vec<CpuState> = [2u32, 0, 1]
            .iter()
            .map(|&cpu_index| CpuState {
                cpu_index,
                regs: CpuRegisters {
                    rip: 0x20_1000 + u64::from(cpu_index),
                    rsp: 0x40_0000 - u64::from(cpu_index) * 0x1000,
                    rbp: 0x40_0100,
                    rax: 0xdead_beef,
                    ..CpuRegisters::default()
                },
            })
            .collect();
        let ledger = [
            CpuLedger {
                cpu_index: 0,
                apic_id: 0,
                flags: cpu_flags::CHECKED_IN | cpu_flags::VMX_WAS_ON | cpu_flags::VMXOFF_DONE,
                vmcs_loaded: 2,
                vmclears: &CLEARS,
            },
            CpuLedger {
                cpu_index: 1,
                apic_id: 1,
                flags: cpu_flags::CHECKED_IN,
                vmcs_loaded: 0,
                vmclears: &[],
            },
            CpuLedger {
                cpu_index: 2,
                apic_id: 2,
                flags: cpu_flags::CHECKED_IN | cpu_flags::COORDINATOR,
                vmcs_loaded: 0,
                vmclears: &[],
            },
        ];
        let crash = CrashRecord {
            reason: "panic: injected crash",
            coordinator: 2,
            stragglers: &[9],
            cpus: &ledger,
        };
        let segments = [
            MemorySegment {
                phys: 0,
                virt: 0,
                len: 0x3000,
            },
            MemorySegment {
                phys: 0x10_0000,
                virt: 0x10_0000,
                len: 0x2000,
            },
        ];
        let mut header = vec![0u8; 64 << 10];
        let layout =
            write_core_header(&mut header, &cpus, &crash, &segments, None, Placement::File)
                .unwrap();
        let mut file = header[..layout.len].to_vec();
        file.resize(layout.data_offset as usize, 0);
        for segment in &segments {
            for page in 0..segment.len / 4096 {
                let byte = if segment.phys == 0 && page == 1 {
                    0
                } else {
                    (segment.phys / 4096 + page + 1) as u8
                };
                file.extend(std::iter::repeat_n(byte, 4096));
            }
        }
        file
    }

    fn sample_file(name: &str) -> (PathBuf, Vec<u8>) {
        let path = std::env::temp_dir().join(format!("xtask-dump-{name}-{}", std::process::id()));
        let bytes = sample_dump();
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    #[test]
    fn a_dump_reads_back_cpus_crash_and_memory() {
        let (path, bytes) = sample_file("read");
        let info = DumpInfo::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(info.file_bytes, bytes.len() as u64);
        assert_eq!(info.data_end, bytes.len() as u64);
        assert_eq!(info.problems(), Vec::<String>::new());
        let threads: Vec<_> = info.cpus.iter().map(|c| (c.thread, c.cpu_index)).collect();
        assert_eq!(threads, [(1, Some(2)), (2, Some(0)), (3, Some(1))]);
        assert_eq!(info.cpus[0].regs.rip, 0x20_1002);
        let crash = info.crash.as_ref().unwrap();
        assert_eq!(crash.reason, "panic: injected crash");
        assert_eq!(crash.coordinator, 2);
        assert_eq!(crash.stragglers, [9]);
        assert_eq!(crash.ledger[0].vmclears, CLEARS);
        assert_eq!(crash.ledger[0].cleared(), 1);
        assert_eq!(info.segments.len(), 2);
        assert_eq!(info.memory_bytes(), 0x5000);
        assert!(info.other_notes.is_empty());
    }

    /// A dump whose memory holds an image's headers and build-ID note at
    /// 0x200000, as hv's linker script loads them, with the image notes.
    fn dump_with_image() -> Vec<u8> {
        use kexec_loader::elfcore::LoadedImage;
        const BASE: u64 = 0x20_0000;
        let mut memory = vec![0u8; 0x2000];
        memory[..4].copy_from_slice(b"\x7fELF");
        memory[4] = 2;
        memory[5] = 1;
        memory[6] = 1;
        memory[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        memory[18..20].copy_from_slice(&62u16.to_le_bytes());
        memory[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        memory[54..56].copy_from_slice(&56u16.to_le_bytes());
        memory[56..58].copy_from_slice(&2u16.to_le_bytes());
        let phdr = |memory: &mut Vec<u8>, i: usize, p_type: u32, offset: u64, size: u64| {
            let at = 64 + i * 56;
            memory[at..at + 4].copy_from_slice(&p_type.to_le_bytes());
            for (field, value) in [
                (8, offset),
                (16, BASE + offset),
                (24, BASE + offset),
                (32, size),
                (40, size),
            ] {
                memory[at + field..at + field + 8].copy_from_slice(&value.to_le_bytes());
            }
        };
        phdr(&mut memory, 0, PT_LOAD, 0, 0x2000);
        phdr(&mut memory, 1, PT_NOTE, 0x1000, 36);
        let note = &mut memory[0x1000..0x1024];
        note[..4].copy_from_slice(&4u32.to_le_bytes());
        note[4..8].copy_from_slice(&20u32.to_le_bytes());
        note[8..12].copy_from_slice(&3u32.to_le_bytes());
        note[12..16].copy_from_slice(b"GNU\0");
        for (i, byte) in note[16..36].iter_mut().enumerate() {
            *byte = 0xa0 + i as u8;
        }
        let image = LoadedImage::from_loaded_headers("hv", BASE, &memory[..0x1000]).unwrap();
        let crash = CrashRecord {
            reason: "x",
            coordinator: 0,
            stragglers: &[],
            cpus: &[],
        };
        let cpus = [CpuState {
            cpu_index: 0,
            regs: CpuRegisters::default(),
        }];
        let segments = [MemorySegment {
            phys: BASE,
            virt: BASE,
            len: 0x2000,
        }];
        let mut header = vec![0u8; 16 << 10];
        let layout = write_core_header(
            &mut header,
            &cpus,
            &crash,
            &segments,
            Some(&image),
            Placement::File,
        )
        .unwrap();
        let mut file = header[..layout.len].to_vec();
        file.resize(layout.data_offset as usize, 0);
        file.extend_from_slice(&memory);
        file
    }

    #[test]
    fn the_image_and_its_build_id_are_read_from_the_dump() {
        let path = std::env::temp_dir().join(format!("xtask-dump-image-{}", std::process::id()));
        std::fs::write(&path, dump_with_image()).unwrap();
        let info = DumpInfo::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let image = info.image.as_ref().expect("image notes");
        assert_eq!(image.name, "hv");
        assert_eq!(image.phdr_addr, 0x20_0040);
        assert_eq!(image.mappings, [(0x20_0000, 0x20_2000, 0)]);
        let expected: String = (0..20).map(|i| format!("{:02x}", 0xa0 + i)).collect();
        assert_eq!(image.build_id.as_deref(), Some(expected.as_str()));
        assert!(info.other_notes.is_empty(), "{:?}", info.other_notes);
        let text = info.render(false, None);
        assert!(text.contains(&format!("build ID {expected}")), "{text}");
        // Without the notes: said so.
        let (plain, _) = sample_file("no-image");
        let text = DumpInfo::read(&plain).unwrap().render(false, None);
        std::fs::remove_file(&plain).unwrap();
        assert!(text.contains("image: no NT_AUXV/NT_FILE notes"), "{text}");
    }

    #[test]
    fn gnu_build_ids_are_found_among_notes() {
        let mut notes = Vec::new();
        for (name, n_type, desc) in [
            (b"Xen\0", 18u32, vec![1u8; 8]),
            (b"GNU\0", 3, vec![0xab, 0xcd]),
        ] {
            notes.extend_from_slice(&4u32.to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&n_type.to_le_bytes());
            notes.extend_from_slice(name);
            notes.extend_from_slice(&desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        assert_eq!(gnu_build_id(&notes).as_deref(), Some("abcd"));
        assert_eq!(gnu_build_id(&notes[..20]), None);
        assert_eq!(gnu_build_id(&[0xff; 40]), None);
    }

    /// The Python helpers of `xtask/debug/` (the gdb commands and the drgn
    /// module) decode the crash note themselves: they must read what
    /// kexec-loader wrote as this crate reads it. Skipped (with a message)
    /// where python3 is not installed.
    #[test]
    fn the_debugger_helpers_read_the_crash_note_as_xtask_does() {
        let (path, _) = sample_file("python");
        let script = crate::paths::workspace_root().join("xtask/debug/hvcore.py");
        let Ok(output) = std::process::Command::new("python3")
            .arg(&script)
            .arg(&path)
            .output()
        else {
            eprintln!("python3 not installed: debugger helper test skipped");
            std::fs::remove_file(&path).unwrap();
            return;
        };
        std::fs::remove_file(&path).unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for needed in [
            "crash        panic: injected crash",
            "coordinator  CPU 2",
            "stragglers   APIC IDs 9",
            "VMCLEAR ledger: 3 CPUs, 2 VMCS loaded at the crash, 2 VMCLEARs, 1 succeeded",
            "CPU   2 (APIC   2) coordinator,checked-in",
        ] {
            assert!(text.contains(needed), "missing {needed:?} in\n{text}");
        }
        // The ledger lines are the ones `cargo xtask dump` prints.
        let (path, _) = sample_file("python-compare");
        let ours = DumpInfo::read(&path).unwrap().render(false, None);
        std::fs::remove_file(&path).unwrap();
        let ledger = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("  CPU ") && l.contains(" loaded "))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(ledger(&text), ledger(&ours), "{text}\n{ours}");
        assert_eq!(ledger(&ours).len(), 3);
    }

    #[test]
    fn the_summary_names_everything_a_person_looks_for() {
        let (path, _) = sample_file("render");
        let info = DumpInfo::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = info.render(false, None);
        for needed in [
            "crash        panic: injected crash",
            "coordinator  CPU 2",
            "stragglers   APIC IDs 9",
            "CPUs: 3 NT_PRSTATUS notes",
            "0x0000000000201002",
            "coordinator,checked-in",
            "VMCLEAR ledger: 3 CPUs, 2 VMCS loaded at the crash, 2 VMCLEARs, 1 succeeded",
            "0x7f001000 ok, 0x7f002000 VMfailValid(5)",
            "memory: 2 PT_LOAD segments, 20.0 KiB in all",
            "0x0000000000100000-0x0000000000101fff",
        ] {
            assert!(text.contains(needed), "missing {needed:?} in\n{text}");
        }
        assert!(!text.contains("orig_rax"));
        let verbose = info.render(true, None);
        assert!(verbose.contains("     rax 0x00000000deadbeef"), "{verbose}");
        assert!(verbose.contains("orig_rax"));
        let json = info.to_json();
        assert_eq!(json["crash"]["coordinator"], 2);
        assert_eq!(json["cpus"][0]["cpu_index"], 2);
        assert_eq!(
            json["crash"]["ledger"][0]["vmclears"][1]["outcome"],
            "VMfailValid(5)"
        );
    }

    #[test]
    fn a_truncated_dump_is_named_and_garbage_refused() {
        let (path, bytes) = sample_file("truncated");
        std::fs::write(&path, &bytes[..bytes.len() - 4096]).unwrap();
        let info = DumpInfo::read(&path).unwrap();
        assert_eq!(
            info.problems(),
            [format!(
                "the dump is truncated: {} bytes, its segments reach {}",
                bytes.len() - 4096,
                bytes.len()
            )]
        );
        std::fs::write(
            &path,
            b"not a dump at all, but long enough to hold an ELF header........",
        )
        .unwrap();
        let error = DumpInfo::read(&path).unwrap_err().to_string();
        assert!(
            error.contains("is not a readable dump: no ELF magic"),
            "{error}"
        );
        std::fs::write(&path, &bytes[..100]).unwrap();
        assert!(DumpInfo::read(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn headers_larger_than_the_first_read_are_read_whole() {
        // Many CPUs: the notes run past FIRST_READ.
        let cpus: Vec<CpuState> = (0..1000u32)
            .map(|cpu_index| CpuState {
                cpu_index,
                regs: CpuRegisters::default(),
            })
            .collect();
        let crash = CrashRecord {
            reason: "r",
            coordinator: 0,
            stragglers: &[],
            cpus: &[],
        };
        let segments = [MemorySegment {
            phys: 0,
            virt: 0,
            len: 4096,
        }];
        let mut header = vec![0u8; 1 << 20];
        let layout =
            write_core_header(&mut header, &cpus, &crash, &segments, None, Placement::File)
                .unwrap();
        assert!(layout.len as u64 > FIRST_READ);
        let mut file = header[..layout.len].to_vec();
        file.resize(layout.data_offset as usize + 4096, 0);
        let path = std::env::temp_dir().join(format!("xtask-dump-big-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let info = DumpInfo::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(info.cpus.len(), 1000);
        assert!(info.problems().is_empty(), "{:?}", info.problems());
    }

    #[inline(never)]
    fn a_function_to_find() -> u32 {
        std::hint::black_box(42)
    }

    #[test]
    fn symbols_name_addresses_inside_functions() {
        assert_eq!(a_function_to_find(), 42);
        let symbols = Symbols::load(&std::env::current_exe().unwrap()).unwrap();
        let (start, size, name) = symbols
            .entries
            .iter()
            .find(|e| e.2.ends_with("dump::tests::a_function_to_find"))
            .cloned()
            .expect("the test binary has its own symbols");
        assert_eq!(symbols.lookup(start).as_deref(), Some(name.as_str()));
        assert_eq!(symbols.lookup(start + 1), Some(format!("{name}+0x1")));
        assert!(size > 0);
        assert_ne!(
            symbols.lookup(start + size),
            Some(format!("{name}+{size:#x}"))
        );
        assert_eq!(symbols.lookup(0), None);
        assert!(Symbols::load(Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn flags_have_names() {
        assert_eq!(
            flag_names(cpu_flags::CHECKED_IN | cpu_flags::COORDINATOR),
            ["coordinator", "checked-in"]
        );
        assert!(flag_names(0).is_empty());
    }
}
