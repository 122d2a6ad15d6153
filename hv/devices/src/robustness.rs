//! Randomized robustness tests on stable Rust: everything a guest or a
//! guest image controls is fed random and mutated input, which must give
//! `Ok` or `Err` but never a panic, and whose `Ok` results keep their
//! invariants. Seeds are fixed, so a failure reproduces; an input found
//! failing becomes a named regression test in its module.

use crate::cpu_state::SipiStartState;
use crate::decode::{CodeSize, decode};
use crate::memory::GpaRange;
use crate::memory::fake::VecMemory;
use crate::multiboot::testutil::ElfBuilder;
use crate::multiboot::{GuestLayout, LoadPlan, Module, MultibootImage};
use crate::platform::{Event, InterruptState, Platform, PlatformConfig, RunState};
use crate::time::fake::FakeClock;
use crate::uart::fake::Lines;

/// The workspace's seeded generator (fastrand), with the picks these
/// tests make.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(0..n)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Values that tend to break size arithmetic.
const INTERESTING: [u32; 10] = [
    0,
    1,
    0xFFF,
    0x1000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_F000,
    0xFFFF_FFF0,
    0xFFFF_FFFF,
    0x40_0000,
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    for _ in 0..1 + rng.below(6) {
        if bytes.is_empty() {
            bytes.push(rng.next() as u8);
            continue;
        }
        // The ELF and program headers and the multiboot header hold most
        // fields: aim there half of the time.
        let hot = bytes.len().min(0x140);
        let offset = if rng.below(2) == 0 {
            rng.below(hot)
        } else {
            rng.below(bytes.len())
        };
        match rng.below(5) {
            0 => bytes[offset] ^= 1 << rng.below(8),
            1 => bytes[offset] = rng.next() as u8,
            2 => {
                let value = rng.pick(&INTERESTING).to_le_bytes();
                let end = (offset + 4).min(bytes.len());
                bytes[offset..end].copy_from_slice(&value[..end - offset]);
            }
            3 => bytes.truncate(rng.below(bytes.len() + 1)),
            _ => bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        }
    }
    bytes
}

/// Loads `image` as the kernel would; checks what an `Ok` promises.
/// Returns whether it loaded.
fn exercise_loader(rng: &mut Rng, image: &[u8]) -> bool {
    let Ok(parsed) = MultibootImage::parse(image) else {
        return false;
    };
    for s in parsed.segments() {
        assert!(s.file_offset + s.file_len <= image.len());
        assert!(s.file_len as u64 <= s.mem_len);
        assert!(s.gpa + s.mem_len <= 1 << 32);
    }
    assert!(
        parsed
            .segments()
            .iter()
            .any(|s| s.range().contains(u64::from(parsed.entry())))
    );
    let ram = rng.pick(&[2u64 << 20, 8 << 20, 32 << 20]);
    let layout = GuestLayout::pc(ram).unwrap();
    let env = vec![b'x'; rng.below(10_000)];
    let modules = [Module {
        bytes: &env,
        string: b"env",
    }];
    let cmdline = vec![b'a'; rng.below(300)];
    let Ok(plan) = LoadPlan::new(parsed, &cmdline, &modules[..rng.below(2)], layout) else {
        return false;
    };
    let mut pieces: Vec<GpaRange> = plan.segments().iter().map(|s| s.range()).collect();
    pieces.extend(plan.module_ranges());
    pieces.push(plan.boot_info());
    for (i, a) in pieces.iter().enumerate() {
        layout.check_usable(*a).unwrap();
        for b in &pieces[i + 1..] {
            assert!(!a.overlaps(b), "{a:x?} and {b:x?} overlap");
        }
    }
    let mut memory = VecMemory::new(ram as usize);
    let state = plan.load(&mut memory).unwrap();
    assert_eq!(u64::from(state.ebx), plan.boot_info().start);
    true
}

#[test]
fn mutated_images_never_panic_the_loader() {
    let mut rng = Rng::new(0x5EED_0001);
    let mut seeds = vec![ElfBuilder::kvm_unit_test_like().build()];
    let mut low = ElfBuilder::kvm_unit_test_like();
    low.segments = vec![
        (0x8000, low.segments[0].1.clone(), 0x2000),
        (0xB000, vec![1; 64], 0x2000),
    ];
    low.entry = 0x800C;
    seeds.push(low.build());
    // Real images too, when this machine has them.
    let dir = std::env::var("HV_KVM_UNIT_TESTS")
        .unwrap_or_else(|_| "/work/shared/guests/kvm-unit-tests".into());
    for name in ["smptest.flat", "realmode.flat"] {
        if let Ok(bytes) = std::fs::read(format!("{dir}/x86/{name}")) {
            seeds.push(bytes[..bytes.len().min(64 << 10)].to_vec());
        }
    }
    let mut loaded = 0;
    for i in 0..6000 {
        let seed = &seeds[i % seeds.len()];
        let image = mutate(&mut rng, seed);
        loaded += usize::from(exercise_loader(&mut rng, &image));
    }
    assert!(
        loaded > 500,
        "only {loaded} mutated images loaded: the mutations miss"
    );
    for _ in 0..2000 {
        let len = rng.below(512);
        let mut image: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 12 && rng.below(2) == 0 {
            // A valid header at a random aligned spot, random flags.
            let at = rng.below(len / 4 - 2) * 4;
            let flags = rng.next() as u32 & 0x0001_0003;
            let words = [
                0x1BAD_B002u32,
                flags,
                0u32.wrapping_sub(0x1BAD_B002).wrapping_sub(flags),
            ];
            for (k, w) in words.iter().enumerate() {
                image[at + 4 * k..at + 4 * k + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
        let _ = exercise_loader(&mut rng, &image);
    }
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut rng = Rng::new(0x5EED_0002);
    for _ in 0..100_000 {
        let len = rng.below(20);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let mode = rng.pick(&[CodeSize::Bits16, CodeSize::Bits32, CodeSize::Bits64]);
        if let Ok(insn) = decode(&bytes, mode) {
            assert!(usize::from(insn.length) <= bytes.len() && insn.length <= 15);
            assert!(matches!(insn.size, 1 | 2 | 4 | 8));
            let regs = [rng.next(); 16];
            let _ = (
                insn.store_value(&regs),
                insn.load_result(rng.next(), rng.next()),
            );
        }
    }
}

/// Ports and MMIO addresses the guest may touch, biased towards devices.
const PORTS: [u16; 24] = [
    0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x3F8, 0x3F9, 0x3FB, 0x3FC,
    0x3FD, 0x510, 0x511, 0xE0, 0xE4, 0x2000, 0x200E, 0x608, 0xCF8,
];

#[test]
fn random_guests_never_panic_the_platform() {
    let mut rng = Rng::new(0x5EED_0003);
    // What the rounds reached, so that the test cannot pass by doing nothing.
    let (mut interrupts, mut nmis, mut starts, mut stops) = (0, 0, 0, 0);
    for _ in 0..40 {
        let vcpus = 1 + rng.below(4);
        let clock = FakeClock::default();
        let mut config =
            PlatformConfig::new(vcpus, 64 << 20, 1_000_000_000 + rng.next() % 3_000_000_000);
        config.features.x2apic = rng.below(4) != 0;
        config.features.tsc_deadline = rng.below(4) != 0;
        let mut p = Platform::new(config, clock.clone(), Lines::default()).unwrap();
        for _ in 0..3000 {
            let vcpu = rng.below(vcpus);
            if rng.below(8) == 0 {
                clock.set(clock.0.get() + rng.next() % 100_000);
            }
            let size = rng.pick(&[1u8, 2, 4]);
            let value = if rng.below(2) == 0 {
                rng.next() as u32
            } else {
                rng.pick(&INTERESTING)
            };
            match rng.below(13) {
                12 => {
                    // A well-formed IPI: INIT, SIPI, fixed, NMI, with a
                    // shorthand or a destination.
                    let mode = rng.pick(&[0x500u32, 0x600, 0x000, 0x400, 0x100]);
                    let mut shorthand = rng.pick(&[0u32, 0x40000, 0x80000, 0xC0000]);
                    let mut dest = rng.below(vcpus + 1) as u64;
                    if mode == 0x500 {
                        // INIT to vCPU 0 is a reset that ends the round;
                        // aim it at an AP.
                        shorthand = 0;
                        dest = 1 + rng.below(vcpus.max(2) - 1) as u64;
                    }
                    let low = mode | shorthand | 0x4000 | (rng.next() as u32 & 0xFF);
                    let _ = p.mmio_write(vcpu, 0xFEE0_0310, 4, dest << 24);
                    let _ = p.mmio_write(vcpu, 0xFEE0_0300, 4, u64::from(low));
                }
                0 => {
                    let _ = p.io_in(vcpu, rng.pick(&PORTS), size);
                }
                1 | 2 => {
                    let port = if rng.below(8) == 0 {
                        rng.next() as u16
                    } else {
                        rng.pick(&PORTS)
                    };
                    // The debug-exit port would end the round early.
                    if !(0xF4..=0xF7).contains(&port) {
                        let fx = p.io_out(vcpu, port, size, value);
                        assert!(
                            fx.kick.bits() >> vcpus == 0,
                            "kicked a vCPU that does not exist"
                        );
                    }
                }
                3 | 4 => {
                    let page = rng.pick(&[0xFEE0_0000u64, 0xFEC0_0000, 0xFED0_0000, 0x1000]);
                    let gpa = page + (rng.below(0x400) as u64) * 4;
                    let size = rng.pick(&[1u8, 2, 3, 4, 8]);
                    if rng.below(2) == 0 {
                        let _ = p.mmio_read(vcpu, gpa, size);
                    } else if let Ok(fx) = p.mmio_write(vcpu, gpa, size, u64::from(value)) {
                        assert!(fx.kick.bits() >> vcpus == 0);
                    }
                }
                5 => {
                    let msr = rng.pick(&[
                        0x10u32, 0x1B, 0x3A, 0x3B, 0x6E0, 0x802, 0x808, 0x80B, 0x830, 0x832, 0x838,
                        0x83F,
                    ]);
                    let value = if msr == 0x1B {
                        rng.pick(&[0xFEE0_0000u64, 0xFEE0_0800, 0xFEE0_0C00, 0xFEE0_0900])
                            | (rng.next() & 0x100)
                    } else {
                        rng.next() >> rng.below(64)
                    };
                    let _ = p.rdmsr(vcpu, msr);
                    let _ = p.wrmsr(vcpu, msr, value);
                }
                6 => {
                    let _ = p.write_cr8(vcpu, rng.next() % 20);
                    assert!(p.read_cr8(vcpu) <= 0xF);
                }
                7 | 8 => {
                    let state = InterruptState {
                        interrupts_enabled: rng.below(3) != 0,
                        blocked_by_sti: rng.below(6) == 0,
                        blocked_by_mov_ss: rng.below(10) == 0,
                        blocked_by_nmi: rng.below(4) == 0,
                        event_pending: rng.below(10) == 0,
                    };
                    let decision = p.next_event(vcpu, state);
                    if let Some(Event::Interrupt(vector)) = decision.inject {
                        assert!(
                            state.interrupts_enabled
                                && !state.blocked_by_sti
                                && !state.event_pending
                        );
                        // Only vCPU 0 takes the 8259's vectors, from outside its APIC.
                        assert!(
                            vcpu == 0 || p.apic(vcpu).isr_bit(vector),
                            "injected {vector:#x} not in service"
                        );
                        interrupts += 1;
                    }
                    if decision.inject == Some(Event::Nmi) {
                        assert!(
                            !state.blocked_by_nmi
                                && !state.blocked_by_sti
                                && !state.blocked_by_mov_ss
                        );
                        nmis += 1;
                    }
                }
                9 => {
                    let _ = p.halt(vcpu, rng.below(2) == 0);
                }
                10 => {
                    let kick = p.poll();
                    assert!(kick.bits() >> vcpus == 0);
                    for v in 0..vcpus {
                        if p.runnable(v)
                            && let Some(vector) = p.take_start(v)
                        {
                            let start = SipiStartState::new(vector, 0);
                            assert_eq!(start.cs.base, u64::from(vector) << 12);
                            assert_eq!(p.run_state(v), RunState::Running);
                            starts += 1;
                        }
                    }
                }
                _ => {
                    if let Some(deadline) = p.next_deadline(vcpu) {
                        clock.set(deadline.max(clock.0.get()));
                        let _ = p.poll();
                    }
                }
            }
            if p.stop_reason().is_some() {
                // A reset (INIT to vCPU 0, 0xCF9, 0x64) ended this guest.
                assert!(!p.runnable(0));
                stops += 1;
                break;
            }
        }
    }
    eprintln!("{interrupts} interrupts, {nmis} NMIs, {starts} SIPI starts, {stops} stops");
    assert!(interrupts > 100 && nmis > 10 && starts > 0 && stops > 0);
}
