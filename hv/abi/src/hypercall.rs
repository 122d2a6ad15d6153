//! The in-tree test guest's interface to the hypervisor: hypercall numbers
//! (VMCALL/VMMCALL with EAX selecting, EBX the argument; EAX returns 0, or
//! `u64::MAX` for an unknown call or a bad argument) and the start-up
//! values of EDI that select a misbehaviour.

/// EAX of the yield hypercall (EBX: the guest's iteration count).
pub const YIELD: u64 = 1;
/// EAX of the print hypercall (EBX: one byte).
pub const PRINT: u64 = 2;
/// EAX of the crash hypercall (honoured only when the command line allows).
pub const CRASH: u64 = 0xC0;
/// The return value of an unknown call or a bad argument.
pub const UNKNOWN: u64 = u64::MAX;

/// EDI at start: touch memory outside the guest's memory map.
pub const MISBEHAVE: u64 = 1;
/// EDI at start: make the crash hypercall after 256 iterations.
pub const CALL_CRASH: u64 = 2;
