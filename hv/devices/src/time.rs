//! Time: the kernel's clock and conversions between tick rates.
//!
//! Every device works in host TSC ticks, the unit of [`Clock::now`]; a
//! device with its own rate (the APIC timer's bus clock, the PIT's
//! 1.193182 MHz, the ACPI PM timer's 3.579545 MHz) converts with [`scale`].

/// The kernel's time source.
pub trait Clock {
    /// Host TSC ticks: monotonic, the same timeline on every core.
    fn now(&self) -> u64;
}

/// `ticks` at `from_hz` expressed at `to_hz`, rounded down; saturates.
pub fn scale(ticks: u64, from_hz: u64, to_hz: u64) -> u64 {
    if from_hz == 0 {
        return u64::MAX;
    }
    let scaled = u128::from(ticks) * u128::from(to_hz) / u128::from(from_hz);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// `ticks` at `from_hz` expressed at `to_hz`, rounded up; saturates. Used
/// for deadlines: a timer must not be reported due before it is.
pub fn scale_up(ticks: u64, from_hz: u64, to_hz: u64) -> u64 {
    if from_hz == 0 {
        return u64::MAX;
    }
    let scaled = (u128::from(ticks) * u128::from(to_hz)).div_ceil(u128::from(from_hz));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod fake {
    use std::cell::Cell;
    use std::rc::Rc;

    /// A clock the test moves by hand; clones share the time.
    #[derive(Clone, Default)]
    pub struct FakeClock(pub Rc<Cell<u64>>);

    impl FakeClock {
        pub fn set(&self, now: u64) {
            self.0.set(now);
        }
    }

    impl super::Clock for FakeClock {
        fn now(&self) -> u64 {
            self.0.get()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_rounds_the_right_way_and_saturates() {
        assert_eq!(scale(3_000_000_000, 3_000_000_000, 1_193_182), 1_193_182);
        assert_eq!(scale(1, 3, 1), 0);
        assert_eq!(scale_up(1, 3, 1), 1);
        assert_eq!(scale(u64::MAX, 1, 2), u64::MAX);
        assert_eq!(scale(5, 0, 2), u64::MAX);
        assert_eq!(scale_up(10, 2, 1), 5);
    }
}
