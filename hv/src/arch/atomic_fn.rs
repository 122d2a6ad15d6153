//! A function pointer in an atomic: the call-function IPI hands a
//! `fn(usize)` from one CPU to another through a shared slot.

use core::sync::atomic::{AtomicUsize, Ordering};

/// An atomic `Option<fn(usize)>`. Only real function pointers are ever
/// stored (its API takes nothing else), so a loaded value is one.
#[derive(Debug)]
pub struct AtomicCallFn {
    bits: AtomicUsize,
}

impl AtomicCallFn {
    /// Holding nothing.
    pub const fn new() -> Self {
        Self {
            bits: AtomicUsize::new(0),
        }
    }

    /// Stores `function`.
    pub fn store(&self, function: fn(usize), order: Ordering) {
        self.bits.store(function as usize, order);
    }

    /// Stores `function` if the slot holds nothing; returns whether it
    /// now holds `function` (stored here, or already there).
    pub fn store_if_empty(&self, function: fn(usize)) -> bool {
        match self
            .bits
            .compare_exchange(0, function as usize, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(bits) => bits == function as usize,
        }
    }

    /// The stored function, if any.
    pub fn load(&self, order: Ordering) -> Option<fn(usize)> {
        let bits = self.bits.load(order);
        // SAFETY: (1) non-zero bits were stored by `store` from a `fn(usize)` (function pointers
        // are never null).
        (bits != 0).then(|| unsafe { core::mem::transmute::<usize, fn(usize)>(bits) })
    }
}

impl Default for AtomicCallFn {
    fn default() -> Self {
        Self::new()
    }
}
