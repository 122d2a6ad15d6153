//! Platform guests: real kernels (multiboot1 boot modules, such as
//! kvm-unit-tests) each on a virtual platform of its own (`hv_devices`).
//!
//! - creation ([`create_all`]): a guest module's command line
//!   (`hv_core::guest_spec`), its image parsed and planned in full
//!   (`hv_devices::multiboot`) before its RAM is taken from the frame
//!   allocator, then loaded with its environment file and command line,
//!   the ACPI tables written, nested page tables built; a bad guest is
//!   refused with the reason and the others go on;
//! - the registry: each guest's settings ([`GuestInfo`], fixed once
//!   created), its shared counters ([`GuestShared`]) and its platform
//!   behind a lock its vCPUs share ([`platform`]);
//! - [`exits`]: what each VM exit of a platform vCPU does;
//! - stopping ([`stop_by_kernel`], [`mark_stopped`]) and the report lines.
//!
//! The vCPUs themselves are scheduled by `virt::sched` like every other.

pub mod exits;
pub mod glue;

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hv_core::cmdline::Options;
use hv_core::guest_spec::{self, GuestSpec, ModuleRole};
use hv_devices::acpi_tables;
use hv_devices::cpu_state::MultibootEntryState;
use hv_devices::cpuid::{CpuidPolicy, GuestFeatures};
use hv_devices::debug_exit::Verdict;
use hv_devices::multiboot::{self, GuestLayout, LoadPlan, MultibootImage};
use hv_devices::platform::{Platform, PlatformConfig, StopReason};
use spin::Mutex;

use self::glue::{GuestConsole, GuestRam, NativeCpuid, TscClock};
use super::PlatformBackend;
use crate::arch::cpu::rdtsc;
use crate::boot::info::{BootInfo, Module};
use crate::cpu::time;
use crate::mm;

/// Most guests one boot runs.
pub const MAX_GUESTS: usize = 16;
/// A guest's RAM is a whole number of 2 MiB pages (the EPT's).
const RAM_ALIGN: u64 = 2 << 20;

/// A guest's platform.
pub type GuestPlatform = Platform<TscClock, GuestConsole>;

/// Each guest's platform, behind the lock its vCPUs share. Static: a
/// platform is 16 KiB, too big to move around on a stack.
static PLATFORMS: [Mutex<Option<GuestPlatform>>; MAX_GUESTS] =
    [const { Mutex::new(None) }; MAX_GUESTS];

/// Guest `index`'s platform.
pub fn platform(index: usize) -> &'static Mutex<Option<GuestPlatform>> {
    &PLATFORMS[index]
}

/// A guest's name, as given or `guestN`.
#[derive(Debug, Clone, Copy)]
pub struct Name {
    bytes: [u8; guest_spec::MAX_NAME],
    len: usize,
}

impl Name {
    fn new(text: &str) -> Self {
        let mut name = Self {
            bytes: [0; guest_spec::MAX_NAME],
            len: text.len().min(guest_spec::MAX_NAME),
        };
        name.bytes[..name.len].copy_from_slice(&text.as_bytes()[..name.len]);
        name
    }

    fn numbered(index: usize) -> Self {
        let mut text = Line::new();
        let _ = write!(text, "guest{index}");
        Self::new(text.as_str())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("guest")
    }
}

/// A small formatting buffer (messages, command lines).
#[derive(Debug)]
pub struct Line {
    bytes: [u8; 512],
    len: usize,
}

impl Line {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            bytes: [0; 512],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // Cut at a character boundary when full.
        let room = self.bytes.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// A guest's settings, fixed once it is created.
#[derive(Debug, Clone, Copy)]
pub struct GuestInfo {
    /// Its name.
    pub name: Name,
    /// vCPUs.
    pub vcpus: usize,
    /// Global index of its first vCPU (`virt::sched`'s array).
    pub first_vcpu: usize,
    /// Its RAM: guest-physical 0 at this host address.
    pub ram: GuestRam,
    /// The nested page tables' root.
    pub nested_root: u64,
    /// What CPUID and the MSR policy offer it.
    pub features: GuestFeatures,
    /// The boot vCPU's entry state.
    pub entry: MultibootEntryState,
    /// Time limit (TSC ticks after its start).
    pub timeout_ticks: u64,
    /// VM-exit limit (`u64::MAX`: none).
    pub max_exits: u64,
}

/// Why hv (not the guest's platform) stopped a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelStop {
    /// It ran past its time limit.
    Timeout,
    /// It took more VM exits than it may.
    ExitFlood {
        /// The exits taken.
        exits: u64,
    },
    /// It touched guest-physical memory that is neither its RAM nor a
    /// device (outside its EPT).
    OutsideRam {
        /// The address.
        gpa: u64,
        /// Its instruction pointer.
        rip: u64,
    },
    /// It accessed a device with an instruction hv does not emulate.
    UndecodableMmio {
        /// The address.
        gpa: u64,
        /// Its instruction pointer.
        rip: u64,
    },
    /// The backend refused it or met an exit it cannot handle.
    Backend(hv_core::exits::Stop),
}

/// What other CPUs may read and count of a guest.
#[derive(Debug)]
pub struct GuestShared {
    /// Set once the guest stopped, for good.
    pub stopped: AtomicBool,
    /// TSC at its start.
    pub started: AtomicU64,
    /// TSC at its stop.
    pub stopped_at: AtomicU64,
    /// VM exits of all its vCPUs.
    pub exits: AtomicU64,
    /// vCPUs not yet retired.
    pub live_vcpus: AtomicUsize,
    /// The cores that ran it (bit n: CPU n, first 64 only).
    pub cores: AtomicU64,
    /// Most of its VMCSes loaded on different cores at one time.
    pub most_cores_at_once: AtomicU32,
    /// Why hv stopped it, if hv did.
    pub kernel_stop: Mutex<Option<KernelStop>>,
}

static SHARED: [GuestShared; MAX_GUESTS] = [const {
    GuestShared {
        stopped: AtomicBool::new(false),
        started: AtomicU64::new(0),
        stopped_at: AtomicU64::new(0),
        exits: AtomicU64::new(0),
        live_vcpus: AtomicUsize::new(0),
        cores: AtomicU64::new(0),
        most_cores_at_once: AtomicU32::new(0),
        kernel_stop: Mutex::new(None),
    }
}; MAX_GUESTS];

/// Guest `index`'s shared half.
pub fn shared(index: usize) -> &'static GuestShared {
    &SHARED[index]
}

static INFOS: spin::Once<&'static [GuestInfo]> = spin::Once::new();

/// The guests created.
pub fn infos() -> &'static [GuestInfo] {
    INFOS.get().copied().unwrap_or(&[])
}

/// Guest `index`'s settings.
pub fn info(index: usize) -> &'static GuestInfo {
    &infos()[index]
}

/// What creating the guests gave.
#[derive(Debug, Clone, Copy, Default)]
pub struct Created {
    /// Guest modules found.
    pub modules: usize,
    /// Guests created.
    pub guests: usize,
    /// Their vCPUs in all.
    pub vcpus: usize,
}

/// How many boot modules are guests.
pub fn guest_modules<'a>(modules: impl Iterator<Item = &'a Module>) -> usize {
    modules
        .filter(|m| guest_spec::module_role(m.cmdline) == ModuleRole::Guest)
        .count()
}

/// Reports every guest module refused with `reason` (a report word) and
/// `why`, when none of them can run (the backend has no platform glue, or
/// there is no backend); returns how many there were.
pub fn refuse_all<'a>(
    modules: impl Iterator<Item = &'a Module>,
    reason: &str,
    why: core::fmt::Arguments<'_>,
) -> usize {
    let mut number = 0;
    for module in modules {
        if guest_spec::module_role(module.cmdline) != ModuleRole::Guest {
            continue;
        }
        let name = guest_spec::parse(module.cmdline)
            .ok()
            .and_then(|spec| spec.name)
            .map_or_else(|| Name::numbered(number), Name::new);
        refuse(number, &name, reason, why);
        number += 1;
    }
    number
}

/// Most boot modules [`create_all`] looks at.
pub const MAX_MODULES: usize = crate::boot::info::MAX_MODULES;

/// What [`create_all`] hands its worker on the other stack, and gets back.
struct Job {
    modules: [Option<&'static Module>; MAX_MODULES],
    options: Options,
    created: Option<Created>,
}

static JOB: Mutex<Option<Job>> = Mutex::new(None);

/// The stack guests are created on: a platform is built on the stack
/// before it moves into place, more than a CPU's main stack holds beside
/// the boot's own frames.
const CREATION_STACK_PAGES: u64 = 64;

/// The report's reason for a guest module that could not be loaded.
const LOAD_ERROR: &str = "load_error";

/// Creates every guest the boot modules define, in module order; a guest
/// that cannot be created is reported with the reason and skipped. Runs
/// on a stack of its own ([`CREATION_STACK_PAGES`]).
pub fn create_all<B: PlatformBackend>(boot: &'static BootInfo, options: &Options) -> Created {
    let modules = boot.modules();
    let mut job = Job {
        modules: [None; MAX_MODULES],
        options: *options,
        created: None,
    };
    for (slot, module) in job.modules.iter_mut().zip(modules) {
        *slot = Some(module);
    }
    *JOB.lock() = Some(job);
    if !mm::call_on_new_stack(CREATION_STACK_PAGES, create_all_job::<B>) {
        log::error!("guests: out of memory for the stack they are created on");
    }
    JOB.lock()
        .take()
        .and_then(|job| job.created)
        .unwrap_or_default()
}

extern "C" fn create_all_job<B: PlatformBackend>() {
    let Some(mut job) = JOB.lock().take() else {
        return;
    };
    let count = job.modules.iter().flatten().count();
    let modules: [&Module; MAX_MODULES] =
        core::array::from_fn(|i| job.modules[i].unwrap_or(&NO_MODULE));
    job.created = Some(create_from::<B>(&modules[..count], &job.options));
    *JOB.lock() = Some(job);
}

/// Fills the module array past the real ones.
static NO_MODULE: Module = Module {
    start: 0,
    len: 0,
    cmdline: "",
};

fn create_from<B: PlatformBackend>(modules: &[&Module], options: &Options) -> Created {
    let mut created = Created::default();
    // Filled in place: a guest's settings are too many to keep a table
    // of them on the stack.
    let Some(storage) = mm::alloc_permanent_slice_with(MAX_GUESTS, |_| None::<GuestInfo>) else {
        log::error!("guests: out of memory for the guest table");
        return created;
    };
    let mut next_vcpu = 0;
    for (position, module) in modules.iter().enumerate() {
        if guest_spec::module_role(module.cmdline) != ModuleRole::Guest {
            continue;
        }
        let spec = guest_spec::parse(module.cmdline);
        let number = created.modules;
        created.modules += 1;
        let env = modules
            .get(position + 1)
            .filter(|next| guest_spec::module_role(next.cmdline) == ModuleRole::GuestEnv);
        let name = spec
            .ok()
            .and_then(|spec| spec.name)
            .map_or_else(|| Name::numbered(number), Name::new);
        let slot = created.guests;
        if slot == MAX_GUESTS {
            refuse(
                number,
                &name,
                LOAD_ERROR,
                format_args!("more than {MAX_GUESTS} guests"),
            );
            continue;
        }
        let spec = match spec {
            Ok(spec) => spec,
            Err(error) => {
                refuse(number, &name, LOAD_ERROR, format_args!("{error}"));
                continue;
            }
        };
        match create::<B>(slot, name, &spec, module, env.copied(), options, next_vcpu) {
            Ok(info) => {
                next_vcpu += info.vcpus;
                created.vcpus += info.vcpus;
                storage[slot] = Some(info);
                created.guests += 1;
            }
            Err(error) => refuse(
                number,
                &name,
                LOAD_ERROR,
                format_args!("{}", error.as_str()),
            ),
        }
    }
    let count = created.guests;
    if let Some(infos) =
        mm::alloc_permanent_slice_with(count, |i| storage[i].expect("created guests are dense"))
    {
        INFOS.call_once(|| infos);
    } else if count > 0 {
        log::error!("guests: out of memory for the guest table");
        return Created::default();
    }
    created
}

/// Puts guest `slot`'s platform in place. Not inlined: the platform is
/// built on this function's stack once, not on its caller's.
#[inline(never)]
fn install_platform(
    slot: usize,
    config: PlatformConfig,
    name: &Name,
) -> Result<(), hv_devices::platform::ConfigError> {
    let console = GuestConsole::new(name.as_str());
    let mut guard = PLATFORMS[slot].lock();
    match Platform::new(config, TscClock, console) {
        Ok(platform) => {
            *guard = Some(platform);
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Reports a guest module hv could not turn into a guest: `reason` is
/// the report's word (`load_error`, `backend_unsupported`).
fn refuse(number: usize, name: &Name, reason: &str, why: core::fmt::Arguments<'_>) {
    let mut message = Line::new();
    let _ = message.write_fmt(why);
    log::error!("guest {}: refused: {}", name.as_str(), message.as_str());
    let mut key = Line::new();
    let _ = write!(key, "refused{number}");
    crate::console::report::line(|o| {
        o.field("guests").object(|o| {
            o.field(key.as_str()).object(|o| {
                o.field("name").str(name.as_str())?;
                o.field("state").str("refused")?;
                o.field("reason").str(reason)?;
                o.field("detail").str(message.as_str())
            })
        })
    });
}

/// Creates guest `slot` from its module, or says why not (nothing of it
/// is left behind but memory already taken, which stays unused).
// The message is the error: built once per refused guest, at boot.
#[allow(clippy::result_large_err)]
fn create<B: PlatformBackend>(
    slot: usize,
    name: Name,
    spec: &GuestSpec<'_>,
    module: &Module,
    env: Option<&Module>,
    options: &Options,
    first_vcpu: usize,
) -> Result<GuestInfo, Line> {
    let fail = |args: core::fmt::Arguments<'_>| {
        let mut line = Line::new();
        let _ = line.write_fmt(args);
        line
    };
    let (image_start, image_len) = crate::arch::boot::image_range();
    let module_end = module.start.saturating_add(module.len);
    if module.start < image_start + image_len && image_start < module_end {
        return Err(fail(format_args!(
            "module {:#x}..{:#x} overlaps hv's image {:#x}..{:#x}",
            module.start,
            module_end,
            image_start,
            image_start + image_len
        )));
    }
    let ram_bytes = spec
        .mem_bytes
        .unwrap_or(options.guest_mem)
        .checked_next_multiple_of(RAM_ALIGN)
        .filter(|&b| b <= multiboot::MAX_RAM)
        .ok_or_else(|| fail(format_args!("memory larger than {:#x}", multiboot::MAX_RAM)))?;
    // Boot modules are loader memory nobody writes (kept out of the frame
    // allocator).
    let bytes = mm::phys::read(module.start, module.len);
    let image = MultibootImage::parse(bytes).map_err(|e| fail(format_args!("{e}")))?;
    let layout = GuestLayout::pc(ram_bytes).map_err(|e| fail(format_args!("{e}")))?;

    // The environment file: inline words first, then the env module.
    let env_module = env.map_or(&[][..], |m| mm::phys::read(m.start, m.len));
    let env_len = spec.env().iter().map(|w| w.len() + 1).sum::<usize>() + env_module.len();
    let env_frame = mm::alloc_aligned((env_len as u64).div_ceil(4096).max(1), 1)
        .ok_or_else(|| fail(format_args!("out of memory for the environment")))?;
    let mut at = env_frame;
    for word in spec.env() {
        mm::phys::write(at, word.as_bytes());
        mm::phys::write(at + word.len() as u64, b"\n");
        at += word.len() as u64 + 1;
    }
    mm::phys::write(at, env_module);
    // Written just above, never written again.
    let env_bytes = mm::phys::read(env_frame, env_len as u64);
    let mut cmdline = Line::new();
    let _ = write!(cmdline, "{}.flat", name.as_str());
    if !spec.args.is_empty() {
        let _ = write!(cmdline, " {}", spec.args);
    }
    let modules = [multiboot::Module {
        bytes: env_bytes,
        string: b"env",
    }];
    let plan = LoadPlan::new(image, cmdline.as_str().as_bytes(), &modules, layout)
        .map_err(|e| fail(format_args!("{e}")))?;

    let memory = mm::alloc_aligned(ram_bytes / 4096, RAM_ALIGN / 4096).ok_or_else(|| {
        fail(format_args!(
            "out of memory for {} MiB of guest RAM",
            ram_bytes >> 20
        ))
    })?;
    let mut ram = GuestRam {
        base: memory,
        bytes: ram_bytes,
    };
    let entry = plan.load(&mut ram).map_err(|e| fail(format_args!("{e}")))?;
    let vcpus = spec.vcpus as usize;
    acpi_tables::write(&mut ram, vcpus).map_err(|e| fail(format_args!("{e}")))?;
    let nested_root = B::new_guest_memory(memory, ram_bytes)
        .map_err(|e| fail(format_args!("nested page tables: {e}")))?;

    let host = NativeCpuid;
    let mut features = GuestFeatures::new(spec.vcpus);
    features.x2apic = spec.x2apic;
    let extended = raw_cpuid::CpuId::new().get_extended_processor_and_feature_identifiers();
    features.rdtscp = extended.is_some_and(|f| f.has_rdtscp());
    features.amd_legacy_pmu = raw_cpuid::CpuId::new()
        .get_vendor_info()
        .is_some_and(|v| v.as_str() == "AuthenticAMD");
    features.invpcid = spec.invpcid
        && raw_cpuid::CpuId::new()
            .get_extended_feature_info()
            .is_some_and(|f| f.has_invpcid());
    features.pcid = spec.pcid
        && raw_cpuid::CpuId::new()
            .get_feature_info()
            .is_some_and(|f| f.has_pcid());
    let tsc_hz = time::us_to_tsc(1_000_000);
    let mut config = PlatformConfig::new(vcpus, ram_bytes, tsc_hz);
    config.features = features;
    config.phys_addr_bits = CpuidPolicy::new(features).phys_addr_bits(&host);
    install_platform(slot, config, &name).map_err(|e| fail(format_args!("{e}")))?;

    let timeout_ms = spec.timeout_ms.unwrap_or(options.guest_timeout_ms);
    let info = GuestInfo {
        name,
        vcpus,
        first_vcpu,
        ram,
        nested_root,
        features,
        entry,
        timeout_ticks: time::us_to_tsc(timeout_ms.saturating_mul(1000)),
        max_exits: spec.max_exits.unwrap_or(u64::MAX),
    };
    SHARED[slot].live_vcpus.store(vcpus, Ordering::Release);
    log::info!(
        "guest {}: {} vCPUs, {} MiB at {:#x}, entry {:#x}, command line '{}'",
        name.as_str(),
        vcpus,
        ram_bytes >> 20,
        memory,
        entry.eip,
        cmdline.as_str()
    );
    let mut key = Line::new();
    let _ = write!(key, "{slot}");
    crate::console::report::line(|o| {
        o.field("guests").object(|o| {
            o.field(key.as_str()).object(|o| {
                o.field("name").str(name.as_str())?;
                o.field("vcpus").u64(vcpus as u64)?;
                o.field("mem").u64(ram_bytes)?;
                o.field("state").str("created")
            })
        })
    });
    Ok(info)
}

/// Marks every guest started now (the run begins).
pub fn start_all() {
    let now = rdtsc();
    for shared in &SHARED[..infos().len()] {
        shared.started.store(now, Ordering::Release);
    }
}

/// The stop reason of guest `index`, if it stopped: the platform's or hv's.
fn stop_words(index: usize) -> (&'static str, Option<u32>, Option<Verdict>, Line) {
    let mut detail = Line::new();
    if let Some(stop) = *SHARED[index].kernel_stop.lock() {
        let kind = match stop {
            KernelStop::Timeout => "timeout",
            KernelStop::ExitFlood { exits } => {
                let _ = write!(detail, "{exits} VM exits");
                "exit_flood"
            }
            KernelStop::OutsideRam { gpa, rip } => {
                let _ = write!(detail, "gpa {gpa:#x} at rip {rip:#x}");
                "outside_ram"
            }
            KernelStop::UndecodableMmio { gpa, rip } => {
                let _ = write!(detail, "gpa {gpa:#x} at rip {rip:#x}");
                "undecodable_mmio"
            }
            KernelStop::Backend(stop) => {
                let (kind, gpa, number) = stop.report();
                let _ = write!(detail, "{number:#x}");
                if let Some(gpa) = gpa {
                    let _ = write!(detail, " gpa {gpa:#x}");
                }
                kind
            }
        };
        return (kind, None, None, detail);
    }
    let reason = PLATFORMS[index]
        .lock()
        .as_ref()
        .and_then(GuestPlatform::stop_reason);
    match reason {
        Some(StopReason::Exit(exit)) => {
            let _ = write!(detail, "status {}", exit.qemu_status());
            (
                "exit",
                Some(exit.value),
                Some(exit.kvm_unit_tests_verdict()),
                detail,
            )
        }
        Some(StopReason::TripleFault { vcpu }) => {
            let _ = write!(detail, "vCPU {vcpu}");
            ("triple_fault", None, None, detail)
        }
        Some(StopReason::Reset { vcpu }) => {
            let _ = write!(detail, "vCPU {vcpu}");
            ("reset", None, None, detail)
        }
        None => ("running", None, None, detail),
    }
}

/// Stops guest `index` for a reason of hv's (the platform's own reasons
/// stop it through its effects). The first reason stays.
pub fn stop_by_kernel(index: usize, why: KernelStop) {
    let mut stop = SHARED[index].kernel_stop.lock();
    let platform_stopped = PLATFORMS[index]
        .lock()
        .as_ref()
        .is_some_and(|p| p.stop_reason().is_some());
    if stop.is_none() && !platform_stopped {
        *stop = Some(why);
    }
}

/// Marks guest `index` stopped (once) and reports it: called by the CPU
/// that saw the stop, with no lock held.
pub fn mark_stopped(index: usize) {
    if SHARED[index].stopped.swap(true, Ordering::AcqRel) {
        return;
    }
    SHARED[index].stopped_at.store(rdtsc(), Ordering::Release);
    report_stop(index);
}

/// Whether guest `index` is stopped.
pub fn is_stopped(index: usize) -> bool {
    SHARED[index].stopped.load(Ordering::Acquire)
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "pass",
        Verdict::Skip => "skip",
        Verdict::Fail => "fail",
    }
}

/// The stop report of guest `index`.
fn report_stop(index: usize) {
    let info = info(index);
    let shared = &SHARED[index];
    let (reason, exit_code, verdict, detail) = stop_words(index);
    let (lines, summary, first_failure) =
        PLATFORMS[index]
            .lock()
            .as_ref()
            .map_or((0, None, None), |p| {
                let sink = p.sink();
                (sink.lines, Some(sink.summary), Some(sink.first_failure))
            });
    let ticks = shared
        .stopped_at
        .load(Ordering::Acquire)
        .saturating_sub(shared.started.load(Ordering::Acquire));
    let tsc_per_ms = time::us_to_tsc(1000).max(1);
    let cores = shared.cores.load(Ordering::Acquire);
    log::info!(
        "guest {}: stopped: {reason} {}; {} exits on {} cores",
        info.name.as_str(),
        detail.as_str(),
        shared.exits.load(Ordering::Relaxed),
        cores.count_ones()
    );
    let mut key = Line::new();
    let _ = write!(key, "{index}");
    crate::console::report::line(|o| {
        o.field("guests").object(|o| {
            o.field(key.as_str()).object(|o| {
                o.field("name").str(info.name.as_str())?;
                o.field("vcpus").u64(info.vcpus as u64)?;
                o.field("mem").u64(info.ram.bytes)?;
                o.field("state").str("stopped")?;
                o.field("reason").str(reason)?;
                o.field("detail").str(detail.as_str())?;
                o.field("exit_code")
                    .option(exit_code, |v, code| v.u64(u64::from(code)))?;
                o.field("verdict")
                    .option(verdict, |v, verdict| v.str(verdict_word(verdict)))?;
                o.field("ms").u64(ticks / tsc_per_ms)?;
                o.field("exits").u64(shared.exits.load(Ordering::Relaxed))?;
                o.field("cores")
                    .u64_array((0..64).filter(|cpu| cores & (1 << cpu) != 0))?;
                o.field("most_cores_at_once")
                    .u64(u64::from(shared.most_cores_at_once.load(Ordering::Relaxed)))?;
                o.field("output_lines").u64(lines)?;
                o.field("summary")
                    .option(summary.as_ref().and_then(|l| l.text()), |v, s| v.str(s))?;
                o.field("first_failure")
                    .option(first_failure.as_ref().and_then(|l| l.text()), |v, s| {
                        v.str(s)
                    })
            })
        })
    });
}

/// Notes that a vCPU of guest `index` runs on CPU `cpu`, and how many of
/// its VMCSes are loaded on different cores right now (`loaded_cores`).
pub fn note_core(index: usize, cpu: usize, loaded_cores: u32) {
    let shared = &SHARED[index];
    if cpu < 64 {
        shared.cores.fetch_or(1 << cpu, Ordering::Relaxed);
    }
    shared
        .most_cores_at_once
        .fetch_max(loaded_cores, Ordering::Relaxed);
}

/// Counts a VM exit of guest `index`; true once it is over its limit.
pub fn count_exit(index: usize) -> bool {
    let exits = SHARED[index].exits.fetch_add(1, Ordering::Relaxed) + 1;
    exits > info(index).max_exits
}

/// Whether guest `index` ran past its time limit.
pub fn timed_out(index: usize, now: u64) -> bool {
    let started = SHARED[index].started.load(Ordering::Acquire);
    now.saturating_sub(started) > info(index).timeout_ticks
}

/// The TSC at which guest `index` times out.
pub fn timeout_at(index: usize) -> u64 {
    SHARED[index]
        .started
        .load(Ordering::Acquire)
        .saturating_add(info(index).timeout_ticks)
}
