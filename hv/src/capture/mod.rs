//! Crash capture: loading the capture kernel at boot ([`load`]), and the
//! hv image's own capture mode, which streams the crashed hypervisor's
//! dump to a sink ([`mode`]).

pub mod load;
pub mod mode;
pub mod share;
pub mod wake;
pub mod words;
