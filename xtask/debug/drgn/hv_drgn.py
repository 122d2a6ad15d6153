"""drgn helpers for hv crash dumps.

As a script (the dump must come from an hv with the image notes; drgn
attaches `-s hv` by its build ID):

    drgn -c build/<run>/vmcore -s target/x86_64-unknown-none/release/hv \\
        xtask/debug/drgn/hv_drgn.py [cpus|vmcs|vcpus|ledger|bt|all]

or in drgn's shell:

    >>> import sys; sys.path.insert(0, "xtask/debug/drgn"); import hv_drgn
    >>> hv_drgn.vmcs(prog)

- `cpus`: every CPU: its thread, APIC ID and ledger flags (crash note),
  crash status (crash::shootdown), where it stopped;
- `vmcs`: every CPU's list of loaded VMCSes (crash::loaded_vmcs);
- `vcpus`: the VMCS arena's allocated entries (one per vCPU), the CPU each
  is loaded on, launched;
- `ledger`: the crash note: reason, coordinator, stragglers, VMCLEARs;
- `bt`: every CPU's stack, symbol names demangled, crashing CPU first.

drgn 0.3.0 reads Rust's DWARF as C: statics whose types hold a zero-sized
`()` (MaybeUninit, hv's per-CPU `SHARED`, `VCPUS`) do not read ("unsupported
integer bit size (0)"), so these helpers use only `LISTS`, `COORDINATOR`,
`CPU_COUNT`, the threads and the crash note; gdb's `hv` commands
(`xtask/debug/gdb/hv.py`) read the rest. Statics are found by the last
component of their Rust path (`STATICS` in `../hvcore.py`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hvcore  # noqa: E402

_paths = {}


def static(prog, key):
    """The hv static `hvcore.STATICS[key]`, found among the ELF symbols by
    the last component of its demangled path."""
    last = hvcore.STATICS[key]
    if last not in _paths:
        names = (hvcore.demangle(symbol.name) for symbol in prog.symbols())
        _paths[last] = hvcore.with_suffix(names, last)
    return prog[_paths[last]]


def scalar(obj):
    """The integer inside an atomic or a newtype."""
    while obj.type_.kind.name in ("STRUCT", "UNION"):
        members = obj.type_.members
        if len(members) != 1:
            raise TypeError(f"{obj.type_} is not a single-field wrapper")
        obj = obj.member_(members[0].name)
    return obj.value_()


def cpu_count(prog):
    return scalar(static(prog, "cpu_count"))


def loaded_lists(prog):
    """{cpu: (entries, problem, current)} for every CPU brought up."""
    arena = static(prog, "lists")
    entries = arena.entries
    limit = len(entries)

    def entry_at(index):
        entry = entries[index]
        return scalar(entry.next), scalar(entry.vmcs_phys), scalar(entry.launched) != 0

    lists = {}
    for cpu in range(cpu_count(prog)):
        head = scalar(arena.heads[cpu])
        walked, problem = hvcore.walk_list(head, entry_at, limit)
        lists[cpu] = (walked, problem, scalar(arena.current[cpu]))
    return lists


def _threads(prog):
    """{cpu index: thread}: pr_pid is the CPU index plus one."""
    return {thread.tid - 1: thread for thread in prog.threads()}


def _crash_note(prog):
    path = prog.core_dump_path
    return hvcore.crash_note(path) if path else None


def _where(thread):
    try:
        frame = thread.stack_trace()[0]
    except Exception as error:  # a thread drgn cannot unwind
        return f"({error})"
    return hvcore.demangle(frame.name) if frame.name else hex(frame.pc)


def cpus(prog, out=print):
    note = _crash_note(prog)
    ledger = {c["cpu_index"]: c for c in (note["cpus"] if note else [])}
    slots = static(prog, "coordinator").slots
    threads = _threads(prog)
    crashed = prog.crashed_thread().tid - 1
    count = cpu_count(prog)
    out(f"{count} CPUs; crashed thread: CPU {crashed}")
    for cpu in range(count):
        record = ledger.get(cpu)
        apic = record["apic_id"] if record else "?"
        flags = ",".join(hvcore.names_of(record["flags"], hvcore.LEDGER_FLAGS)) if record else "-"
        status = hvcore.names_of(scalar(slots[cpu].status), hvcore.CRASH_STATUS_BITS)
        thread = threads.get(cpu)
        out(
            f"  CPU {cpu:>3}  APIC {apic:>3}  {flags:<32}  crash {','.join(status) or '-'}"
            + (f"  thread {thread.tid} in {_where(thread)}" if thread else "  no thread")
        )


def vmcs(prog, out=print):
    lists = loaded_lists(prog)
    total = sum(len(entries) for entries, _, _ in lists.values())
    out(f"loaded VMCSes: {total} on {len(lists)} CPUs")
    for cpu, (entries, problem, current) in lists.items():
        out(hvcore.format_list(cpu, entries, problem, current))


def vcpus(prog, out=print):
    arena = static(prog, "lists")
    rows = []
    for index, entry in enumerate(arena.entries):
        if scalar(entry.state) != hvcore.ENTRY_ALLOCATED:
            continue
        cpu = scalar(entry.cpu)
        rows.append(
            f"  entry {index:>4}  VMCS {scalar(entry.vmcs_phys):#x}  "
            f"loaded {'-' if cpu == hvcore.NONE_INDEX else f'on CPU {cpu}':<10}"
            + ("  launched" if scalar(entry.launched) else "")
        )
    out(f"{len(rows)} VMCS entries allocated (one per vCPU)")
    for row in rows:
        out(row)


def ledger(prog, out=print):
    for line in hvcore.format_ledger(_crash_note(prog)):
        out(line)


def bt(prog, out=print):
    crashed = prog.crashed_thread()
    threads = [crashed] + sorted(
        (t for t in prog.threads() if t.tid != crashed.tid), key=lambda t: t.tid
    )
    for thread in threads:
        out(f"CPU {thread.tid - 1} (thread {thread.tid}):")
        try:
            trace = thread.stack_trace()
        except Exception as error:
            out(f"  ({error})")
            continue
        for number, frame in enumerate(trace):
            name = hvcore.demangle(frame.name) if frame.name else "??"
            try:
                file, line, _ = frame.source()
                where = f" at {file}:{line}"
            except LookupError:
                where = ""
            out(f"  #{number:<2} {frame.pc:#018x} in {name}{where}")


COMMANDS = {"cpus": cpus, "vmcs": vmcs, "vcpus": vcpus, "ledger": ledger, "bt": bt}


def main(prog, argv):
    wanted = argv or ["all"]
    for name in wanted:
        if name == "all":
            for command in COMMANDS.values():
                command(prog)
                print()
        elif name in COMMANDS:
            COMMANDS[name](prog)
        else:
            sys.exit(f"hv_drgn: unknown command {name!r}; one of {', '.join(COMMANDS)}, all")


if __name__ == "__main__":
    main(prog, sys.argv[1:])  # noqa: F821 (drgn's script globals)
