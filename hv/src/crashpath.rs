//! The crash path: every panic, fatal exception, allowed crash hypercall
//! and injected test crash ends here.
//!
//! The first CPU in wins the election in [`COORDINATOR`] and coordinates:
//! it sends an NMI to every other CPU, waits (bounded) for all of them to
//! check in, names the stragglers, cleans up itself and prints the summary.
//! Every other CPU, from its NMI handler or its own panic, VMCLEARs every
//! VMCS on its list, leaves VMX, disables its local APIC, checks in and
//! parks in `cli; hlt` (never MWAIT: a capture kernel overwriting a
//! monitored line would wake it).
//!
//! Nothing here takes a lock or allocates, and nothing trusts state an NMI
//! may have interrupted: the coordinator word arms the NMI handler (it was
//! installed at boot), the lists are walked forward only, output goes to
//! the lock-free emergency console.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crash::cpuset::CpuSet;
use crash::loaded_vmcs::{VmcsArena, Vmx, VmxError};
use crash::shootdown::{Clock, CrashCoordinator, CrashHardware, Fault, Role, UserRegs};
use smp_boot::bringup::CpuState;
use smp_boot::madt::MAX_CPUS;

use crate::arch::idt::TrapFrame;
use crate::console::EmergencyConsole;
use crate::guests::MAX_VCPUS;
use crate::vmx::tolerant::{self, Outcome};
use crate::{arch, percpu, smp, time};

const _: () = assert!(
    crash::cpuset::MAX_CPUS == MAX_CPUS,
    "crash sets must cover every possible CPU"
);

/// The election, the per-CPU crash records and the rendezvous.
pub static COORDINATOR: CrashCoordinator<MAX_CPUS> = CrashCoordinator::new();
/// Every CPU's list of loaded VMCSes; entry `i` is vCPU `i`'s VMCS. Exists
/// for every possible CPU from the first instruction, before VMX is on.
pub static LISTS: VmcsArena<MAX_VCPUS, MAX_CPUS> = VmcsArena::new();

/// Rendezvous timeout (`crash_timeout_ms=`).
static TIMEOUT_US: AtomicU64 = AtomicU64::new(1_000_000);
/// Test knob `point:nmi_blocked`: this CPU (index) spins in its NMI handler.
pub static SPIN_IN_NMI: AtomicU32 = AtomicU32::new(u32::MAX);

/// Why the machine crashed.
#[derive(Debug, Clone, Copy)]
pub enum Reason<'a> {
    /// A Rust panic, with its message.
    Panic(&'a core::panic::PanicInfo<'a>),
    /// A fatal exception in the hypervisor.
    Exception {
        /// The vector.
        vector: u64,
        /// Its name.
        name: &'static str,
    },
    /// A guest made the crash hypercall (allowed by the command line).
    Hypercall {
        /// The vCPU.
        vcpu: usize,
    },
}

impl core::fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Reason::Panic(info) => write!(f, "panic: {}", info.message()),
            Reason::Exception { vector, name } => {
                write!(f, "fatal exception {name} (vector {vector})")
            }
            Reason::Hypercall { vcpu } => write!(f, "crash hypercall from vCPU {vcpu}"),
        }
    }
}

/// Sets the rendezvous timeout.
pub fn set_timeout_ms(ms: u64) {
    TIMEOUT_US.store(ms.saturating_mul(1000), Ordering::Relaxed);
}

/// The crash path's hardware: tolerant VMX instructions, CR4, the APIC.
struct Hardware;

impl Vmx for Hardware {
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        match tolerant::vmclear(vmcs_phys) {
            Outcome::Done => {
                crate::guests::note_crash_vmclear(vmcs_phys);
                Ok(())
            }
            Outcome::Failed => Err(VmxError::FailInvalid),
            Outcome::Faulted => Err(VmxError::NotInVmxOperation),
        }
    }

    fn vmptrld(&mut self, _vmcs_phys: u64) -> Result<(), VmxError> {
        // The crash path never loads a VMCS.
        Err(VmxError::FailInvalid)
    }
}

impl CrashHardware for Hardware {
    fn cr4_vmxe(&mut self) -> bool {
        arch::cpu::cr4() & (1 << 13) != 0
    }

    fn vmxoff(&mut self) -> Result<(), Fault> {
        match tolerant::vmxoff() {
            Outcome::Done => Ok(()),
            Outcome::Failed => Err(Fault::VmFail),
            Outcome::Faulted => Err(Fault::InvalidOpcode),
        }
    }

    fn clear_cr4_vmxe(&mut self) -> Result<(), Fault> {
        tolerant::clear_cr4_vmxe().map_err(|_| Fault::GeneralProtection)
    }

    fn disable_local_apic(&mut self) {
        arch::apic::disable();
    }
}

struct TscClock;

impl Clock for TscClock {
    fn now_us(&mut self) -> u64 {
        time::now_us()
    }
}

/// The registers of an interrupted context, for its `NT_PRSTATUS`.
pub fn regs_from_frame(frame: &TrapFrame) -> UserRegs {
    UserRegs {
        r15: frame.r15,
        r14: frame.r14,
        r13: frame.r13,
        r12: frame.r12,
        rbp: frame.rbp,
        rbx: frame.rbx,
        r11: frame.r11,
        r10: frame.r10,
        r9: frame.r9,
        r8: frame.r8,
        rax: frame.rax,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rsi: frame.rsi,
        rdi: frame.rdi,
        orig_rax: u64::MAX,
        rip: frame.rip,
        cs: frame.cs,
        eflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        ..UserRegs::default()
    }
}

/// The caller's own registers (for a panic, which has no trap frame): RIP
/// is the return address into the caller, RSP and RBP its frame.
#[inline(always)]
pub fn current_regs() -> UserRegs {
    let (rip, rsp, rbp, rbx, r12, r13, r14, r15): (u64, u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: only reads registers.
    unsafe {
        core::arch::asm!(
            "lea {rip}, [rip]",
            "mov {rsp}, rsp",
            "mov {rbp}, rbp",
            "mov {rbx}, rbx",
            "mov {r12}, r12",
            "mov {r13}, r13",
            "mov {r14}, r14",
            "mov {r15}, r15",
            rip = out(reg) rip,
            rsp = out(reg) rsp,
            rbp = out(reg) rbp,
            rbx = out(reg) rbx,
            r12 = out(reg) r12,
            r13 = out(reg) r13,
            r14 = out(reg) r14,
            r15 = out(reg) r15,
            options(nomem, nostack, preserves_flags)
        );
    }
    UserRegs {
        rip,
        rsp,
        rbp,
        rbx,
        r12,
        r13,
        r14,
        r15,
        cs: 0x08,
        ss: 0x10,
        eflags: 0x2,
        orig_rax: u64::MAX,
        ..UserRegs::default()
    }
}

/// Parks this CPU for good: `cli; hlt`, woken only by NMIs, which find the
/// crash already handled and come back here.
fn park() -> ! {
    arch::cpu::halt_forever()
}

/// Enters the crash path. Never returns.
pub fn crash(reason: Reason<'_>, regs: &UserRegs) -> ! {
    arch::cpu::disable_interrupts();
    let me = percpu::current_cpu_index() as usize;
    match COORDINATOR.enter(me) {
        Role::Coordinator => coordinate(me, reason, regs),
        Role::Responder { coordinator } => {
            let _ = writeln!(
                EmergencyConsole,
                "\n*** hv: CPU {me} crashed too ({reason}) while CPU {coordinator} coordinates"
            );
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            park()
        }
        Role::ReEntered { .. } => {
            let _ = writeln!(
                EmergencyConsole,
                "\n*** hv: CPU {me} crashed again inside the crash path ({reason})"
            );
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            park()
        }
    }
}

/// The NMI handler's crash slot, installed at boot: `false` when no crash
/// is under way (the NMI is someone else's). Otherwise it never returns.
pub fn on_nmi(frame: &TrapFrame) -> bool {
    let me = percpu::current_cpu_index();
    if SPIN_IN_NMI.load(Ordering::Relaxed) == me {
        // Test knob: a CPU stuck with NMIs blocked, which cannot answer.
        loop {
            core::hint::spin_loop();
        }
    }
    let Some(coordinator) = COORDINATOR.coordinator() else {
        return false;
    };
    if coordinator == me as usize
        && COORDINATOR
            .status(coordinator)
            .is_some_and(|status| !status.handler_started())
    {
        // A stray NMI on the coordinator before its own cleanup: it will
        // clean up itself after the rendezvous.
        return true;
    }
    percpu::shared(me as usize)
        .crash_nmi_at_us
        .store(time::now_us(), Ordering::Relaxed);
    // Answer the shootdown: no output (every CPU at once would garble the
    // console), clean up, check in, park.
    let regs = regs_from_frame(frame);
    COORDINATOR.enter(me as usize);
    COORDINATOR.crash_this_cpu(me as usize, &regs, &LISTS, &mut Hardware);
    park()
}

static SUMMARY_PRINTED: AtomicBool = AtomicBool::new(false);

fn coordinate(me: usize, reason: Reason<'_>, regs: &UserRegs) -> ! {
    let apic_id = percpu::shared(me).slot.apic_id();
    let _ = writeln!(
        EmergencyConsole,
        "\n*** hv: CRASH on CPU {me} (APIC ID {apic_id}): {reason}"
    );
    let mut expected = CpuSet::new();
    for (index, cpu) in smp::cpus().iter().enumerate() {
        if index != me && cpu.slot.state() == CpuState::Online {
            let _ = expected.insert(index);
        }
    }
    let started = time::now_us();
    let started_tsc = arch::cpu::rdtsc();
    smp::send_nmi_to_online_others();
    let waiting_from_us = time::now_us().saturating_sub(started);
    let rendezvous = COORDINATOR.wait_for_rendezvous(
        &expected,
        &mut TscClock,
        TIMEOUT_US.load(Ordering::Relaxed),
    );
    let shootdown_us = time::now_us().saturating_sub(started);
    for straggler in &rendezvous.stragglers {
        let stuck = if rendezvous.stuck_in_handler.contains(straggler) {
            " (stuck inside the crash handler)"
        } else {
            " (never answered the NMI)"
        };
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: CPU {straggler} (APIC ID {}) did not check in{stuck}",
            percpu::shared(straggler).slot.apic_id()
        );
    }
    let own = COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);

    let mut vmxoff_cpus = 0;
    let mut vmcs_visited = 0;
    for cpu in &rendezvous.checked_in {
        if let Some(record) = COORDINATOR.record(cpu) {
            vmxoff_cpus += u64::from(record.ledger.vmx.is_off());
            vmcs_visited += record.ledger.walk.map_or(0, |walk| u64::from(walk.visited));
        }
    }
    let accounting = crate::guests::crash_vmcs_accounting(&rendezvous.stragglers);
    let (vmcs_loaded, vmcs_cleared) = (accounting.loaded, accounting.cleared);
    if !SUMMARY_PRINTED.swap(true, Ordering::AcqRel) {
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCS loaded {vmcs_loaded}, cleared {vmcs_cleared}; VMXOFF on {vmxoff_cpus}; own VMX exit {:?}",
            rendezvous.checked_in.len(),
            expected.len(),
            own.vmx,
        );
        crate::report::emergency(|o| {
            o.field("crash").object(|o| {
                o.field("cpu").u64(u64::from(apic_id))?;
                o.field("cpu_index").u64(me as u64)?;
                o.field("reason").display(reason)?;
                o.field("expected").u64(expected.len() as u64)?;
                o.field("checked_in")
                    .u64(rendezvous.checked_in.len() as u64)?;
                o.field("stragglers").u64_array(
                    rendezvous
                        .stragglers
                        .iter()
                        .map(|cpu| u64::from(percpu::shared(cpu).slot.apic_id())),
                )?;
                o.field("vmcs_loaded").u64(vmcs_loaded)?;
                o.field("vmcs_cleared").u64(vmcs_cleared)?;
                o.field("vmcs_visited").u64(vmcs_visited)?;
                o.field("vmcs_on_stragglers")
                    .u64(accounting.on_stragglers)?;
                o.field("vmxoff_cpus").u64(vmxoff_cpus)?;
                o.field("coordinator_vmx_off").bool(own.vmx.is_off())?;
                o.field("shootdown_us").u64(shootdown_us)?;
                // Raw TSC: a capture kernel's own clock has another
                // calibration, the TSC is the one clock both share.
                o.field("started_tsc").u64(started_tsc)?;
                o.field("timed_out").bool(rendezvous.timed_out)?;
                // Per CPU index: from the first NMI sent to that CPU taking
                // it (null: never took it), the per-CPU NMI latency.
                o.field("nmi_latency_us").array(|a| {
                    smp::cpus().iter().try_for_each(|cpu| {
                        let at = cpu.crash_nmi_at_us.load(Ordering::Relaxed);
                        let latency = (at != 0).then(|| at.saturating_sub(started));
                        a.item().option(latency, |value, us| value.u64(us))
                    })
                })?;
                // Per CPU index: from the first NMI sent to the rendezvous
                // seeing that CPU checked in (null: never seen).
                o.field("checkin_us").array(|a| {
                    (0..smp::cpus().len()).try_for_each(|cpu| {
                        let seen = COORDINATOR
                            .record(cpu)
                            .and_then(|record| record.observed_after_us)
                            .map(|us| waiting_from_us.saturating_add(us));
                        a.item().option(seen, |value, us| value.u64(us))
                    })
                })
            })
        });
    }
    crate::capture::hand_over(&crate::capture::Handover {
        coordinator: me,
        checked_in: &rendezvous.checked_in,
        stragglers: &rendezvous.stragglers,
        reason: &reason,
    });
    crate::finish::crash_stop()
}
