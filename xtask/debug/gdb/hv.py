"""gdb commands for hv crash dumps.

    gdb target/x86_64-unknown-none/release/hv build/<run>/vmcore \\
        -ex 'source xtask/debug/gdb/hv.py'
    (gdb) hv cpus       every CPU: APIC ID, bring-up and crash state, VMX,
                        its gdb thread and where it stopped
    (gdb) hv vmcs       every CPU's list of loaded VMCSes (crash::loaded_vmcs)
    (gdb) hv vcpus      every vCPU: its VMCS, on which CPU's list, exits,
                        which CPU's crash-time VMCLEAR cleared it
    (gdb) hv ledger     the crash note: reason, coordinator, stragglers and
                        each CPU's VMCLEAR ledger
    (gdb) hv bt         every CPU's backtrace, crashing CPU first

The statics are found by the last component of their Rust path (the table
`STATICS` in `../hvcore.py`), so hv's module layout may change under them.
"""

import os
import re
import sys

import gdb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hvcore  # noqa: E402

_paths = {}


def static(key):
    """The value of the hv static `hvcore.STATICS[key]`, found by the last
    component of its path (`info variables`, read in C mode, where gdb 13
    prints full Rust paths)."""
    last = hvcore.STATICS[key]
    if last not in _paths:
        language = gdb.parameter("language")
        gdb.execute("set language c", to_string=True)
        try:
            text = gdb.execute(f"info variables -q -n ::{last}$", to_string=True)
        finally:
            gdb.execute(f"set language {language}", to_string=True)
        names = re.findall(r"([^\s\[]+)(?:\[\d+\])*;\s*$", text, re.M)
        _paths[last] = hvcore.with_suffix(names, last)
    return _eval(_paths[last])


def _eval(expression):
    language = gdb.parameter("language")
    gdb.execute("set language rust", to_string=True)
    try:
        return gdb.parse_and_eval(expression)
    finally:
        gdb.execute(f"set language {language}", to_string=True)


def scalar(value):
    """The integer inside an atomic or a newtype: single-field structs are
    peeled down to their one scalar."""
    while value.type.strip_typedefs().code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION):
        fields = [f for f in value.type.strip_typedefs().fields() if not f.artificial]
        if len(fields) != 1:
            raise gdb.GdbError(f"{value.type} is not a single-field wrapper")
        value = value[fields[0].name]
    return int(value)


def cpu_count():
    return scalar(static("cpu_count"))


def field(value, name):
    return value[name]


def slice_items(value):
    """The elements of the `&[T]` inside `value` (a spin::Once, a
    MaybeUninit...): searched field by field for `data_ptr` and `length`,
    so std's wrappers may change."""
    kind = value.type.strip_typedefs()
    names = [f.name for f in kind.fields()] if kind.code in (
        gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION) else []
    if "data_ptr" in names and "length" in names:
        pointer, length = value["data_ptr"], int(value["length"])
        return [pointer[i] for i in range(length)]
    for name in names:
        if name in ("uninit", "phantom") or name is None:
            continue
        found = slice_items(value[name])
        if found is not None:
            return found
    return None


def vcpus():
    once = static("vcpus")
    status = scalar(once["status"])
    items = slice_items(once["data"])
    # spin::Once's status: 2 is Complete.
    if status != 2 or items is None:
        return []
    return items


def loaded_lists():
    """{cpu: (entries, problem, current)} for every CPU brought up."""
    arena = static("lists")
    entries = arena["entries"]
    limit = entries.type.strip_typedefs().range()[1] + 1

    def entry_at(index):
        entry = entries[index]
        return (scalar(entry["next"]), scalar(entry["vmcs_phys"]), scalar(entry["launched"]) != 0)

    lists = {}
    for cpu in range(cpu_count()):
        head = scalar(arena["heads"][cpu])
        walked, problem = hvcore.walk_list(head, entry_at, limit)
        current = scalar(arena["current"][cpu])
        lists[cpu] = (walked, problem, current)
    return lists


def threads_by_cpu():
    """{cpu index: gdb thread}: pr_pid is the CPU index plus one."""
    return {thread.ptid[1] - 1: thread for thread in gdb.selected_inferior().threads()}


def where(thread):
    """The innermost function of a thread's stack."""
    selected = gdb.selected_thread()
    try:
        thread.switch()
        frame = gdb.newest_frame()
        return frame.name() or f"{frame.pc():#x}"
    except gdb.error as error:
        return f"({error})"
    finally:
        if selected is not None:
            selected.switch()


def core_file():
    text = gdb.execute("info target", to_string=True)
    match = re.search(r"Local core dump file:\s*`([^']+)'", text)
    if not match:
        raise gdb.GdbError("no core file: open a dump (gdb hv vmcore)")
    return match.group(1)


class HvPrefix(gdb.Command):
    """hv's dump commands: hv cpus, hv vmcs, hv vcpus, hv ledger, hv bt."""

    def __init__(self):
        super().__init__("hv", gdb.COMMAND_DATA, prefix=True)

    def invoke(self, argument, from_tty):
        gdb.execute("help hv")


class HvCpus(gdb.Command):
    """Every CPU brought up: APIC ID, bring-up state, VMX, NMIs, its crash
    status (crash::shootdown), its gdb thread and where it stopped."""

    def __init__(self):
        super().__init__("hv cpus", gdb.COMMAND_DATA)

    def invoke(self, argument, from_tty):
        shared = static("shared")
        virt = static("virt_cpus")
        slots = static("coordinator")["slots"]
        coordinator = hvcore.plus_one(scalar(static("coordinator")["coordinator"]))
        threads = threads_by_cpu()
        count = cpu_count()
        print(f"{count} CPUs; coordinator CPU {'none' if coordinator is None else coordinator}")
        for cpu in range(count):
            this = shared[cpu]
            state = hvcore.CPU_STATES.get(scalar(this["slot"]["state"]), "?")
            status = hvcore.names_of(scalar(slots[cpu]["status"]), hvcore.CRASH_STATUS_BITS)
            thread = threads.get(cpu)
            print(
                f"  CPU {cpu:>3}  APIC {hvcore.plus_one(scalar(this['slot']['apic_id'])):>3}  {state:<8}"
                f"  vmx {'on ' if scalar(virt[cpu]['enabled']) else 'off'}"
                f"  exits {scalar(virt[cpu]['vm_exits']):>7}  nmis {scalar(this['nmis']):>3}"
                f"  crash {','.join(status) or '-'}"
                + (f"  thread {thread.num} in {where(thread)}" if thread else "  no thread")
            )


class HvVmcs(gdb.Command):
    """Every CPU's list of loaded VMCSes (the crash crate's VmcsArena, the
    static LISTS), front to back: physical address, [#arena entry], and
    whether it was launched or is the CPU's current VMCS."""

    def __init__(self):
        super().__init__("hv vmcs", gdb.COMMAND_DATA)

    def invoke(self, argument, from_tty):
        lists = loaded_lists()
        total = sum(len(entries) for entries, _, _ in lists.values())
        print(f"loaded VMCSes: {total} on {len(lists)} CPUs")
        for cpu, (entries, problem, current) in lists.items():
            print(hvcore.format_list(cpu, entries, problem, current))


def vmcs_records():
    """{VMCS physical address: (loaded_on, cleared_by)} from each VMCS's own
    record (hv's crash::records), kept apart from the lists."""
    records = static("records")
    count = records.type.strip_typedefs().range()[1] + 1
    found = {}
    for index in range(count):
        record = records[index]
        vmcs = scalar(record["vmcs"])
        if vmcs:
            found[vmcs] = (
                hvcore.plus_one(scalar(record["loaded_on"])),
                hvcore.plus_one(scalar(record["cleared_by"])),
            )
    return found


class HvVcpus(gdb.Command):
    """Every vCPU: its VMCS, the CPU its record says it is loaded on and
    whether that CPU's list holds it, VM exits, stopped, and which CPU's
    crash-time VMCLEAR cleared it."""

    def __init__(self):
        super().__init__("hv vcpus", gdb.COMMAND_DATA)

    def invoke(self, argument, from_tty):
        items = vcpus()
        if not items:
            print("no vCPUs (no guest run: no VMX, or the crash came first)")
            return
        on_list = {
            phys: cpu
            for cpu, (entries, _, _) in loaded_lists().items()
            for _, phys, _ in entries
        }
        records = vmcs_records()
        print(f"{len(items)} vCPUs")
        for index, vcpu in enumerate(items):
            shared = vcpu["shared"]
            phys = scalar(shared["context"]["page"])
            loaded, cleared_by = records.get(phys, (hvcore.NO_CPU, hvcore.NO_CPU))
            where_loaded = "-" if loaded is None else f"CPU {loaded}"
            listed = on_list.get(phys)
            listed = "on no list" if listed is None else f"on CPU {listed}'s list"
            print(
                f"  vCPU {index:>3}  VMCS {phys:#x}  loaded {where_loaded:<7}  {listed:<16}"
                f"  exits {scalar(shared['exits']):>6}"
                + ("  stopped" if scalar(shared["stopped"]) else "")
                + (f"  cleared by CPU {cleared_by}" if cleared_by is not None else "")
            )


class HvLedger(gdb.Command):
    """The dump's crash note (HVCRASH): reason, coordinator, stragglers and
    every CPU's VMCLEAR ledger, read from the core file itself."""

    def __init__(self):
        super().__init__("hv ledger", gdb.COMMAND_DATA)

    def invoke(self, argument, from_tty):
        print("\n".join(hvcore.format_ledger(hvcore.crash_note(core_file()))))


class HvBt(gdb.Command):
    """Every CPU's backtrace, the crashing CPU (gdb's first thread) first."""

    def __init__(self):
        super().__init__("hv bt", gdb.COMMAND_DATA)

    def invoke(self, argument, from_tty):
        selected = gdb.selected_thread()
        for thread in sorted(gdb.selected_inferior().threads(), key=lambda t: t.num):
            thread.switch()
            print(f"CPU {thread.ptid[1] - 1} (thread {thread.num}):")
            gdb.execute("bt", to_string=False)
        if selected is not None:
            selected.switch()


HvPrefix()
HvCpus()
HvVmcs()
HvVcpus()
HvLedger()
HvBt()
