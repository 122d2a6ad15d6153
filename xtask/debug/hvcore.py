"""What hv's gdb commands and drgn module share: the dump file's notes
(the HVCRASH crash note and its VMCLEAR ledger), the loaded-VMCS list walk,
and the names of Rust symbols.

Pure Python 3 (no gdb, no drgn): `python3 hvcore.py DUMP` prints the crash
note. The note's layout is version 1 of `hv/abi/src/crash_note.rs`;
the ELF core layout is `kexec-loader/src/elfcore.rs`.
"""

import re
import struct
import sys

# ---------------------------------------------------------------------------
# What the helpers read, by name. hv's modules move (its statics are found
# by the last components of their Rust path, e.g. any `...::LISTS`, as many
# as make the name unique: `percpu::SHARED`, not the guests' `SHARED`); the
# field names and constants below are the crates' and must follow them.
# ---------------------------------------------------------------------------

#: hv statics, by the last components of their Rust path.
STATICS = {
    # crash::loaded_vmcs::VmcsArena<ENTRIES, CPUS>: every CPU's list of
    # loaded VMCSes. Fields: entries[i].{state, next, prev, vmcs_phys, cpu,
    # launched}, heads[cpu], current[cpu].
    "lists": "LISTS",
    # AtomicUsize: CPUs brought up (dense indices 0..CPU_COUNT).
    "cpu_count": "CPU_COUNT",
    # [SharedCpu; MAX_CPUS] (hv cpu::percpu): per-CPU shared half. Fields:
    # slot.{apic_id, state}, nmis.
    "shared": "percpu::SHARED",
    # [VirtCpu; MAX_CPUS] (hv virt): per-CPU virtualization state. Fields:
    # enabled (VMX root operation), vm_exits.
    "virt_cpus": "CPUS",
    # [Record; MAX_VMCS] (hv crash::records): each VMCS's own record, kept
    # apart from the lists. Fields: vmcs, loaded_on, cleared_by.
    "records": "RECORDS",
    # crash::shootdown::CrashCoordinator<CPUS>: coordinator,
    # slots[cpu].{status, vmcs_visited, vmcs_cleared, vmcs_failed,
    # vmcs_stranded}.
    "coordinator": "COORDINATOR",
    # spin::Once<&[Vcpu]> (hv virt::sched): the vCPUs. Vcpu.shared.{
    # context.page (the VMCS), stopped, exits}.
    "vcpus": "VCPUS",
}

#: crash::loaded_vmcs: the "none" index and CPU, and the ALLOCATED state.
NONE_INDEX = 0xFFFF_FFFF
ENTRY_ALLOCATED = 2
#: hv crash::records (`loaded_on`, `cleared_by`), crash::shootdown's
#: `coordinator` and smp_boot's `CpuSlot::apic_id` hold the value plus one,
#: 0 meaning none: so that these statics start all zero.
NO_CPU = None


def plus_one(raw):
    """The value of a field stored plus one (0: None)."""
    return None if raw == 0 else (raw - 1) & 0xFFFF_FFFF
#: smp_boot::bringup::CpuState.
CPU_STATES = {0: "offline", 1: "starting", 2: "online", 3: "failed"}
#: crash::shootdown: the bits of a CrashSlot's `status`.
CRASH_STATUS_BITS = [
    (1 << 0, "entered"),
    (1 << 1, "handler-started"),
    (1 << 2, "regs-saved"),
    (1 << 3, "walked"),
    (1 << 4, "vmx-done"),
    (1 << 5, "apic-off"),
    (1 << 6, "checked-in"),
    (1 << 7, "gave-up"),
]

# hv-abi (hv/abi/src/crash_note.rs): the crash note and its ledger flags.
CRASH_NOTE_NAME = b"HVCRASH"
NT_HV_CRASH = struct.unpack("<I", b"HVCR")[0]
LEDGER_FLAGS = [
    (1 << 3, "coordinator"),
    (1 << 0, "checked-in"),
    (1 << 1, "vmx-was-on"),
    (1 << 2, "vmxoff"),
]
PT_NOTE = 4
NT_PRSTATUS = 1


class DumpError(Exception):
    """The dump file is not what the helpers expect."""


def read_notes(path):
    """Every note of an ELF core file: a list of (name, type, desc)."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            raise DumpError(f"{path}: not a little-endian ELF64 file")
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        notes = []
        for i in range(phnum):
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", table, i * phentsize
            )
            if p_type != PT_NOTE:
                continue
            f.seek(p_offset)
            notes.extend(_split_notes(f.read(p_filesz)))
        return notes


def _split_notes(data):
    at = 0
    while at + 12 <= len(data):
        namesz, descsz, n_type = struct.unpack_from("<III", data, at)
        if namesz == 0:
            break
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(data):
            raise DumpError(f"note at {at:#x} runs past its segment")
        name = data[name_at : name_at + namesz].rstrip(b"\0")
        yield name, n_type, data[desc_at : desc_at + descsz]
        at = end


def parse_crash_note(desc):
    """The HVCRASH note's descriptor as a dict (version 1)."""

    def u32(at):
        if at + 4 > len(desc):
            raise DumpError("crash note truncated")
        return struct.unpack_from("<I", desc, at)[0]

    version, header_len, coordinator, reason_len = (u32(i) for i in (0, 4, 8, 12))
    stragglers, cpus, vmclears = (u32(i) for i in (16, 20, 24))
    if version != 1:
        raise DumpError(f"crash note version {version}, these helpers read 1")
    pad8 = lambda n: (n + 7) // 8 * 8
    at = header_len
    reason = desc[at : at + reason_len].decode("utf-8", "replace")
    at += pad8(reason_len)
    straggler_ids = [u32(at + 4 * i) for i in range(stragglers)]
    at += pad8(4 * stragglers)
    ledger_at = at
    table_at = at + pad8(24 * cpus)
    if table_at + 16 * vmclears > len(desc):
        raise DumpError("crash note truncated")
    ledger = []
    for i in range(cpus):
        cpu_index, apic_id, flags, loaded, first, count = struct.unpack_from(
            "<6I", desc, ledger_at + 24 * i
        )
        clears = []
        for j in range(first, first + count):
            phys, outcome, error = struct.unpack_from("<QII", desc, table_at + 16 * j)
            clears.append((phys, outcome_name(outcome, error)))
        ledger.append(
            {
                "cpu_index": cpu_index,
                "apic_id": apic_id,
                "flags": flags,
                "vmcs_loaded": loaded,
                "vmclears": clears,
            }
        )
    return {
        "reason": reason,
        "coordinator": coordinator,
        "stragglers": straggler_ids,
        "cpus": ledger,
    }


def outcome_name(outcome, error):
    return {0: "ok", 1: "VMfailInvalid"}.get(outcome, f"VMfailValid({error})")


def crash_note(path):
    """The dump's crash note as a dict, or None when it has none."""
    for name, n_type, desc in read_notes(path):
        if name == CRASH_NOTE_NAME and n_type == NT_HV_CRASH:
            return parse_crash_note(desc)
    return None


def names_of(bits, table):
    return [name for bit, name in table if bits & bit]


def format_ledger(note):
    """The crash note as text: reason, coordinator, stragglers, then each
    CPU's VMCLEAR ledger."""
    if note is None:
        return ["crash        (no HVCRASH note in the dump)"]
    lines = [
        f"crash        {note['reason']}",
        f"coordinator  CPU {note['coordinator']}",
        "stragglers   "
        + (
            "APIC IDs " + ", ".join(str(s) for s in note["stragglers"])
            if note["stragglers"]
            else "none"
        ),
    ]
    loaded = sum(c["vmcs_loaded"] for c in note["cpus"])
    clears = [v for c in note["cpus"] for v in c["vmclears"]]
    ok = sum(1 for _, outcome in clears if outcome == "ok")
    lines.append(
        f"VMCLEAR ledger: {len(note['cpus'])} CPUs, {loaded} VMCS loaded at the crash, "
        f"{len(clears)} VMCLEARs, {ok} succeeded"
    )
    # As `cargo xtask dump` prints it: `cleared` counts the VMCLEARs that
    # succeeded, and every VMCLEAR follows with its outcome.
    for cpu in note["cpus"]:
        done = ", ".join(f"{phys:#x} {outcome}" for phys, outcome in cpu["vmclears"])
        succeeded = sum(1 for _, outcome in cpu["vmclears"] if outcome == "ok")
        lines.append(
            f"  CPU {cpu['cpu_index']:>3} (APIC {cpu['apic_id']:>3}) "
            f"{','.join(names_of(cpu['flags'], LEDGER_FLAGS)):<30} "
            f"loaded {cpu['vmcs_loaded']:>2}, cleared {succeeded:>2}"
            + (f": {done}" if done else "")
        )
    return lines


def walk_list(head, entry_at, limit):
    """A CPU's loaded-VMCS list, front to back, as crash::loaded_vmcs walks
    it: `head` is the first index, `entry_at(i)` gives (next, vmcs_phys,
    launched) of entry i. Returns (entries, problem): entries as
    (index, vmcs_phys, launched); problem None, or why the walk stopped
    early (a bad index or a cycle: corruption)."""
    entries = []
    index = head
    while index != NONE_INDEX:
        if index >= limit:
            return entries, f"bad index {index}"
        if len(entries) == limit:
            return entries, "cycle (step limit)"
        next_index, phys, launched = entry_at(index)
        entries.append((index, phys, launched))
        index = next_index
    return entries, None


def format_list(cpu, entries, problem, current):
    """One CPU's list as a line."""
    parts = []
    for index, phys, launched in entries:
        marks = []
        if launched:
            marks.append("launched")
        if index == current:
            marks.append("current")
        parts.append(f"{phys:#x} [#{index}{''.join(' ' + m for m in marks)}]")
    text = f"  CPU {cpu:>3}: {len(entries)} loaded"
    if parts:
        text += ": " + ", ".join(parts)
    if problem:
        text += f"  !! walk stopped: {problem}"
    return text


_LEGACY = re.compile(r"^_ZN(.*)E$")
_ESCAPES = {
    "$LT$": "<", "$GT$": ">", "$RF$": "&", "$BP$": "*", "$C$": ",",
    "$u20$": " ", "$u27$": "'", "$u5b$": "[", "$u5d$": "]", "$u7b$": "{",
    "$u7d$": "}", "$u7e$": "~", "$LP$": "(", "$RP$": ")", "$SP$": "@",
}


def _demangle_v0(name):
    """Plain paths of Rust's v0 mangling (`_R`: crate roots and nested
    names, as std's `core::panicking::panic_fmt`); None for anything else
    (generics, impls, back references)."""
    text = name.split(".")[0]
    at = 2

    def ident():
        nonlocal at
        if text.startswith("s", at):  # disambiguator: s <base-62> _
            end = text.find("_", at)
            if end < 0:
                raise ValueError
            at = end + 1
        digits = re.match(r"\d+", text[at:])
        if not digits:
            raise ValueError
        length = int(digits.group())
        at += len(digits.group())
        if text.startswith("_", at):
            at += 1
        word = text[at : at + length]
        at += length
        return word

    def path():
        nonlocal at
        tag = text[at : at + 1]
        at += 1
        if tag == "C":
            return ident()
        if tag == "N":
            at += 1  # namespace
            parent = path()
            return f"{parent}::{ident()}"
        raise ValueError

    try:
        result = path()
    except (ValueError, IndexError):
        return None
    return result if at == len(text) else None


def demangle(name):
    """A Rust symbol's path (legacy mangling, rustc's stable default, and
    plain v0 paths), without the hash; other names come back as they are."""
    if name.startswith("_R"):
        return _demangle_v0(name) or name
    base = name.split(".llvm.")[0]
    match = _LEGACY.match(re.sub(r"(E)(\.\d+)+$", r"\1", base))
    if not match:
        return name
    body, parts, at = match.group(1), [], 0
    while at < len(body):
        digits = re.match(r"\d+", body[at:])
        if not digits:
            return name
        length = int(digits.group())
        at += len(digits.group())
        part = body[at : at + length]
        # An identifier that would start with `$` gets a leading `_`.
        parts.append(part[1:] if part.startswith("_$") else part)
        at += length
    if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
        parts.pop()
    text = "::".join(parts)
    for escape, char in _ESCAPES.items():
        text = text.replace(escape, char)
    return text.replace("..", "::")


def with_suffix(names, last):
    """The one path among `names` whose last component is `last`."""
    found = sorted({n for n in names if n == last or n.endswith("::" + last)})
    if not found:
        raise LookupError(f"no static named ...::{last} (is this hv's ELF?)")
    if len(found) > 1:
        raise LookupError(f"several statics named ...::{last}: {', '.join(found)}")
    return found[0]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: hvcore.py DUMP")
    print("\n".join(format_ledger(crash_note(sys.argv[1]))))
