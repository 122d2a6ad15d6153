//! hv's crash test knob as xtask speaks it: `crash=cpu:N,after_ms:T[,point:NAME]`.
//!
//! [`CrashSpec`] reads and writes the knob's value with hv's own rules
//! (`hv/core/src/cmdline.rs`: keys in any order, decimal or `0x` hex, the
//! last key wins, `cpu` required). On top of what hv accepts, xtask knows
//! which specs can really crash a given machine ([`CrashSpec::check`]): a CPU
//! that exists, a list store the protocol makes, a point that can fire
//! without VMX. [`CrashSpec::random`] draws a spec that can, and [`Rng`] is
//! the small seeded generator behind every random choice, so that a printed
//! seed reproduces a whole stress loop.

use std::time::{SystemTime, UNIX_EPOCH};

pub use hv_abi::defaults::{
    CRASH_TIMEOUT_MS as DEFAULT_TIMEOUT_MS, GUEST_RUN_MS as DEFAULT_GUEST_RUN_MS,
    MAX_CRASH_TIMEOUT_MS as MAX_TIMEOUT_MS,
};
pub use hv_abi::knobs::{LIST_ADD_STORES, LIST_REMOVE_STORES};

pub use hv_abi::knobs::{CoordinatorStep, CrashPoint as Point, CrashSpec};

/// What the harness knows of a `crash=` spec beyond hv's parser: whether a
/// machine can fire it, random draws, who panics and who must straggle.
pub trait CrashSpecExt: Sized {
    /// The command-line word: `crash=cpu:N,after_ms:T[,point:NAME]`.
    fn word(&self) -> String;
    /// Whether this spec can crash a machine of `cpus` CPUs, with or
    /// without guests (VMX or SVM); the reason when it cannot.
    fn check(&self, cpus: u32, guests: bool) -> Result<(), String>;
    /// Whether this spec's point can fire in a run with (or without) a
    /// capture kernel loaded; the reason when it cannot.
    fn check_capture(&self, capture: bool) -> Result<(), String>;
    /// A random spec that can crash a machine of `cpus` CPUs, in a run
    /// with or without a capture kernel.
    fn random(rng: &mut Rng, cpus: u32, guests: bool, capture: bool, guest_run_ms: u64) -> Self;
    /// The CPU indexes that panic.
    fn panickers(&self, cpus: u32) -> Vec<u32>;
    /// The CPU indexes that must be named stragglers.
    fn stragglers(&self) -> Vec<u32>;
}

impl CrashSpecExt for CrashSpec {
    fn word(&self) -> String {
        format!("crash={self}")
    }

    fn check(&self, cpus: u32, guests: bool) -> Result<(), String> {
        if self.cpu >= cpus {
            return Err(format!(
                "crash=cpu:{} names CPU index {}, but the machine has {cpus} CPU{} (0 to {})",
                self.cpu,
                self.cpu,
                if cpus == 1 { "" } else { "s" },
                cpus.saturating_sub(1)
            ));
        }
        let Some(point) = self.point else {
            return Ok(());
        };
        match point {
            Point::ListAdd(n) if n >= LIST_ADD_STORES => Err(format!(
                "point:{point} never fires: a list insertion makes {LIST_ADD_STORES} stores \
                 (list_add0 to list_add{})",
                LIST_ADD_STORES - 1
            )),
            Point::ListRemove(n) if n >= LIST_REMOVE_STORES => Err(format!(
                "point:{point} never fires: a list removal makes {LIST_REMOVE_STORES} stores \
                 (list_remove0 to list_remove{})",
                LIST_REMOVE_STORES - 1
            )),
            point if point.needs_vmx() && !guests => Err(format!(
                "point:{point} fires only while guests run, and this machine runs none \
                 (a CPU with neither VMX nor SVM)"
            )),
            Point::Bringup if self.cpu == 0 => Err(
                "point:bringup needs an AP (cpu:1 or above): the boot CPU is not brought up"
                    .to_owned(),
            ),
            Point::NmiBlocked
            | Point::DoublePanic
            | Point::CoordinatorNmi(_)
            | Point::ExternalNmi
                if cpus < 2 =>
            {
                Err(format!("point:{point} needs at least 2 CPUs"))
            }
            Point::Bringup if cpus < 2 => Err("point:bringup needs at least 2 CPUs".to_owned()),
            _ => Ok(()),
        }
    }

    fn check_capture(&self, capture: bool) -> Result<(), String> {
        match self.point {
            Some(point) if needs_capture(point) && !capture => Err(format!(
                "point:{point} strikes inside the hand-over to a capture kernel, and this run \
                 loads none (without one hv never gets there): add --capture hv"
            )),
            _ => Ok(()),
        }
    }

    /// A random spec that can crash a machine of `cpus` CPUs (see
    /// [`check`](Self::check) and [`check_capture`](Self::check_capture)):
    /// a point drawn uniformly among the valid ones and "no point"
    /// (time-based), a CPU the point allows, and, where hv uses it, an
    /// `after_ms` from 1 to half of `guest_run_ms`, so that a crash with
    /// guests lands inside the guest run.
    fn random(
        rng: &mut Rng,
        cpus: u32,
        guests: bool,
        capture: bool,
        guest_run_ms: u64,
    ) -> CrashSpec {
        let mut choices: Vec<Option<Point>> = vec![None];
        choices.extend(
            Point::ALL
                .into_iter()
                .filter(|&point| {
                    let probe = CrashSpec {
                        cpu: u32::from(point == Point::Bringup),
                        after_ms: 0,
                        point: Some(point),
                    };
                    probe.check(cpus, guests).is_ok() && probe.check_capture(capture).is_ok()
                })
                .map(Some),
        );
        let point = choices[rng.below(choices.len() as u64) as usize];
        let cpus = u64::from(cpus.max(1));
        let cpu = match point {
            Some(Point::Bringup) => 1 + rng.below(cpus - 1),
            _ => rng.below(cpus),
        } as u32;
        let after_ms = match point {
            Some(point) if point.ignores_after_ms() => 0,
            _ => 1 + rng.below((guest_run_ms / 2).max(1)),
        };
        CrashSpec {
            cpu,
            after_ms,
            point,
        }
    }

    /// The CPU indexes that panic (the coordinator is one of them): the
    /// target, except for `nmi_blocked` (CPU 0, or 1 when the target is 0)
    /// and `double_panic` (the target and the next one).
    fn panickers(&self, cpus: u32) -> Vec<u32> {
        let cpus = cpus.max(1);
        match self.point {
            Some(Point::NmiBlocked) => vec![if self.cpu == 0 { 1 % cpus } else { 0 }],
            Some(Point::DoublePanic) => {
                let other = (self.cpu + 1) % cpus;
                if other == self.cpu {
                    vec![self.cpu]
                } else {
                    vec![self.cpu, other]
                }
            }
            _ => vec![self.cpu],
        }
    }

    /// The CPU indexes that must be named stragglers: the CPU spinning
    /// with NMIs blocked, no other.
    fn stragglers(&self) -> Vec<u32> {
        match self.point {
            Some(Point::NmiBlocked) => vec![self.cpu],
            _ => Vec::new(),
        }
    }
}

/// Whether `point` strikes inside hv's hand-over to a capture kernel (a
/// stray NMI on the coordinator while it writes the core header, checks
/// the digests or runs the purgatory; a storm of them from the purgatory
/// through the capture image's entry; a panic inside the hand-over): hv
/// gets there only with a capture kernel loaded. The other points that
/// disturb a crash (`nmi_after_cleanup`, `external_nmi`) strike before the
/// hand-over and need none.
pub fn needs_capture(point: Point) -> bool {
    matches!(
        point,
        Point::CoordinatorNmi(
            CoordinatorStep::CoreHeader
                | CoordinatorStep::DigestCheck
                | CoordinatorStep::Purgatory
                | CoordinatorStep::Storm
        ) | Point::HandoverPanic
    )
}

/// The points that disturb a crash already under way (the crash itself is
/// time-based): stray NMIs on the coordinator, a panic inside the
/// hand-over, an NMI on every CPU during the crash.
pub fn disturbing_points() -> impl Iterator<Item = Point> {
    Point::ALL
        .into_iter()
        .filter(|point| point.disturbs_the_crash())
}

/// What `--crash` asks for: a given spec, or a random one per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashArg {
    /// This spec, passed to hv as it is.
    Spec(CrashSpec),
    /// A random spec valid for the machine (see [`CrashSpec::random`]).
    Random,
}

impl CrashArg {
    /// Parses `--crash`'s value: `random` or a `crash=` value.
    pub fn parse(text: &str) -> Result<CrashArg, String> {
        let text = text.trim();
        if text == "random" {
            return Ok(CrashArg::Random);
        }
        // Forgive the key: `--crash crash=cpu:1,...` means the same.
        let value = text.strip_prefix("crash=").unwrap_or(text);
        CrashSpec::parse(value)
            .map(CrashArg::Spec)
            .map_err(String::from)
            .map_err(|error| format!("`{text}`: {error}"))
    }

    /// The spec of one run: the given one, or a fresh random one (for a
    /// run with or without a capture kernel).
    pub fn pick(
        &self,
        rng: &mut Rng,
        cpus: u32,
        guests: bool,
        capture: bool,
        guest_run_ms: u64,
    ) -> CrashSpec {
        match self {
            CrashArg::Spec(spec) => *spec,
            CrashArg::Random => CrashSpec::random(rng, cpus, guests, capture, guest_run_ms),
        }
    }
}

/// The seeded generator of random crashes: the workspace's one (fastrand,
/// also the randomized tests'). The same seed gives the same sequence of
/// crashes.
#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// A number from 0 to `bound - 1` (0 when `bound` is 0), without the
    /// bias of a plain modulo.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        self.0.u64(0..bound)
    }
}

/// A seed from the clock and the process ID, for runs that were given none.
pub fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let mut rng = Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    // Keep printed seeds short enough to type.
    rng.next_u64() % 1_000_000_000
}

/// A number as hv's command line writes it: decimal, or hex after `0x`.
pub(crate) fn parse_number(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(cpu: u32, after_ms: u64, point: Option<Point>) -> CrashSpec {
        CrashSpec {
            cpu,
            after_ms,
            point,
        }
    }

    #[test]
    fn specs_parse_like_hv_reads_them() {
        assert_eq!(
            CrashSpec::parse("cpu:3,after_ms:20").unwrap(),
            spec(3, 20, None)
        );
        assert_eq!(
            CrashSpec::parse("point:list_remove2,cpu:0x1").unwrap(),
            spec(1, 0, Some(Point::ListRemove(2)))
        );
        assert_eq!(
            CrashSpec::parse("cpu:1,cpu:4,after_ms:0xa,point:nmi_blocked").unwrap(),
            spec(4, 10, Some(Point::NmiBlocked))
        );
        for bad in [
            "after_ms:5",
            "cpu:x",
            "cpu:1,point:list_add8",
            "cpu:1,point:somewhere",
            "cpu:1,when:now",
            "cpu1",
            "cpu:1,after_ms:3600001",
            "cpu:4294967296",
            "cpu:-1",
            "",
        ] {
            assert!(CrashSpec::parse(bad).is_err(), "{bad}");
        }
        let error = CrashArg::parse("cpu:1,point:nowhere").unwrap_err();
        assert!(
            error.contains("nowhere") && error.contains("list_add4"),
            "{error}"
        );
    }

    #[test]
    fn every_point_name_round_trips() {
        for point in Point::ALL {
            assert_eq!(Point::parse(&point.to_string()), Some(point), "{point}");
        }
        // hv parses stores up to 7 even though fewer exist.
        assert_eq!(Point::parse("list_add7"), Some(Point::ListAdd(7)));
        assert_eq!(Point::parse("list_add+1"), None);
        assert_eq!(Point::ALL.len(), 21);
        let text = spec(5, 30, Some(Point::VcpuLoad)).word();
        assert_eq!(text, "crash=cpu:5,after_ms:30,point:vcpu_load");
        assert_eq!(
            CrashSpec::parse(text.strip_prefix("crash=").unwrap()).unwrap(),
            spec(5, 30, Some(Point::VcpuLoad))
        );
        assert_eq!(spec(0, 7, None).to_string(), "cpu:0,after_ms:7");
    }

    #[test]
    fn check_refuses_what_cannot_crash_the_machine() {
        assert!(spec(7, 5, None).check(8, false).is_ok());
        let missing = spec(8, 5, None).check(8, true).unwrap_err();
        assert!(missing.contains("has 8 CPUs (0 to 7)"), "{missing}");
        let store = spec(1, 5, Some(Point::ListAdd(5)))
            .check(8, true)
            .unwrap_err();
        assert!(store.contains("list_add0 to list_add4"), "{store}");
        assert!(
            spec(1, 5, Some(Point::ListRemove(3)))
                .check(8, true)
                .is_err()
        );
        let tcg = spec(1, 5, Some(Point::VcpuLoad))
            .check(8, false)
            .unwrap_err();
        assert!(tcg.contains("runs none"), "{tcg}");
        assert!(spec(1, 5, Some(Point::VcpuLoad)).check(8, true).is_ok());
        assert!(spec(0, 0, Some(Point::Bringup)).check(8, true).is_err());
        assert!(spec(1, 0, Some(Point::Bringup)).check(8, false).is_ok());
        assert!(spec(0, 1, Some(Point::NmiBlocked)).check(1, true).is_err());
        assert!(spec(0, 1, Some(Point::DoublePanic)).check(1, true).is_err());
        assert!(spec(0, 1, Some(Point::BeforeVmx)).check(1, false).is_ok());
    }

    #[test]
    fn random_specs_are_valid_and_cover_every_point_of_the_platform() {
        for (cpus, vmx, capture) in [
            (64, false, true),
            (64, false, false),
            (8, true, true),
            (8, true, false),
            (15, true, true),
            (2, false, true),
            (1, true, true),
        ] {
            let mut rng = Rng::new(42);
            let mut seen = HashSet::new();
            for _ in 0..4000 {
                let spec = CrashSpec::random(&mut rng, cpus, vmx, capture, 100);
                assert!(spec.check(cpus, vmx).is_ok(), "{spec} on {cpus} CPUs");
                assert!(spec.check_capture(capture).is_ok(), "{spec}");
                match spec.point {
                    Some(point) if point.ignores_after_ms() => assert_eq!(spec.after_ms, 0),
                    _ => assert!((1..=50).contains(&spec.after_ms), "{spec}"),
                }
                seen.insert(spec.point);
            }
            let expected: HashSet<Option<Point>> = std::iter::once(None)
                .chain(Point::ALL.into_iter().map(Some))
                .filter(|point| {
                    let cpu = u32::from(*point == Some(Point::Bringup));
                    let probe = spec(cpu, 1, *point);
                    probe.check(cpus, vmx).is_ok() && probe.check_capture(capture).is_ok()
                })
                .collect();
            assert_eq!(seen, expected, "{cpus} CPUs, vmx {vmx}, capture {capture}");
        }
        // Without VMX: no point of the list protocol, and what is left;
        // with a capture kernel every point that disturbs the crash.
        let mut rng = Rng::new(7);
        let points: HashSet<Option<Point>> = (0..1000)
            .map(|_| CrashSpec::random(&mut rng, 64, false, true, 100).point)
            .collect();
        assert_eq!(
            points,
            HashSet::from([
                None,
                Some(Point::NmiBlocked),
                Some(Point::DoublePanic),
                Some(Point::BeforeVmx),
                Some(Point::Bringup),
                Some(Point::CoordinatorNmi(CoordinatorStep::AfterCleanup)),
                Some(Point::CoordinatorNmi(CoordinatorStep::CoreHeader)),
                Some(Point::CoordinatorNmi(CoordinatorStep::DigestCheck)),
                Some(Point::CoordinatorNmi(CoordinatorStep::Purgatory)),
                Some(Point::CoordinatorNmi(CoordinatorStep::Storm)),
                Some(Point::HandoverPanic),
                Some(Point::ExternalNmi),
            ])
        );
        // Without one, only those that strike before the hand-over.
        let points: HashSet<Option<Point>> = (0..1000)
            .map(|_| CrashSpec::random(&mut rng, 64, false, false, 100).point)
            .filter(|point| point.is_some_and(Point::disturbs_the_crash))
            .collect();
        assert_eq!(
            points,
            HashSet::from([
                Some(Point::CoordinatorNmi(CoordinatorStep::AfterCleanup)),
                Some(Point::ExternalNmi),
            ])
        );
    }

    #[test]
    fn points_inside_the_hand_over_need_a_capture_kernel() {
        let needing: Vec<String> = Point::ALL
            .into_iter()
            .filter(|&point| needs_capture(point))
            .map(|point| point.to_string())
            .collect();
        assert_eq!(
            needing,
            [
                "nmi_in_header",
                "nmi_in_digest",
                "nmi_in_purgatory",
                "nmi_storm",
                "handover_panic"
            ]
        );
        let disturbing: Vec<String> = disturbing_points().map(|p| p.to_string()).collect();
        assert_eq!(
            disturbing,
            [
                "nmi_after_cleanup",
                "nmi_in_header",
                "nmi_in_digest",
                "nmi_in_purgatory",
                "nmi_storm",
                "handover_panic",
                "external_nmi"
            ]
        );
        let error = spec(3, 5, Some(Point::HandoverPanic))
            .check_capture(false)
            .unwrap_err();
        assert!(error.contains("--capture hv"), "{error}");
        assert!(
            spec(3, 5, Some(Point::HandoverPanic))
                .check_capture(true)
                .is_ok()
        );
        assert!(
            spec(3, 5, Some(Point::ExternalNmi))
                .check_capture(false)
                .is_ok()
        );
        assert!(spec(3, 5, None).check_capture(false).is_ok());
    }

    #[test]
    fn random_cpus_reach_both_ends_and_bringup_skips_the_boot_cpu() {
        let mut rng = Rng::new(1);
        let mut cpus_seen = HashSet::new();
        for _ in 0..5000 {
            let spec = CrashSpec::random(&mut rng, 8, true, true, 100);
            cpus_seen.insert(spec.cpu);
            if spec.point == Some(Point::Bringup) {
                assert!(spec.cpu >= 1, "{spec}");
            }
        }
        assert_eq!(cpus_seen, (0..8).collect());
    }

    #[test]
    fn the_same_seed_gives_the_same_specs() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| CrashSpec::random(&mut rng, 64, false, true, 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(99), draw(99));
        assert_ne!(draw(99), draw(100));
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = Rng::new(3);
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
        let values: HashSet<u64> = (0..1000).map(|_| rng.below(3)).collect();
        assert_eq!(values, HashSet::from([0, 1, 2]));
    }

    #[test]
    fn panickers_and_stragglers_follow_the_point() {
        assert_eq!(spec(3, 1, None).panickers(8), [3]);
        assert_eq!(spec(3, 1, Some(Point::NmiBlocked)).panickers(8), [0]);
        assert_eq!(spec(0, 1, Some(Point::NmiBlocked)).panickers(8), [1]);
        assert_eq!(spec(3, 1, Some(Point::NmiBlocked)).stragglers(), [3]);
        assert_eq!(spec(7, 1, Some(Point::DoublePanic)).panickers(8), [7, 0]);
        assert_eq!(spec(2, 1, Some(Point::DoublePanic)).panickers(8), [2, 3]);
        assert!(spec(2, 1, Some(Point::DoublePanic)).stragglers().is_empty());
        assert_eq!(spec(5, 0, Some(Point::Bringup)).panickers(8), [5]);
    }

    #[test]
    fn the_crash_option_takes_random_or_a_spec() {
        assert_eq!(CrashArg::parse("random"), Ok(CrashArg::Random));
        assert_eq!(
            CrashArg::parse("cpu:2,after_ms:5"),
            Ok(CrashArg::Spec(spec(2, 5, None)))
        );
        assert_eq!(
            CrashArg::parse("crash=cpu:2,point:bringup"),
            Ok(CrashArg::Spec(spec(2, 0, Some(Point::Bringup))))
        );
        let error = CrashArg::parse("cpu:two").unwrap_err();
        assert!(
            error.starts_with("`cpu:two`: ") && error.contains("cpu: expected a CPU index"),
            "{error}"
        );
        let mut rng = Rng::new(5);
        assert_eq!(
            CrashArg::Spec(spec(1, 2, None)).pick(&mut rng, 4, false, true, 100),
            spec(1, 2, None)
        );
    }

    #[test]
    fn fresh_seeds_are_short() {
        assert!(fresh_seed() < 1_000_000_000);
    }
}
