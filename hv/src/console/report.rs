//! Report lines (`@hv {...}`, see `xtask/REPORT.md`): what the hypervisor
//! found, in a form the test harness and lab automation parse.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use hv_core::json::{self, Object};
use hv_core::logring::Reservation;

use super::{LOG_RING, RING_SLOT_BYTES};

static ONLY_CAPTURE: AtomicBool = AtomicBool::new(false);

/// In a capture image, [`line()`] prints nothing: only [`capture_line`] does.
pub fn only_capture_lines(enabled: bool) {
    ONLY_CAPTURE.store(enabled, Ordering::Relaxed);
}

/// Prints one report line through the log ring: one slot, so it is never
/// interleaved with another CPU's output.
pub fn line<F>(fields: F)
where
    F: for<'r, 'w> FnOnce(&mut Object<'w, Reservation<'r, RING_SLOT_BYTES>>) -> fmt::Result,
{
    if !ONLY_CAPTURE.load(Ordering::Relaxed) {
        capture_line(fields);
    }
}

/// Prints one report line even in a capture image.
pub fn capture_line<F>(fields: F)
where
    F: for<'r, 'w> FnOnce(&mut Object<'w, Reservation<'r, RING_SLOT_BYTES>>) -> fmt::Result,
{
    if let Some(mut reservation) = LOG_RING.reserve() {
        let _ = json::report_line(&mut reservation, fields);
        reservation.publish();
    }
    super::drain();
}
