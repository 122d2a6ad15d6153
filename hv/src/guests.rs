//! vCPUs, their scheduling across cores, and VM-exit handling.
//!
//! All vCPUs sit in one FIFO run queue. Every core with VMX takes the vCPU
//! at the head, runs it for a time slice (ended by the VMX-preemption timer
//! or by the guest's own exits), and puts it back at the tail, still loaded
//! on that core. With more vCPUs than cores they keep moving: a core that
//! takes a vCPU last loaded elsewhere first has the old core VMCLEAR it
//! (call-function IPI), then VMPTRLDs it. So every core's set of loaded
//! VMCSes changes all the time, which is the state the crash path cleans.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use raw_cpuid::native_cpuid::cpuid_count;
use spin::Mutex;
use x86::vmx::vmcs::ro;

use crash::loaded_vmcs::{ListError, StorePoint, VmcsId, Vmx, VmxError};

use crate::crashpath::LISTS;
use crate::guest_image::{
    self, CALL_CRASH, HYPERCALL_CRASH, HYPERCALL_PRINT, HYPERCALL_YIELD, MISBEHAVE,
};
use crate::vmx::entry::{self, GuestRegisters};
use crate::vmx::ept::Ept;
use crate::vmx::vmcs::{self, GuestStart, HostState};
use crate::{inject, memory, percpu, smp, time, vmx};

/// At most this many vCPUs.
pub const MAX_VCPUS: usize = 1024;
/// Guest-physical memory of each guest.
const GUEST_MEMORY: u64 = 2 * 1024 * 1024;
const NOT_LOADED: u32 = u32::MAX;

/// What another CPU may read of a vCPU.
#[derive(Debug)]
pub struct VcpuShared {
    /// Physical address of its VMCS.
    pub vmcs: u64,
    /// The CPU whose VMCS cache may hold it, or `NOT_LOADED`: the vCPU's
    /// own record, kept apart from the lists so that the crash summary can
    /// check the lists against it. Set right after the list entry is
    /// published (before VMPTRLD), cleared right after VMCLEAR (before
    /// unlinking).
    pub loaded_on: AtomicU32,
    /// Set when the vCPU was stopped for good.
    pub stopped: AtomicBool,
    /// VM exits it took.
    pub exits: AtomicU64,
    /// Its entry in the loaded-VMCS lists.
    pub list_id: Option<VmcsId>,
    /// Set when the crash path VMCLEARed its VMCS.
    pub crash_cleared: AtomicBool,
}

/// What only the CPU running a vCPU touches.
#[derive(Debug)]
struct VcpuLocal {
    registers: GuestRegisters,
    launched: bool,
    initialized: bool,
    ept_pointer: u64,
    console: [u8; 96],
    console_len: usize,
}

/// One virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    /// Shared half.
    pub shared: VcpuShared,
    local: Mutex<VcpuLocal>,
}

/// Settings from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// vCPUs to create (0: two per core with VMX).
    pub vcpus: usize,
    /// How long guests run at boot.
    pub run_ms: u64,
    /// Time slice before a vCPU goes back to the queue.
    pub slice_us: u64,
    /// Test knob: this vCPU touches memory outside its EPT.
    pub misbehaving_vcpu: Option<u32>,
    /// Test knob: this vCPU makes the crash hypercall.
    pub crash_calling_vcpu: Option<u32>,
    /// Whether the crash hypercall is honoured.
    pub crash_hypercall_allowed: bool,
}

static VCPUS: spin::Once<&'static [Vcpu]> = spin::Once::new();
static RUN_QUEUE: Mutex<RunQueue> = Mutex::new(RunQueue::new());
static RUNNING: AtomicBool = AtomicBool::new(false);
static DEADLINE_US: AtomicU64 = AtomicU64::new(0);
static SLICE_US: AtomicU64 = AtomicU64::new(2000);
static CORES_DONE: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicUsize = AtomicUsize::new(0);
static CRASH_HYPERCALL: AtomicBool = AtomicBool::new(false);
/// vCPU loads on a core other than the one that last had it.
pub static MIGRATIONS: AtomicU64 = AtomicU64::new(0);

struct RunQueue {
    slots: [u16; MAX_VCPUS],
    head: usize,
    len: usize,
}

impl RunQueue {
    const fn new() -> Self {
        Self {
            slots: [0; MAX_VCPUS],
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, index: usize) {
        if self.len < MAX_VCPUS {
            self.slots[(self.head + self.len) % MAX_VCPUS] = index as u16;
            self.len += 1;
        }
    }

    fn pop(&mut self) -> Option<usize> {
        (self.len > 0).then(|| {
            let index = self.slots[self.head];
            self.head = (self.head + 1) % MAX_VCPUS;
            self.len -= 1;
            usize::from(index)
        })
    }
}

/// The vCPUs.
pub fn vcpus() -> &'static [Vcpu] {
    VCPUS.get().copied().unwrap_or(&[])
}

/// Enables VMX on the calling CPU (run on every CPU through an IPI).
pub fn enable_vmx_here(_: usize) {
    let cpu = percpu::current_cpu_index() as usize;
    match vmx::enable_on_this_cpu() {
        Ok(region) => {
            percpu::shared(cpu)
                .vmxon_region
                .store(region, Ordering::Relaxed);
            percpu::shared(cpu).vmx_on.store(true, Ordering::Release);
        }
        Err(error) => log::debug!("vmx: CPU {cpu}: {error}"),
    }
}

/// Creates the vCPUs: a VMCS, 2 MiB of guest memory with the guest image,
/// and an EPT each.
pub fn create(count: usize, misbehaving: Option<u32>, crash_caller: Option<u32>) -> usize {
    let capabilities = match vmx::capabilities() {
        Ok(capabilities) => capabilities,
        Err(_) => return 0,
    };
    let count = count.min(MAX_VCPUS);
    let Some(storage) = memory::alloc_permanent_slice_with(count, |index| {
        make_vcpu(index, capabilities.revision, misbehaving, crash_caller)
    }) else {
        log::error!("vmx: out of memory for {count} vCPUs");
        return 0;
    };
    let created = storage
        .iter()
        .take_while(|vcpu| vcpu.shared.vmcs != 0)
        .count();
    let vcpus = &storage[..created];
    VCPUS.call_once(|| vcpus);
    let mut queue = RUN_QUEUE.lock();
    for index in 0..created {
        queue.push(index);
    }
    created
}

fn make_vcpu(
    index: usize,
    revision: u32,
    misbehaving: Option<u32>,
    crash_caller: Option<u32>,
) -> Vcpu {
    let empty = || Vcpu {
        shared: VcpuShared {
            vmcs: 0,
            loaded_on: AtomicU32::new(NOT_LOADED),
            stopped: AtomicBool::new(true),
            exits: AtomicU64::new(0),
            list_id: None,
            crash_cleared: AtomicBool::new(false),
        },
        local: Mutex::new(VcpuLocal {
            registers: GuestRegisters::default(),
            launched: false,
            initialized: false,
            ept_pointer: 0,
            console: [0; 96],
            console_len: 0,
        }),
    };
    let (Some(vmcs), Some(memory)) = (
        memory::alloc_zeroed_page(),
        memory::alloc_aligned(GUEST_MEMORY / 4096, GUEST_MEMORY / 4096),
    ) else {
        return empty();
    };
    let Some(ept) = Ept::new(memory, GUEST_MEMORY, memory::alloc_zeroed_page) else {
        return empty();
    };
    let image = guest_image::bytes();
    // SAFETY: `vmcs` and `memory` are fresh frames of ours; the image fits
    // well inside the guest's 2 MiB.
    unsafe {
        (vmcs as *mut u32).write_volatile(revision);
        core::ptr::copy_nonoverlapping(
            image.as_ptr(),
            (memory + guest_image::LOAD_ADDRESS) as *mut u8,
            image.len(),
        );
    }
    let mut registers = GuestRegisters::default();
    if misbehaving == Some(index as u32) {
        registers.rdi = MISBEHAVE;
    }
    if crash_caller == Some(index as u32) {
        registers.rdi = CALL_CRASH;
    }
    let list_id = match LISTS.alloc(vmcs) {
        Ok(id) => Some(id),
        Err(error) => {
            log::error!("vmx: no loaded-VMCS list entry for vCPU {index}: {error}");
            return empty();
        }
    };
    Vcpu {
        shared: VcpuShared {
            vmcs,
            loaded_on: AtomicU32::new(NOT_LOADED),
            stopped: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            list_id,
            crash_cleared: AtomicBool::new(false),
        },
        local: Mutex::new(VcpuLocal {
            registers,
            launched: false,
            initialized: false,
            ept_pointer: ept.pointer,
            console: [0; 96],
            console_len: 0,
        }),
    }
}

/// The real VMX instructions, for the list protocol's normal path.
struct Instructions;

impl Vmx for Instructions {
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        // SAFETY: the VMCS region is ours; VMCLEAR only writes it back.
        unsafe { x86::bits64::vmx::vmclear(vmcs_phys) }.map_err(|_| VmxError::FailInvalid)
    }

    fn vmptrld(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        // SAFETY: the VMCS region is ours, holds our revision, and the list
        // protocol guarantees no other CPU has it active.
        unsafe { x86::bits64::vmx::vmptrld(vmcs_phys) }.map_err(|_| VmxError::FailValid {
            instruction_error: vmcs::instruction_error() as u32,
        })
    }
}

/// The kernel's hook between the list protocol's stores: keeps the vCPU's
/// own `loaded_on` record in step, and is where test crashes are injected.
fn store_hook(vcpu: &'static Vcpu) -> impl FnMut(StorePoint) {
    move |point| {
        match point {
            StorePoint::AddPublish => vcpu
                .shared
                .loaded_on
                .store(percpu::current_cpu_index(), Ordering::Release),
            // After VMCLEAR, and after a failed VMPTRLD's unlink (which
            // skips the VMCLEAR point): nothing of it is cached here.
            StorePoint::UnloadVmclear | StorePoint::RemoveReleaseCpu => {
                vcpu.shared.loaded_on.store(NOT_LOADED, Ordering::Release)
            }
            _ => {}
        }
        inject::at_store(point);
    }
}

/// VMCLEARs vCPU `index` and unlinks it, on the calling CPU, which holds it
/// (call-function IPI from the CPU that wants it).
fn vmclear_here(index: usize) {
    let vcpu = &vcpus()[index];
    let Some(id) = vcpu.shared.list_id else {
        return;
    };
    let cpu = percpu::current_cpu_index() as usize;
    if let Err(error) = LISTS.unload(cpu, id, &mut Instructions, &mut store_hook(vcpu)) {
        log::error!("vmx: unloading vCPU {index} on CPU {cpu}: {error}");
    }
}

/// Makes vCPU `index` current on this CPU, taking it from another CPU
/// first if needed, and refreshes the host state.
fn load_here(index: usize, local: &mut VcpuLocal) -> bool {
    let vcpu = &vcpus()[index];
    let Some(id) = vcpu.shared.list_id else {
        return false;
    };
    let me = percpu::current_cpu_index() as usize;
    // The eviction waits for another CPU: interrupts on, or two CPUs
    // evicting from each other would deadlock.
    crate::arch::cpu::enable_interrupts();
    let evicted = LISTS.evict_from_other_cpu(me, id, |owner, _| {
        if smp::call_on(owner, vmclear_here, index) {
            Ok(())
        } else {
            Err(ListError::LoadedElsewhere { cpu: owner })
        }
    });
    crate::arch::cpu::disable_interrupts();
    match evicted {
        Ok(Some(_)) => {
            MIGRATIONS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(None) => {}
        Err(error) => {
            log::error!("vmx: cannot take vCPU {index} to CPU {me}: {error}");
            return false;
        }
    }
    let loaded = match LISTS.load_here(me, id, &mut Instructions, &mut store_hook(vcpu)) {
        Ok(loaded) => loaded,
        Err(error) => {
            log::error!("vmx: loading vCPU {index} on CPU {me}: {error}");
            return false;
        }
    };
    if loaded.newly_on_this_cpu {
        local.launched = false;
    }
    if !local.initialized {
        let Ok(capabilities) = vmx::capabilities() else {
            return false;
        };
        vmcs::setup_guest(
            &capabilities,
            &GuestStart {
                rip: guest_image::LOAD_ADDRESS,
                rsp: guest_image::STACK_TOP,
                ept_pointer: local.ept_pointer,
            },
        );
        local.initialized = true;
    }
    let area = percpu::current();
    // SAFETY: the tables pointer was set before this CPU came online.
    let tables = unsafe { &*area.tables };
    vmcs::write_host_state(&HostState {
        gs_base: core::ptr::from_ref(area) as u64,
        tr_base: tables.tss_base(),
        gdtr_base: tables.gdt_base(),
        idtr_base: crate::arch::idt::base(),
    });
    true
}

/// Crash path: marks the vCPU whose VMCS at `vmcs_phys` was just VMCLEARed.
/// No lock: a linear scan of the shared halves.
pub fn note_crash_vmclear(vmcs_phys: u64) {
    if let Some(vcpu) = vcpus().iter().find(|vcpu| vcpu.shared.vmcs == vmcs_phys) {
        vcpu.shared.crash_cleared.store(true, Ordering::Release);
    }
}

/// The crash path's VMCS accounting, from the vCPUs' own records.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashAccounting {
    /// VMCSes the vCPUs' records say may be cached on some CPU.
    pub loaded: u64,
    /// Of those, VMCLEARed by the crash path.
    pub cleared: u64,
    /// Of those, on CPUs that never checked in (they cannot be cleared).
    pub on_stragglers: u64,
}

/// Crash path: checks the lists against the vCPUs' own records, naming on
/// the emergency console every VMCS that stayed uncleared.
pub fn crash_vmcs_accounting(stragglers: &crash::cpuset::CpuSet) -> CrashAccounting {
    use core::fmt::Write;
    let mut accounting = CrashAccounting::default();
    for (index, vcpu) in vcpus().iter().enumerate() {
        let on = vcpu.shared.loaded_on.load(Ordering::Acquire);
        if on == NOT_LOADED {
            continue;
        }
        accounting.loaded += 1;
        if vcpu.shared.crash_cleared.load(Ordering::Acquire) {
            accounting.cleared += 1;
        } else if stragglers.contains(on as usize) {
            accounting.on_stragglers += 1;
        } else {
            let listed = vcpu.shared.list_id.map(|id| LISTS.loaded_on(id));
            let _ = writeln!(
                crate::console::EmergencyConsole,
                "*** hv: vCPU {index}: VMCS {:#x} loaded on CPU {on} (by its record), not cleared; its list entry says {listed:?}",
                vcpu.shared.vmcs
            );
        }
    }
    accounting
}

/// Whether the boot-time guest run is on.
pub fn running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

/// Runs guests on this core until the deadline, then checks out.
pub fn run_loop() {
    let cpu = percpu::current_cpu_index() as usize;
    if !percpu::shared(cpu).vmx_on.load(Ordering::Acquire) {
        CORES_DONE.fetch_add(1, Ordering::AcqRel);
        return;
    }
    while running() && time::now_us() < DEADLINE_US.load(Ordering::Relaxed) {
        let next = RUN_QUEUE.lock().pop();
        let Some(index) = next else {
            allow_interrupts();
            continue;
        };
        let keep = run_slice(index);
        if keep {
            RUN_QUEUE.lock().push(index);
        }
        allow_interrupts();
    }
    CORES_DONE.fetch_add(1, Ordering::AcqRel);
}

/// A moment with interrupts on, so pending IPIs (VMCLEAR requests) run.
fn allow_interrupts() {
    // SAFETY: `sti; nop; cli` opens a one-instruction interrupt window.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Why a vCPU stopped for good.
#[derive(Debug, Clone, Copy)]
enum Stop {
    EptViolation { gpa: u64, qualification: u64 },
    EntryFailed { error: u64 },
    InvalidGuestState { reason: u64 },
    TripleFault,
    Unhandled { reason: u64 },
}

/// Runs one slice of vCPU `index`; `false` when it was stopped.
fn run_slice(index: usize) -> bool {
    let vcpu = &vcpus()[index];
    let Some(mut local) = vcpu.local.try_lock() else {
        return true;
    };
    if !load_here(index, &mut local) {
        return true;
    }
    let cpu = percpu::current_cpu_index() as usize;
    let slice_us = SLICE_US.load(Ordering::Relaxed);
    let slice_end = time::now_us() + slice_us;
    loop {
        if let Some(shift) = vmx::capabilities()
            .ok()
            .and_then(|c| c.preemption_timer_shift)
        {
            let ticks = time::us_to_tsc(slice_us) >> shift;
            vmcs::set_preemption_timer(ticks.clamp(1, u64::from(u32::MAX)) as u32);
        }
        let launched = local.launched;
        // SAFETY: the vCPU's VMCS is current here with this CPU's host state,
        // and interrupts are off (the run loop runs with IF clear).
        if unsafe { entry::run(&mut local.registers, launched) }.is_err() {
            stop(
                index,
                Stop::EntryFailed {
                    error: vmcs::instruction_error(),
                },
            );
            return false;
        }
        local.launched = true;
        vcpu.shared.exits.fetch_add(1, Ordering::Relaxed);
        percpu::shared(cpu).vm_exits.fetch_add(1, Ordering::Relaxed);
        let exit = vmcs::read(ro::EXIT_REASON);
        if exit & (1 << 31) != 0 {
            stop(
                index,
                Stop::InvalidGuestState {
                    reason: exit & 0xFFFF,
                },
            );
            return false;
        }
        let end_slice = match exit & 0xFFFF {
            0 => {
                let info = vmcs::read(ro::VMEXIT_INTERRUPTION_INFO);
                if (info >> 8) & 7 == 2 {
                    // A host NMI arrived in the guest: hand it to the
                    // hypervisor's own handler, as if it came now.
                    // SAFETY: vector 2's gate is the NMI entry stub.
                    unsafe { core::arch::asm!("int 2") };
                    false
                } else {
                    stop(index, Stop::Unhandled { reason: 0 });
                    return false;
                }
            }
            1 => {
                allow_interrupts();
                false
            }
            2 => {
                stop(index, Stop::TripleFault);
                return false;
            }
            10 => {
                emulate_cpuid(&mut local.registers);
                vmcs::skip_instruction();
                false
            }
            12 => {
                vmcs::skip_instruction();
                true
            }
            18 => {
                hypercall(index, &mut local);
                vmcs::skip_instruction();
                false
            }
            30 => {
                port_io(index, &mut local);
                vmcs::skip_instruction();
                false
            }
            48 => {
                let gpa = vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL);
                stop(
                    index,
                    Stop::EptViolation {
                        gpa,
                        qualification: vmcs::read(ro::EXIT_QUALIFICATION),
                    },
                );
                return false;
            }
            52 => true,
            reason => {
                stop(index, Stop::Unhandled { reason });
                return false;
            }
        };
        inject::check_time();
        if end_slice || time::now_us() >= slice_end || !running() {
            return true;
        }
    }
}

fn stop(index: usize, why: Stop) {
    let vcpu = &vcpus()[index];
    vcpu.shared.stopped.store(true, Ordering::Release);
    STOPPED.fetch_add(1, Ordering::Relaxed);
    let rip = vmcs::guest_rip();
    let cpu = percpu::current_cpu_index();
    log::warn!("vmx: vCPU {index} stopped on CPU {cpu} at guest rip {rip:#x}: {why:?}");
    // `detail`: the EPT exit qualification, the VM-instruction error, or
    // the exit reason, whichever the stop has.
    let (kind, gpa, detail) = match why {
        Stop::EptViolation { gpa, qualification } => ("ept_violation", Some(gpa), qualification),
        Stop::EntryFailed { error } => ("entry_failed", None, error),
        Stop::InvalidGuestState { reason } => ("invalid_guest_state", None, reason),
        Stop::TripleFault => ("triple_fault", None, 2),
        Stop::Unhandled { reason } => ("unhandled_exit", None, reason),
    };
    // Keyed by vCPU, so the reports of several stopped guests merge.
    let mut key = [0u8; 8];
    let key = decimal(index, &mut key);
    crate::report::line(|o| {
        o.field("guests_stopped").object(|o| {
            o.field(key).object(|o| {
                o.field("cpu").u64(u64::from(cpu))?;
                o.field("reason").str(kind)?;
                o.field("gpa").option(gpa, |value, gpa| value.u64(gpa))?;
                o.field("detail").u64(detail)?;
                o.field("rip").u64(rip)
            })
        })
    });
}

/// `value` in decimal, in `buffer`.
fn decimal(mut value: usize, buffer: &mut [u8; 8]) -> &str {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || start == 0 {
            break;
        }
    }
    core::str::from_utf8(&buffer[start..]).unwrap_or("?")
}

fn emulate_cpuid(registers: &mut GuestRegisters) {
    let result = cpuid_count(registers.rax as u32, registers.rcx as u32);
    let mut ecx = result.ecx;
    if registers.rax as u32 == 1 {
        ecx &= !(1 << 5); // no VMX inside
        ecx |= 1 << 31; // running under a hypervisor
    }
    registers.rax = u64::from(result.eax);
    registers.rbx = u64::from(result.ebx);
    registers.rcx = u64::from(ecx);
    registers.rdx = u64::from(result.edx);
}

/// Hypercalls: EAX selects, EBX carries the argument; EAX returns 0, or
/// u64::MAX for an unknown call or a bad argument.
fn hypercall(index: usize, local: &mut VcpuLocal) {
    let argument = local.registers.rbx;
    local.registers.rax = match local.registers.rax & 0xFFFF_FFFF {
        HYPERCALL_YIELD => 0,
        HYPERCALL_CRASH if CRASH_HYPERCALL.load(Ordering::Relaxed) => {
            let regs = crate::crashpath::current_regs();
            crate::crashpath::crash(crate::crashpath::Reason::Hypercall { vcpu: index }, &regs)
        }
        HYPERCALL_PRINT if argument <= 0xFF => {
            guest_console(index, local, argument as u8);
            0
        }
        _ => u64::MAX,
    };
}

const DEBUG_PORT: u64 = 0xE9;

fn port_io(index: usize, local: &mut VcpuLocal) {
    let qualification = vmcs::read(ro::EXIT_QUALIFICATION);
    let size = (qualification & 7) + 1;
    let input = qualification & (1 << 3) != 0;
    let port = (qualification >> 16) & 0xFFFF;
    if input {
        // Nothing behind any port: all ones, like an empty bus.
        let mask = (1u64 << (size * 8)) - 1;
        local.registers.rax = (local.registers.rax & !mask) | mask;
    } else if port == DEBUG_PORT && size == 1 {
        guest_console(index, local, local.registers.rax as u8);
    }
}

fn guest_console(index: usize, local: &mut VcpuLocal, byte: u8) {
    if byte != b'\n' && local.console_len < local.console.len() {
        local.console[local.console_len] = byte;
        local.console_len += 1;
    }
    if byte == b'\n' || local.console_len == local.console.len() {
        let line =
            core::str::from_utf8(&local.console[..local.console_len]).unwrap_or("<not UTF-8>");
        log::info!("[vcpu {index}] {line}");
        local.console_len = 0;
    }
}

/// What the boot-time guest run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunSummary {
    /// vCPUs created.
    pub vcpus: usize,
    /// vCPUs stopped for good.
    pub stopped: usize,
    /// VM exits in all.
    pub exits: u64,
    /// Loads on a different core.
    pub migrations: u64,
}

/// Runs every vCPU across every core with VMX for `settings.run_ms`.
pub fn run_at_boot(settings: &Settings) -> RunSummary {
    let cores = smp::cpus()
        .iter()
        .filter(|cpu| cpu.vmx_on.load(Ordering::Acquire))
        .count();
    let wanted = if settings.vcpus == 0 {
        2 * cores
    } else {
        settings.vcpus
    };
    let created = create(
        wanted,
        settings.misbehaving_vcpu,
        settings.crash_calling_vcpu,
    );
    log::info!(
        "vmx: {created} vCPUs on {cores} cores for {} ms, slice {} us",
        settings.run_ms,
        settings.slice_us
    );
    SLICE_US.store(settings.slice_us.max(1), Ordering::Relaxed);
    CRASH_HYPERCALL.store(settings.crash_hypercall_allowed, Ordering::Relaxed);
    inject::start_clock();
    DEADLINE_US.store(time::now_us() + settings.run_ms * 1000, Ordering::Relaxed);
    RUNNING.store(true, Ordering::Release);
    // Wake the idle APs; each enters `run_loop` from its idle loop.
    let woken = smp::call_on_all(|_| {}, 0);
    // SAFETY: this CPU joins with interrupts off, like the others.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    run_loop();
    let online = woken.max(1);
    let deadline = time::now_us() + 1_000_000 + settings.slice_us;
    while CORES_DONE.load(Ordering::Acquire) < online && time::now_us() < deadline {
        core::hint::spin_loop();
    }
    RUNNING.store(false, Ordering::Release);
    crate::arch::cpu::enable_interrupts();
    RunSummary {
        vcpus: created,
        stopped: STOPPED.load(Ordering::Relaxed),
        exits: vcpus()
            .iter()
            .map(|vcpu| vcpu.shared.exits.load(Ordering::Relaxed))
            .sum(),
        migrations: MIGRATIONS.load(Ordering::Relaxed),
    }
}

/// Crash path: fills the dump's per-CPU VMCLEAR ledger from the vCPUs' own
/// records: for every online CPU, each VMCS those records say it held, and
/// whether the crash path VMCLEARed it. Returns the number of ledgers.
pub fn crash_ledgers(
    ledgers: &mut [kexec_loader::crash_note::CpuLedger<'static>],
    vmclears: &'static mut [kexec_loader::crash_note::VmclearRecord],
    coordinator: usize,
    checked_in: &crash::cpuset::CpuSet,
) -> usize {
    use crash::shootdown::VmxExit;
    use kexec_loader::crash_note::{CpuLedger, VmclearOutcome, VmclearRecord, cpu_flags};
    let online = smp::cpus().len().min(ledgers.len());
    let mut remaining = vmclears;
    let mut count = 0;
    for (cpu, shared) in smp::cpus().iter().enumerate().take(online) {
        if shared.slot.state() != smp_boot::bringup::CpuState::Online {
            continue;
        }
        let held = || {
            vcpus()
                .iter()
                .filter(|vcpu| vcpu.shared.loaded_on.load(Ordering::Acquire) == cpu as u32)
        };
        let len = held().count().min(remaining.len());
        // Split off this CPU's part: it is final once filled, the rest
        // stays writable for the next CPUs.
        let (mine, rest) = core::mem::take(&mut remaining).split_at_mut(len);
        remaining = rest;
        for (record, vcpu) in mine.iter_mut().zip(held()) {
            let outcome = if vcpu.shared.crash_cleared.load(Ordering::Acquire) {
                VmclearOutcome::Succeeded
            } else {
                VmclearOutcome::FailInvalid
            };
            *record = VmclearRecord {
                vmcs_phys: vcpu.shared.vmcs,
                outcome,
            };
        }
        let vmx = crate::crashpath::COORDINATOR
            .record(cpu)
            .map(|record| record.ledger.vmx);
        let mut flags = 0;
        if checked_in.contains(cpu) {
            flags |= cpu_flags::CHECKED_IN;
        }
        if cpu == coordinator {
            flags |= cpu_flags::COORDINATOR;
        }
        if matches!(
            vmx,
            Some(VmxExit::Left | VmxExit::LeftAfterInvalidOpcode | VmxExit::StillOn(_))
        ) {
            flags |= cpu_flags::VMX_WAS_ON;
        }
        if matches!(vmx, Some(VmxExit::Left | VmxExit::LeftAfterInvalidOpcode)) {
            flags |= cpu_flags::VMXOFF_DONE;
        }
        ledgers[count] = CpuLedger {
            cpu_index: cpu as u32,
            apic_id: shared.slot.apic_id(),
            flags,
            vmcs_loaded: len as u32,
            vmclears: mine,
        };
        count += 1;
    }
    count
}
