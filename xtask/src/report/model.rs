//! The run report, typed: the sections hv prints, as the judge reads them,
//! and the `xtask` object xtask writes.
//!
//! hv's sections pass into the run report as hv printed them (the merged
//! JSON is written out untouched, so a field hv adds reaches lab automation
//! without a change here, and no field can be lost or renamed on the way).
//! The judge reads them through the views below: [`Report::of`] takes the
//! merged JSON once, and code reads `report.crash.checked_in`, not strings.
//!
//! Every field is a [`Field`]: hv's report comes over a serial line and a
//! field may be missing, null or of another type than it should be. A view
//! never fails to read; the judge asks what it needs ([`Field::get`]) and,
//! for a message, shows what hv actually said ([`Field::raw`]). Adding a
//! field is one line: `pub name: Field<Type>,`.

use std::collections::BTreeMap;

use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// One value of hv's report: what it is when it has the type the judge
/// reads it as, kept as it came when it has another.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Field<T> {
    /// Not reported, or reported as `null`.
    #[default]
    Missing,
    /// Reported, of the type expected.
    Is(T),
    /// Reported, of another type: kept for the message that says so.
    Other(Value),
}

impl<T> Field<T> {
    /// The value, when it has the type expected.
    pub fn get(&self) -> Option<&T> {
        match self {
            Field::Is(value) => Some(value),
            _ => None,
        }
    }

    /// Whether nothing (or `null`) was reported.
    pub fn is_missing(&self) -> bool {
        matches!(self, Field::Missing)
    }
}

impl<T: Clone + Default> Field<T> {
    /// The section, or an empty one when it is missing or not an object:
    /// every field of it then reads as missing.
    pub fn or_empty(&self) -> T {
        self.get().cloned().unwrap_or_default()
    }
}

impl<T: Copy> Field<T> {
    /// The value, when it has the type expected.
    pub fn value(&self) -> Option<T> {
        self.get().copied()
    }
}

impl Field<String> {
    /// The text, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        self.get().map(String::as_str)
    }
}

impl<T: Serialize> Field<T> {
    /// What hv reported, as JSON (`null` when nothing).
    pub fn raw(&self) -> Value {
        match self {
            Field::Missing => Value::Null,
            Field::Is(value) => serde_json::to_value(value).unwrap_or(Value::Null),
            Field::Other(value) => value.clone(),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(deserializer)? {
            Value::Null => Field::Missing,
            value => match T::deserialize(&value) {
                Ok(typed) => Field::Is(typed),
                Err(_) => Field::Other(value),
            },
        })
    }
}

impl<T: Serialize> Serialize for Field<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Missing => serializer.serialize_none(),
            Field::Is(value) => value.serialize(serializer),
            Field::Other(value) => value.serialize(serializer),
        }
    }
}

/// Declares a section of hv's report: a struct of [`Field`]s that reads any
/// JSON (missing keys are [`Field::Missing`], unknown keys are left alone).
macro_rules! section {
    ($(#[$meta:meta])* $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
        #[serde(default)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: Field<$ty>,)*
        }
    };
}

section! {
    /// The run report as the judge reads it: hv's sections (`xtask/REPORT.md`)
    /// and the keys xtask added.
    Report {
        /// `{"done":true}`: the boot report is complete.
        done: bool,
        panic: Panic,
        exception: Exception,
        crash: Crash,
        crash_injection: CrashInjection,
        crashkernel: Crashkernel,
        cpus: Cpus,
        virt: Virt,
        smp: Smp,
        capture: Capture,
        /// The in-tree guest's stopped vCPUs, by vCPU number.
        guests_stopped: BTreeMap<String, Field<StoppedVcpu>>,
        /// Platform guests, by guest number (`refusedM` for refused ones).
        guests: BTreeMap<String, Guest>,
        loader: Loader,
        memory: Memory,
        cmdline: Cmdline,
        /// First INIT to the last AP online, in microseconds.
        bringup_us: u64,
        memory_per_cpu: MemoryPerCpu,
        emulator: String,
        boot: String,
        ok: bool,
        reason: String,
        serial_log: String,
        xtask: XtaskView,
    }
}

section! {
    /// `loader`: how hv was loaded.
    Loader {
        protocol: String,
        name: String,
    }
}

section! {
    /// `memory`: the boot memory map.
    Memory {
        regions: u64,
        usable_bytes: u64,
        highest_usable: u64,
    }
}

section! {
    /// `memory_per_cpu`: what each AP cost (issue 14).
    MemoryPerCpu {
        aps: u64,
        ap_bytes: u64,
        per_ap_bytes: u64,
        stack_bytes: u64,
        shared_half_bytes: u64,
        image_static_bytes: u64,
        max_cpus: u64,
    }
}

section! {
    /// `cmdline`: hv's command line and the words it refused.
    Cmdline {
        raw: String,
        errors: Vec<Value>,
    }
}

section! {
    /// `panic`: a Rust panic.
    Panic {
        message: String,
        cpu: u64,
    }
}

section! {
    /// `exception`: a fatal exception.
    Exception {
        vector: u64,
        name: String,
        error_code: u64,
        rip: u64,
        rsp: u64,
        cr2: u64,
        cpu: u64,
    }
}

section! {
    /// `crash_injection`: `fired: false` when the `crash=` point was never
    /// reached.
    CrashInjection {
        fired: bool,
    }
}

section! {
    /// `crashkernel`: the crash reservation.
    Crashkernel {
        base: u64,
        size: u64,
        error: String,
    }
}

section! {
    /// `cpus`: CPU discovery and bring-up.
    Cpus {
        possible: u64,
        online: u64,
        attempted: u64,
        failed: Vec<Value>,
        bsp_apic_id: u64,
        apic_ids: Vec<Value>,
        online_at_us: Vec<Value>,
    }
}

impl Cpus {
    /// `apic_ids` when every entry is a number.
    pub fn apic_ids(&self) -> Option<Vec<u64>> {
        numbers(&self.apic_ids)
    }
}

section! {
    /// `virt`: the backend and the guest run.
    Virt {
        backend: String,
        reason: String,
        stopped: u64,
        vcpus: u64,
        vm_exits: u64,
        migrations: u64,
        preemptions: u64,
        cpus_in_vmx: u64,
        cpus_in_svm: u64,
        platform_guests: u64,
        kicks: u64,
        guest_modules_not_run: u64,
        exits_per_cpu: Vec<Value>,
    }
}

section! {
    /// One of `guests_stopped`.
    StoppedVcpu {
        reason: String,
    }
}

section! {
    /// One platform guest of `guests`.
    Guest {
        name: String,
        state: String,
        reason: String,
        detail: String,
        verdict: String,
        exit_code: u64,
        ms: u64,
        exits: u64,
        vcpus: u64,
        summary: String,
        first_failure: String,
    }
}

section! {
    /// `smp`: how the CPUs were brought up and the TSC's rate.
    Smp {
        apic_mode: String,
        tsc_khz: u64,
        tsc_source: String,
        tsc_measured_by: String,
        tsc_confirmed_by: String,
        tsc_attempts: u64,
        tsc_rejected: u64,
        tsc_disagreements: u64,
    }
}

section! {
    /// `crash`: the crash path's summary.
    Crash {
        cpu: u64,
        cpu_index: u64,
        reason: String,
        backend: String,
        expected: u64,
        checked_in: u64,
        stragglers: Vec<Value>,
        timed_out: bool,
        shootdown_us: u64,
        vmcs_loaded: u64,
        vmcs_cleared: u64,
        vmcs_visited: u64,
        vmcs_on_stragglers: u64,
        vmcb_loaded: u64,
        vmcb_cleared: u64,
        vmcb_visited: u64,
        vmcb_on_stragglers: u64,
        vmxoff_cpus: u64,
        coordinator_vmx_off: bool,
        /// How the coordinator left VMX (`vmxoff`, `vmxoff_after_ud`,
        /// `was_off`).
        coordinator_vmx_exit: String,
        svm_off_cpus: u64,
        coordinator_svm_off: bool,
        nmi_latency_us: Vec<Value>,
        checkin_us: Vec<Value>,
        nmi_in_guest: Vec<Value>,
        nmi_in_guest_cpus: u64,
        vmxoff_executed: u64,
        vmx_was_on_cpus: u64,
        vmcs_cleared_elsewhere: u64,
        vmcs_lost: u64,
        vmcs_loaded_per_cpu: Vec<Value>,
        vmclear_credits: Vec<Value>,
        vmclear_repeats: Vec<Value>,
        lockup_cpus: Vec<Value>,
        coordinator_stray_nmis: u64,
        nested_nmis: u64,
        started_tsc: u64,
        started_us: u64,
        words: String,
    }
}

impl Crash {
    /// The `loaded`, `cleared` and `on_stragglers` counts of the contexts
    /// the lists held: VMCBs on SVM, VMCSes elsewhere.
    pub fn contexts(&self, svm: bool) -> [&Field<u64>; 3] {
        if svm {
            [
                &self.vmcb_loaded,
                &self.vmcb_cleared,
                &self.vmcb_on_stragglers,
            ]
        } else {
            [
                &self.vmcs_loaded,
                &self.vmcs_cleared,
                &self.vmcs_on_stragglers,
            ]
        }
    }
}

section! {
    /// `capture`: hv's capture lines merged with what xtask found.
    Capture {
        loaded: bool,
        kernel: String,
        error: String,
        digest_ok: bool,
        jumped: bool,
        entered: bool,
        hv_check: String,
        purgatory_refused: String,
        /// Why hv refused the jump.
        refused: String,
        attempt: u64,
        coordinator_stray_nmis: u64,
        /// NMIs hv's capture image took on its own IDT.
        stray_nmis: u64,
        purgatory: Purgatory,
        streamed: bool,
        streamed_bytes: u64,
        dump_bytes: u64,
        entered_tsc: u64,
        entered_us: u64,
        tsc_khz: u64,
        linux: LinuxCapture,
        // What xtask set (`judge::capture`).
        dump_path: String,
        dump_error: String,
        cpu_notes: u64,
        /// The CPU notes hv's capture mode read from the core header.
        header_cpu_notes: u64,
        crash_to_capture_us: u64,
        crash_to_capture_source: String,
        parallel_copy_identical: bool,
        // The capture's wake (issue 13), hv's capture mode.
        wake: bool,
        woken: Vec<Value>,
        woken_stragglers: Vec<Value>,
        silent: Vec<Value>,
        silent_stragglers: Vec<Value>,
        stragglers_left_alone: Vec<Value>,
        boot_cpu_left_alone: Vec<Value>,
        old_boot_cpu: String,
        low_memory_unchanged: bool,
        wake_error: String,
        stream_mb_per_s: f64,
        workers: Value,
        /// What xtask made of the wake (`capture::wake::check`).
        wake_check: WakeCheckView,
    }
}

section! {
    /// `capture.wake_check`, read back.
    WakeCheckView {
        checked_in: u64,
        expected: u64,
        woken: u64,
        silent: Vec<Value>,
    }
}

section! {
    /// `capture.linux`: what the Linux capture kernel's initramfs said.
    LinuxCapture {
        copied: bool,
        vmcore_bytes: u64,
        copy_ms: u64,
        cpus_online: u64,
        parallel_readers: u64,
        parallel_copy_ms: u64,
        makedumpfile: Makedumpfile,
    }
}

section! {
    /// `capture.linux.makedumpfile`: the streams' sizes as `dd` counted.
    Makedumpfile {
        elf_stream_bytes: u64,
        kdump_stream_bytes: u64,
    }
}

section! {
    /// `capture.purgatory`: the purgatory's stamps and the NMIs it took.
    Purgatory {
        nmis_64: u64,
        nmis_32: u64,
    }
}

section! {
    /// `xtask`, as the judge reads it back (a capture run's second
    /// judgement).
    XtaskView {
        cpus_requested: u64,
        elf: String,
        /// hv's command line as passed.
        cmdline: String,
        notes: Vec<Value>,
        malformed_lines: Vec<Value>,
        exit_status: i64,
        timed_out: bool,
        elapsed_secs: f64,
        stopped_by_xtask: String,
        capture_until_entry: bool,
        nmi_button: Value,
        expected: ExpectedView,
    }
}

section! {
    /// `xtask.expected`, read back.
    ExpectedView {
        virt_backend: String,
    }
}

impl XtaskView {
    /// Whether the run pressed the NMI button (`xtask.nmi_button` is an
    /// object).
    pub fn nmi_button(&self) -> bool {
        self.nmi_button.get().is_some_and(Value::is_object)
    }
}

impl Report {
    /// Reads the merged report JSON. Never fails: whatever does not fit is
    /// kept in the [`Field`] it belongs to.
    pub fn of(json: &Value) -> Self {
        if !json.is_object() {
            return Self::default();
        }
        Self::deserialize(json).unwrap_or_default()
    }
}

/// A list when every entry is a number.
pub fn numbers(list: &Field<Vec<Value>>) -> Option<Vec<u64>> {
    list.get()?.iter().map(Value::as_u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_read_what_fits_and_keep_what_does_not() {
        let report = Report::of(&json!({
            "done": true,
            "crash": {"cpu": 3, "reason": 7, "stragglers": [1, 2], "new_key": 1},
            "cpus": "garbled",
        }));
        assert_eq!(report.done.value(), Some(true));
        let crash = report.crash.or_empty();
        assert_eq!(crash.cpu.value(), Some(3));
        assert_eq!(crash.reason.as_str(), None);
        assert_eq!(crash.reason.raw(), json!(7));
        assert!(crash.expected.is_missing());
        assert_eq!(crash.expected.raw(), Value::Null);
        assert_eq!(numbers(&crash.stragglers), Some(vec![1, 2]));
        assert_eq!(report.cpus.raw(), json!("garbled"));
        assert!(report.cpus.get().is_none());
    }

    #[test]
    fn null_reads_as_missing() {
        let report = Report::of(&json!({"virt": {"reason": null}, "panic": null}));
        assert!(report.panic.is_missing());
        assert!(report.virt.get().unwrap().reason.is_missing());
    }

    #[test]
    fn a_report_that_is_not_an_object_reads_as_empty() {
        let report = Report::of(&json!([1, 2]));
        assert_eq!(report, Report::default());
    }
}
