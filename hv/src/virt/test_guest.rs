//! The in-tree test guest (assembled in `arch::blobs`): 32-bit protected
//! mode, paging off, loaded at guest-physical 0x1000. It greets through
//! the debug port, then loops: some work in guest mode (a busy loop, so
//! that the guest is mostly in guest mode, as real ones are), CPUID, a
//! yield hypercall (VMMCALL on AMD, VMCALL elsewhere, chosen from the
//! CPUID vendor) carrying its iteration count, and every 64 iterations a
//! HLT. Its start-up EDI
//! selects a misbehaviour (`hv_abi::hypercall`): reading guest-physical
//! 1 GiB, outside its memory, which must stop it and nothing else; or the
//! crash hypercall.

/// Guest-physical address the image is loaded at.
pub const LOAD_ADDRESS: u64 = 0x1000;
/// Initial guest stack pointer.
pub const STACK_TOP: u64 = 0x8000;
/// Guest-physical memory of each test guest.
pub const MEMORY_BYTES: u64 = 2 * 1024 * 1024;

/// The guest's code bytes.
pub fn bytes() -> &'static [u8] {
    crate::arch::blobs::test_guest_code()
}
