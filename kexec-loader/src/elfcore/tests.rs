use super::*;
use crate::crash_note::{CpuLedger, VmclearOutcome, VmclearRecord, cpu_flags};

pub(crate) const HEADER_PHYS: u64 = 0x4040_0000;

pub(crate) fn regs(seed: u64) -> CpuRegisters {
    let mut array = [0u64; PR_REG_COUNT];
    for (i, reg) in array.iter_mut().enumerate() {
        *reg = seed << 32 | i as u64;
    }
    let mut regs = CpuRegisters::from_array(array);
    regs.cs = 0x08;
    regs.ss = 0x10;
    regs.eflags = 0x46;
    regs
}

pub(crate) fn cpus() -> Vec<CpuState> {
    // The crashing CPU first: gdb's current thread.
    vec![
        CpuState {
            cpu_index: 2,
            regs: regs(2),
        },
        CpuState {
            cpu_index: 0,
            regs: regs(0),
        },
        CpuState {
            cpu_index: 1,
            regs: regs(1),
        },
    ]
}

pub(crate) fn segments() -> Vec<MemorySegment> {
    vec![
        MemorySegment {
            phys: 0x10_0000,
            virt: 0xffff_8000_0010_0000,
            len: 0x2000,
        },
        MemorySegment {
            phys: 0x20_0000,
            virt: 0x20_0000,
            len: 0x1234,
        },
    ]
}

const CLEARS: [VmclearRecord; 1] = [VmclearRecord {
    vmcs_phys: 0x7f00_1000,
    outcome: VmclearOutcome::Succeeded,
}];

pub(crate) fn with_crash_record<R>(f: impl FnOnce(&CrashRecord<'_>) -> R) -> R {
    let ledger = [
        CpuLedger {
            cpu_index: 0,
            apic_id: 0,
            flags: cpu_flags::CHECKED_IN,
            vmcs_loaded: 1,
            vmclears: &CLEARS,
        },
        CpuLedger {
            cpu_index: 2,
            apic_id: 4,
            flags: cpu_flags::CHECKED_IN | cpu_flags::COORDINATOR,
            vmcs_loaded: 0,
            vmclears: &[],
        },
    ];
    let record = CrashRecord {
        reason: "panicked at hv/src/crash.rs:10:5: test crash",
        coordinator: 2,
        stragglers: &[2],
        cpus: &ledger,
    };
    f(&record)
}

pub(crate) fn write(placement: Placement) -> (Vec<u8>, CoreHeaderLayout) {
    with_crash_record(|record| {
        let len = core_header_len(3, 2, record.desc_len().unwrap(), None).unwrap();
        let mut out = vec![0xEEu8; len];
        let layout =
            write_core_header(&mut out, &cpus(), record, &segments(), None, placement).unwrap();
        assert_eq!(layout.len, len);
        (out, layout)
    })
}

/// A complete dump file: the file header, then each segment's bytes.
pub(crate) fn dump_file() -> Vec<u8> {
    let (mut file, layout) = write(Placement::File);
    file.resize(layout.data_offset as usize, 0);
    for segment in segments() {
        file.extend((0..segment.len).map(|i| ((segment.phys >> 16) + i) as u8));
    }
    file
}

mod with_an_independent_reader {
    use super::*;
    use object::LittleEndian;
    use object::elf::FileHeader64;
    use object::read::elf::{FileHeader as _, ProgramHeader as _};

    #[test]
    fn the_file_header_is_a_valid_x86_64_core_file() {
        let file = dump_file();
        let header = FileHeader64::<LittleEndian>::parse(&*file).unwrap();
        let endian = header.endian().unwrap();
        assert_eq!(header.e_type(endian), object::elf::ET_CORE);
        assert_eq!(header.e_machine(endian), object::elf::EM_X86_64);
        assert!(header.is_class_64());
        let phdrs = header.program_headers(endian, &*file).unwrap();
        assert_eq!(phdrs.len(), 3);
        assert_eq!(phdrs[0].p_type(endian), object::elf::PT_NOTE);

        let mut notes = phdrs[0].notes(endian, &*file).unwrap().unwrap();
        let mut names = Vec::new();
        while let Some(note) = notes.next().unwrap() {
            names.push((note.name().to_vec(), note.n_type(endian), note.desc().len()));
        }
        let core = (b"CORE".to_vec(), object::elf::NT_PRSTATUS, 336);
        assert_eq!(names[..3], [core.clone(), core.clone(), core]);
        assert_eq!(names[3].0, b"HVCRASH");
        assert_eq!(names[3].1, NT_HV_CRASH);
        assert_eq!(names.len(), 4, "the terminator is outside p_filesz");

        for (phdr, segment) in phdrs[1..].iter().zip(segments()) {
            assert_eq!(phdr.p_type(endian), object::elf::PT_LOAD);
            assert_eq!(phdr.p_paddr(endian), segment.phys);
            assert_eq!(phdr.p_vaddr(endian), segment.virt);
            assert_eq!(phdr.p_filesz(endian), segment.len);
            assert_eq!(phdr.p_memsz(endian), segment.len);
            let data = phdr.data(endian, &*file).unwrap();
            assert_eq!(data[0], (segment.phys >> 16) as u8);
        }
    }

    #[test]
    fn the_old_memory_header_points_at_physical_addresses() {
        let (bytes, layout) = write(Placement::OldMemory {
            header_phys: HEADER_PHYS,
        });
        let header = FileHeader64::<LittleEndian>::parse(&*bytes).unwrap();
        let endian = header.endian().unwrap();
        let phdrs = header.program_headers(endian, &*bytes).unwrap();
        let note = &phdrs[0];
        assert_eq!(
            note.p_offset(endian),
            HEADER_PHYS + layout.notes.start as u64
        );
        // Linux walks p_memsz bytes and stops at the empty note.
        assert_eq!(note.p_memsz(endian), (layout.notes.len() + NHDR_LEN) as u64);
        let terminator = &bytes[layout.notes.end..layout.notes.end + NHDR_LEN];
        assert_eq!(terminator, [0; NHDR_LEN]);
        for (phdr, segment) in phdrs[1..].iter().zip(segments()) {
            assert_eq!(phdr.p_offset(endian), segment.phys);
            assert_eq!(phdr.p_paddr(endian), segment.phys);
            assert_eq!(phdr.p_vaddr(endian), segment.virt);
        }
    }
}

#[test]
fn linux_proc_vmcore_sanity_checks_pass() {
    let (bytes, _) = write(Placement::OldMemory {
        header_phys: HEADER_PHYS,
    });
    // parse_crash_elf64_headers, field by field.
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(u16_at(&bytes, 16), Some(4), "ET_CORE");
    assert_eq!(u16_at(&bytes, 18), Some(62), "EM_X86_64");
    assert_eq!(bytes[4], 2, "ELFCLASS64");
    assert_eq!(bytes[5], 1, "ELFDATA2LSB");
    assert_eq!(bytes[6], 1, "EI_VERSION == EV_CURRENT");
    assert_eq!(bytes[7], 3, "EI_OSABI: GNU/Linux, for lldb");
    assert_eq!(u32_at(&bytes, 20), Some(1), "e_version == EV_CURRENT");
    assert_eq!(u16_at(&bytes, 52), Some(64), "e_ehsize");
    assert_eq!(u16_at(&bytes, 54), Some(56), "e_phentsize");
    assert_eq!(u16_at(&bytes, 56), Some(3), "e_phnum");
    assert_eq!(u64_at(&bytes, 32), Some(64), "program headers right after");
    // Notes: 4-byte aligned names and descriptors.
    let dump = CoreDump::parse_elfcorehdr(&bytes, HEADER_PHYS).unwrap();
    let mut at = dump.notes_offset();
    assert_eq!(at % 4, 0);
    for note in dump.notes() {
        assert_eq!(u32_at(&bytes, at), Some(note.name.len() as u32 + 1));
        at += NHDR_LEN
            + (note.name.len() + 1).next_multiple_of(4)
            + note.desc.len().next_multiple_of(4);
        assert_eq!(at % 4, 0);
    }
}

#[test]
fn prstatus_holds_pid_and_registers_where_gdb_reads_them() {
    let (bytes, layout) = write(Placement::File);
    let first = layout.notes.start;
    assert_eq!(u32_at(&bytes, first), Some(5), "namesz of CORE\\0");
    assert_eq!(u32_at(&bytes, first + 4), Some(336));
    assert_eq!(u32_at(&bytes, first + 8), Some(NT_PRSTATUS));
    assert_eq!(&bytes[first + 12..first + 20], b"CORE\0\0\0\0");
    let desc = first + 20;
    assert_eq!(
        u32_at(&bytes, desc + 32),
        Some(3),
        "pr_pid = CPU index 2 + 1"
    );
    let rip_index = 16;
    assert_eq!(
        u64_at(&bytes, desc + 112 + rip_index * 8),
        Some(regs(2).rip)
    );
    assert_eq!(u64_at(&bytes, desc + 112), Some(regs(2).r15));
    assert_eq!(u64_at(&bytes, desc + 112 + 26 * 8), Some(regs(2).gs));
    assert_eq!(u32_at(&bytes, desc + 328), Some(0), "pr_fpvalid");
}

#[test]
fn registers_keep_user_regs_struct_order() {
    let regs = CpuRegisters {
        r15: 1,
        rbp: 5,
        rax: 11,
        rip: 17,
        rsp: 20,
        gs: 27,
        ..CpuRegisters::default()
    };
    let array = regs.to_array();
    assert_eq!(array[0], 1);
    assert_eq!(array[4], 5);
    assert_eq!(array[10], 11);
    assert_eq!(array[16], 17);
    assert_eq!(array[19], 20);
    assert_eq!(array[26], 27);
    assert_eq!(CpuRegisters::from_array(array), regs);
}

#[test]
fn a_file_round_trips_through_our_reader() {
    let file = dump_file();
    let dump = CoreDump::parse(&file).unwrap();
    let read: Vec<_> = dump.cpus().collect();
    assert_eq!(read.len(), 3);
    for (status, cpu) in read.iter().zip(cpus()) {
        assert_eq!(status.cpu_index(), Some(cpu.cpu_index));
        assert_eq!(status.pid as u32, cpu.cpu_index + 1);
        assert_eq!(status.regs, cpu.regs);
    }
    let crash = dump.crash_note().unwrap();
    assert_eq!(
        crash.reason(),
        "panicked at hv/src/crash.rs:10:5: test crash"
    );
    assert_eq!(crash.coordinator(), 2);
    assert_eq!(crash.stragglers().collect::<Vec<_>>(), [2]);
    assert_eq!(crash.cpus().map(|c| c.vmclear_count()).sum::<usize>(), 1);
    let loads: Vec<_> = dump.load_segments().collect();
    assert_eq!(loads.len(), 2);
    for (phdr, segment) in loads.iter().zip(segments()) {
        assert_eq!(
            (phdr.p_paddr, phdr.p_vaddr, phdr.p_memsz),
            (segment.phys, segment.virt, segment.len)
        );
        let data = dump.segment_data(phdr).unwrap();
        assert_eq!(data.len() as u64, segment.len);
        assert_eq!(data[1], ((segment.phys >> 16) + 1) as u8);
    }
}

#[test]
fn the_old_memory_header_converts_to_the_file_header_byte_for_byte() {
    let (old, _) = write(Placement::OldMemory {
        header_phys: HEADER_PHYS,
    });
    let (file, file_layout) = write(Placement::File);
    let dump = CoreDump::parse_elfcorehdr(&old, HEADER_PHYS).unwrap();
    let mut converted = vec![0xEEu8; old.len()];
    let layout = dump.write_file_header(&mut converted).unwrap();
    assert_eq!(layout, file_layout);
    assert_eq!(converted, file);
    let mut short = vec![0u8; old.len() - 1];
    assert_eq!(
        dump.write_file_header(&mut short).unwrap_err(),
        ElfCoreError::BufferTooSmall {
            needed: old.len(),
            len: old.len() - 1
        }
    );
}

#[test]
fn file_data_starts_on_a_page_after_the_header() {
    let (_, layout) = write(Placement::File);
    assert_eq!(layout.data_offset, 4096);
    let file = dump_file();
    let dump = CoreDump::parse(&file).unwrap();
    let offsets: Vec<_> = dump.load_segments().map(|p| p.p_offset).collect();
    assert_eq!(offsets, [4096, 4096 + 0x2000]);
}

#[test]
fn header_length_matches_the_sizing_function() {
    with_crash_record(|record| {
        let desc = record.desc_len().unwrap();
        let expected = 64 + 3 * 56 + 3 * (12 + 8 + 336) + (12 + 8 + desc) + 12;
        assert_eq!(core_header_len(3, 2, desc, None), Some(expected));
        assert_eq!(core_header_len(usize::MAX, 0, 0, None), None);
        assert_eq!(core_header_len(0, usize::MAX, 0, None), None);
        assert_eq!(note_len(4, 336), Some(12 + 8 + 336));
        assert_eq!(note_len(7, 5), Some(12 + 8 + 8));
    });
}

mod writer_rejections {
    use super::*;

    fn try_write(
        cpus: &[CpuState],
        segments: &[MemorySegment],
        out_len: usize,
    ) -> Result<CoreHeaderLayout, ElfCoreError> {
        with_crash_record(|record| {
            let mut out = vec![0xEEu8; out_len];
            let result = write_core_header(&mut out, cpus, record, segments, None, Placement::File);
            if result.is_err() {
                assert!(out.iter().all(|&b| b == 0xEE), "nothing written on error");
            }
            result
        })
    }

    #[test]
    fn a_small_buffer_is_refused() {
        let (bytes, _) = write(Placement::File);
        assert_eq!(
            try_write(&cpus(), &segments(), bytes.len() - 1).unwrap_err(),
            ElfCoreError::BufferTooSmall {
                needed: bytes.len(),
                len: bytes.len() - 1
            }
        );
    }

    #[test]
    fn bad_segments_are_refused() {
        let mut segs = segments();
        segs[1].len = 0;
        assert_eq!(
            try_write(&cpus(), &segs, 8192).unwrap_err(),
            ElfCoreError::EmptySegment(1)
        );
        let mut segs = segments();
        segs[0].phys = u64::MAX - 1;
        assert_eq!(
            try_write(&cpus(), &segs, 8192).unwrap_err(),
            ElfCoreError::SegmentOverflows(0)
        );
        let mut segs = segments();
        segs[0].virt = u64::MAX - 1;
        assert_eq!(
            try_write(&cpus(), &segs, 8192).unwrap_err(),
            ElfCoreError::SegmentOverflows(0)
        );
        let mut segs = segments();
        segs[1].phys = 0x10_1fff;
        assert_eq!(
            try_write(&cpus(), &segs, 8192).unwrap_err(),
            ElfCoreError::SegmentsOutOfOrder(1)
        );
        let mut segs = segments();
        segs.swap(0, 1);
        assert_eq!(
            try_write(&cpus(), &segs, 8192).unwrap_err(),
            ElfCoreError::SegmentsOutOfOrder(1)
        );
        let mut segs = segments();
        segs[1].phys = 0x10_2000; // touching is fine
        assert!(try_write(&cpus(), &segs, 8192).is_ok());
        let many = vec![
            MemorySegment {
                phys: 0,
                virt: 0,
                len: 1,
            };
            MAX_PHNUM
        ];
        assert_eq!(
            try_write(&cpus(), &many, 8192).unwrap_err(),
            ElfCoreError::TooManySegments(MAX_PHNUM + 1)
        );
    }

    #[test]
    fn bad_cpu_states_are_refused() {
        let mut states = cpus();
        states[2].cpu_index = 2;
        assert_eq!(
            try_write(&states, &segments(), 8192).unwrap_err(),
            ElfCoreError::DuplicateCpu(2)
        );
        let mut states = cpus();
        states[0].cpu_index = i32::MAX as u32;
        assert_eq!(
            try_write(&states, &segments(), 8192).unwrap_err(),
            ElfCoreError::CpuIndexTooLarge(i32::MAX as u32)
        );
        states[0].cpu_index = i32::MAX as u32 - 1;
        let layout = try_write(&states, &segments(), 8192).unwrap();
        assert!(layout.len < 8192);
    }

    #[test]
    fn no_cpus_and_no_segments_still_make_a_valid_header() {
        let layout = try_write(&[], &[], 8192).unwrap();
        let mut out = vec![0u8; layout.len];
        with_crash_record(|record| {
            write_core_header(&mut out, &[], record, &[], None, Placement::File).unwrap();
        });
        let dump = CoreDump::parse(&out).unwrap();
        assert_eq!(dump.cpus().count(), 0);
        assert_eq!(dump.program_headers().count(), 1);
        assert!(dump.crash_note().is_some());
    }
}

mod reader_rejections {
    use super::*;

    fn file() -> Vec<u8> {
        write(Placement::File).0
    }

    fn parse_err(bytes: &[u8]) -> ElfCoreError {
        CoreDump::parse(bytes).unwrap_err()
    }

    fn with(offset: usize, value: &[u8]) -> Vec<u8> {
        let mut bytes = file();
        bytes[offset..offset + value.len()].copy_from_slice(value);
        bytes
    }

    #[test]
    fn ehdr_fields_linux_checks_are_checked() {
        assert_eq!(parse_err(&with(0, b"\x7fELG")), ElfCoreError::BadMagic);
        assert_eq!(parse_err(&with(4, &[1])), ElfCoreError::BadClass(1));
        assert_eq!(parse_err(&with(5, &[2])), ElfCoreError::BadDataEncoding(2));
        assert_eq!(parse_err(&with(6, &[0])), ElfCoreError::BadVersion(0));
        assert_eq!(
            parse_err(&with(16, &2u16.to_le_bytes())),
            ElfCoreError::NotCore(2)
        );
        assert_eq!(
            parse_err(&with(18, &3u16.to_le_bytes())),
            ElfCoreError::BadMachine(3)
        );
        assert_eq!(
            parse_err(&with(20, &2u32.to_le_bytes())),
            ElfCoreError::BadVersion(2)
        );
        assert_eq!(
            parse_err(&with(52, &52u16.to_le_bytes())),
            ElfCoreError::BadEhsize(52)
        );
        assert_eq!(
            parse_err(&with(54, &32u16.to_le_bytes())),
            ElfCoreError::BadPhentsize(32)
        );
        assert_eq!(
            parse_err(&with(32, &0x100u64.to_le_bytes())),
            ElfCoreError::BadPhoff(0x100)
        );
        assert_eq!(
            parse_err(&with(56, &0u16.to_le_bytes())),
            ElfCoreError::NoProgramHeaders
        );
    }

    #[test]
    fn truncation_anywhere_in_the_headers_and_notes_is_refused() {
        let bytes = file();
        let (_, layout) = write(Placement::File);
        for len in 0..layout.notes.end {
            let err = parse_err(&bytes[..len]);
            assert!(
                matches!(
                    err,
                    ElfCoreError::Truncated { .. } | ElfCoreError::NoteSegmentOutOfBounds
                ),
                "length {len}: {err:?}"
            );
        }
    }

    #[test]
    fn note_segment_problems_are_refused() {
        let note_type_at = 64;
        assert_eq!(
            parse_err(&with(note_type_at, &PT_LOAD.to_le_bytes())),
            ElfCoreError::NoNoteSegment
        );
        let second_phdr = 64 + 56;
        assert_eq!(
            parse_err(&with(second_phdr, &PT_NOTE.to_le_bytes())),
            ElfCoreError::MultipleNoteSegments
        );
        let note_offset = 64 + 8;
        assert_eq!(
            parse_err(&with(note_offset, &u64::MAX.to_le_bytes())),
            ElfCoreError::NoteSegmentOutOfBounds
        );
        let note_filesz = 64 + 32;
        assert_eq!(
            parse_err(&with(note_filesz, &0x10_0000u64.to_le_bytes())),
            ElfCoreError::NoteSegmentOutOfBounds
        );
        // An old-memory header whose notes are not inside it.
        let (old, _) = write(Placement::OldMemory {
            header_phys: HEADER_PHYS,
        });
        assert_eq!(
            CoreDump::parse_elfcorehdr(&old, HEADER_PHYS + 0x1000).unwrap_err(),
            ElfCoreError::NoteSegmentOutOfBounds
        );
    }

    #[test]
    fn malformed_notes_are_refused() {
        let (bytes, layout) = write(Placement::File);
        let first = layout.notes.start;
        // A descriptor running past the segment.
        let mut bad = bytes.clone();
        bad[first + 4..first + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_err(&bad), ElfCoreError::MalformedNote(0));
        // A name running past the segment.
        let mut bad = bytes.clone();
        bad[first..first + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(parse_err(&bad), ElfCoreError::MalformedNote(0));
        // An NT_PRSTATUS of the wrong size: shrink the first one by 8 and
        // move the rest down, keeping the segment consistent.
        let mut bad = bytes.clone();
        bad[first + 4..first + 8].copy_from_slice(&328u32.to_le_bytes());
        bad.remove(first + 20);
        let mut bad2 = bad.clone();
        for _ in 0..7 {
            bad2.remove(first + 20);
        }
        let new_size = (layout.notes.len() - 8) as u64;
        bad2[64 + 32..64 + 40].copy_from_slice(&new_size.to_le_bytes());
        bad2[64 + 40..64 + 48].copy_from_slice(&new_size.to_le_bytes());
        assert_eq!(parse_err(&bad2), ElfCoreError::BadPrstatusSize(328));
        // A broken crash note is reported as such.
        let crash_desc = layout.notes.start + 3 * (12 + 8 + 336) + 12 + 8;
        let mut bad = bytes;
        bad[crash_desc] = 9;
        assert_eq!(
            parse_err(&bad),
            ElfCoreError::CrashNote(CrashNoteError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn overflowing_load_segments_are_refused() {
        let second_phdr = 64 + 56;
        assert_eq!(
            parse_err(&with(second_phdr + 8, &u64::MAX.to_le_bytes())),
            ElfCoreError::LoadSegmentOverflows(1)
        );
        assert_eq!(
            parse_err(&with(second_phdr + 24, &u64::MAX.to_le_bytes())),
            ElfCoreError::LoadSegmentOverflows(1)
        );
        assert_eq!(
            parse_err(&with(second_phdr + 16, &u64::MAX.to_le_bytes())),
            ElfCoreError::LoadSegmentOverflows(1)
        );
    }

    #[test]
    fn a_zero_name_size_ends_the_notes_as_in_linux() {
        let (bytes, layout) = write(Placement::File);
        let mut cut = bytes;
        // Turn the crash note into a terminator.
        let crash_note = layout.notes.start + 3 * (12 + 8 + 336);
        cut[crash_note..crash_note + 4].copy_from_slice(&0u32.to_le_bytes());
        let dump = CoreDump::parse(&cut).unwrap();
        assert_eq!(dump.notes().count(), 3);
        assert!(dump.crash_note().is_none());
    }

    #[test]
    fn every_elfcore_error_has_a_message() {
        use ElfCoreError as E;
        let errors = [
            E::BufferTooSmall { needed: 2, len: 1 },
            E::TooManySegments(1),
            E::EmptySegment(0),
            E::SegmentOverflows(0),
            E::SegmentsOutOfOrder(1),
            E::CpuIndexTooLarge(1),
            E::DuplicateCpu(1),
            E::CrashNote(CrashNoteError::TooLarge),
            E::TooLarge,
            E::Truncated { needed: 2, len: 1 },
            E::BadMagic,
            E::BadClass(1),
            E::BadDataEncoding(2),
            E::BadVersion(0),
            E::NotCore(1),
            E::BadMachine(3),
            E::BadEhsize(1),
            E::BadPhentsize(1),
            E::BadPhoff(1),
            E::NoProgramHeaders,
            E::NoNoteSegment,
            E::MultipleNoteSegments,
            E::NoteSegmentOutOfBounds,
            E::MalformedNote(0),
            E::BadPrstatusSize(1),
            E::LoadSegmentOverflows(0),
        ];
        for error in errors {
            assert!(error.to_string().len() > 8, "{error:?}");
        }
    }
}

mod gdb {
    use super::*;
    use std::process::Command;

    /// lldb opens the dump (it refuses ELF cores it cannot tie to an OS)
    /// and lists one thread per CPU with its registers. Skipped (with a
    /// message) where lldb is not installed.
    #[test]
    fn lldb_opens_the_dump_with_a_thread_per_cpu() {
        if Command::new("lldb").arg("--version").output().is_err() {
            eprintln!("lldb not installed: lldb test skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kexec-loader-lldb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let core = dir.join("vmcore");
        std::fs::write(&core, dump_file()).unwrap();
        let output = Command::new("lldb")
            .arg("-b")
            .arg("-c")
            .arg(&core)
            .args(["-o", "thread list", "-o", "register read rip"])
            .env("TERM", "dumb")
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let all = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!all.contains("Unsupported OS"), "{all}");
        for pid in 1..=3 {
            assert!(all.contains(&format!("tid = {pid}")), "thread {pid}: {all}");
        }
        assert!(
            all.contains(&format!("rip = {:#018x}", regs(2).rip)),
            "the crashing CPU's rip: {all}"
        );
    }

    /// gdb itself opens the dump: one thread per CPU with its registers,
    /// memory at the hypervisor's virtual addresses. Skipped (with a
    /// message) where gdb is not installed.
    #[test]
    fn gdb_reads_threads_registers_and_memory() {
        let Ok(version) = Command::new("gdb").arg("--version").output() else {
            eprintln!("gdb not installed: gdb test skipped");
            return;
        };
        assert!(version.status.success());
        let dir = std::env::temp_dir().join(format!("kexec-loader-gdb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let core = dir.join("vmcore");
        std::fs::write(&core, dump_file()).unwrap();
        let output = Command::new("gdb")
            .args([
                "-nx",
                "-batch",
                "-ex",
                "info threads",
                "-ex",
                "p/x $rip",
                "-ex",
                "thread 3",
                "-ex",
                "p/x $rsp",
            ])
            .args(["-ex", "x/2xb 0xffff800000100000", "-ex", "x/1xb 0x200001"])
            .arg("-c")
            .arg(&core)
            .env("TERM", "dumb")
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let all = format!("{stdout}\n{stderr}");
        assert!(output.status.success(), "{all}");
        for pid in 1..=3 {
            assert!(
                all.contains(&format!("LWP {pid}")),
                "thread for pid {pid}: {all}"
            );
        }
        assert!(
            all.contains(&format!("= {:#x}", regs(2).rip)),
            "first thread's rip: {all}"
        );
        assert!(
            all.contains(&format!("= {:#x}", regs(1).rsp)),
            "CPU 1's rsp: {all}"
        );
        assert!(
            all.contains("0xffff800000100000:\t0x10\t0x11"),
            "memory at the virtual address: {all}"
        );
        assert!(
            all.contains("0x200001:\t0x21"),
            "memory of the second segment: {all}"
        );
        assert!(
            all.contains("Current thread is 1 (LWP 3)"),
            "the crashing CPU is current: {all}"
        );
    }
}

/// The hypervisor image's notes (`NT_AUXV`, `NT_FILE`): what drgn needs to
/// match hv's ELF to the dump's memory.
pub(crate) mod loaded_image {
    use super::*;
    use object::LittleEndian;
    use object::elf::FileHeader64;
    use object::read::elf::{FileHeader as _, ProgramHeader as _};

    pub(crate) const LOAD_ADDR: u64 = 0x20_0000;

    /// Program headers as hv's linker script lays them out: text (with the
    /// file header and program headers), rodata, data + bss, a note, and a
    /// bss-only segment with no file bytes.
    /// `(p_type, p_offset, p_vaddr, p_filesz, p_memsz)`.
    pub(crate) const PHDRS: [(u32, u64, u64, u64, u64); 5] = [
        (PT_LOAD, 0, 0x20_0000, 0x3_89ea, 0x3_89ea),
        (PT_LOAD, 0x3_9000, 0x23_9000, 0x8990, 0x8990),
        (PT_LOAD, 0x4_2000, 0x24_2000, 0x3_31b0, 0xd_5000),
        (PT_NOTE, 0x4_196c, 0x24_196c, 0x24, 0x24),
        (PT_LOAD, 0x7_6000, 0x40_0000, 0, 0x1000),
    ];

    /// The first bytes of an executable with `phdrs`, as loaded.
    pub(crate) fn headers(phdrs: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
        let mut bytes = vec![0u8; EHDR_LEN + phdrs.len() * PHDR_LEN];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = ELFCLASS64;
        bytes[5] = ELFDATA2LSB;
        bytes[6] = EV_CURRENT;
        bytes::put_u16(&mut bytes, 16, 2).unwrap(); // ET_EXEC
        bytes::put_u16(&mut bytes, 18, EM_X86_64).unwrap();
        bytes::put_u32(&mut bytes, 20, 1).unwrap();
        bytes::put_u64(&mut bytes, 24, 0x20_1020).unwrap(); // e_entry
        bytes::put_u64(&mut bytes, 32, EHDR_LEN as u64).unwrap();
        bytes::put_u16(&mut bytes, 52, EHDR_LEN as u16).unwrap();
        bytes::put_u16(&mut bytes, 54, PHDR_LEN as u16).unwrap();
        bytes::put_u16(&mut bytes, 56, phdrs.len() as u16).unwrap();
        for (i, &(p_type, offset, vaddr, filesz, memsz)) in phdrs.iter().enumerate() {
            let at = EHDR_LEN + i * PHDR_LEN;
            put_phdr(&mut bytes, at, p_type, PF_R, offset, vaddr, vaddr, filesz).unwrap();
            bytes::put_u64(&mut bytes, at + 40, memsz).unwrap();
            bytes::put_u64(&mut bytes, at + 48, 0x1000).unwrap();
        }
        bytes
    }

    pub(crate) fn image_bytes() -> Vec<u8> {
        headers(&PHDRS)
    }

    pub(crate) fn image(bytes: &[u8]) -> LoadedImage<'_> {
        LoadedImage::from_loaded_headers("hv", LOAD_ADDR, bytes).unwrap()
    }

    /// A dump file with the image's notes.
    pub(crate) fn write_with_image(placement: Placement) -> (Vec<u8>, CoreHeaderLayout) {
        let bytes = image_bytes();
        let image = image(&bytes);
        with_crash_record(|record| {
            let len = core_header_len(3, 2, record.desc_len().unwrap(), Some(&image)).unwrap();
            let mut out = vec![0xEEu8; len];
            let layout = write_core_header(
                &mut out,
                &cpus(),
                record,
                &segments(),
                Some(&image),
                placement,
            )
            .unwrap();
            assert_eq!(layout.len, len);
            (out, layout)
        })
    }

    #[test]
    fn the_test_headers_are_an_executable_an_independent_reader_accepts() {
        let bytes = image_bytes();
        let header = FileHeader64::<LittleEndian>::parse(&*bytes).unwrap();
        let endian = header.endian().unwrap();
        assert_eq!(header.e_type(endian), object::elf::ET_EXEC);
        let phdrs = header.program_headers(endian, &*bytes).unwrap();
        assert_eq!(phdrs.len(), PHDRS.len());
        assert_eq!(phdrs[2].p_memsz(endian), 0xd_5000);
    }

    #[test]
    fn the_loaded_headers_give_auxv_values_and_file_mappings() {
        let bytes = image_bytes();
        let image = image(&bytes);
        assert_eq!(image.name(), "hv");
        assert_eq!(image.phdr_addr(), 0x20_0040);
        assert_eq!(image.phnum(), 5);
        assert_eq!(image.entry(), 0x20_1020);
        let mapping = |start, end, file_offset| FileMapping {
            start,
            end,
            file_offset,
        };
        // Page-rounded; the bss-only segment maps nothing of the file.
        assert_eq!(
            image.mappings(),
            [
                mapping(0x20_0000, 0x23_9000, 0),
                mapping(0x23_9000, 0x24_2000, 0x3_9000),
                mapping(0x24_2000, 0x27_6000, 0x4_2000),
            ]
        );
    }

    /// The notes, decoded with `object`'s note reader and by hand in the
    /// kernel's layouts (`fill_auxv_note`, `fill_files_note` in
    /// `fs/binfmt_elf.c`), not with this crate's reader.
    #[test]
    fn the_core_carries_nt_auxv_and_nt_file_in_the_kernels_layout() {
        let (file, _) = write_with_image(Placement::File);
        let header = FileHeader64::<LittleEndian>::parse(&*file).unwrap();
        let endian = header.endian().unwrap();
        let phdrs = header.program_headers(endian, &*file).unwrap();
        let mut notes = phdrs[0].notes(endian, &*file).unwrap().unwrap();
        let mut found = Vec::new();
        while let Some(note) = notes.next().unwrap() {
            found.push((
                note.name().to_vec(),
                note.n_type(endian),
                note.desc().to_vec(),
            ));
        }
        let kinds: Vec<_> = found.iter().map(|(n, t, _)| (n.as_slice(), *t)).collect();
        assert_eq!(
            kinds,
            [
                (b"CORE".as_slice(), object::elf::NT_AUXV),
                (b"CORE", object::elf::NT_FILE),
                (b"CORE", object::elf::NT_PRSTATUS),
                (b"CORE", object::elf::NT_PRSTATUS),
                (b"CORE", object::elf::NT_PRSTATUS),
                (b"HVCRASH", NT_HV_CRASH),
            ]
        );
        let word =
            |desc: &[u8], i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().unwrap());
        let auxv = &found[0].2;
        let pairs: Vec<_> = (0..auxv.len() / 16)
            .map(|i| (word(auxv, 2 * i), word(auxv, 2 * i + 1)))
            .collect();
        assert_eq!(
            pairs,
            [
                // AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_ENTRY, AT_NULL
                // (include/uapi/linux/auxvec.h).
                (3, 0x20_0040),
                (4, 56),
                (5, 5),
                (6, 4096),
                (9, 0x20_1020),
                (0, 0),
            ]
        );
        let files = &found[1].2;
        assert_eq!(
            (word(files, 0), word(files, 1)),
            (3, 4096),
            "count, page size"
        );
        let entries: Vec<_> = (0..3)
            .map(|i| {
                (
                    word(files, 2 + 3 * i),
                    word(files, 3 + 3 * i),
                    word(files, 4 + 3 * i),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                (0x20_0000, 0x23_9000, 0),
                (0x23_9000, 0x24_2000, 0x39),
                (0x24_2000, 0x27_6000, 0x42)
            ],
            "start, end, file offset in pages"
        );
        assert_eq!(&files[16 + 3 * 24..], b"hv\0hv\0hv\0");
    }

    #[test]
    fn our_reader_and_the_file_conversion_keep_the_image_notes() {
        let (old, _) = write_with_image(Placement::OldMemory {
            header_phys: HEADER_PHYS,
        });
        let (file, _) = write_with_image(Placement::File);
        let dump = CoreDump::parse_elfcorehdr(&old, HEADER_PHYS).unwrap();
        let mut converted = vec![0u8; old.len()];
        let layout = dump.write_file_header(&mut converted).unwrap();
        assert_eq!(&converted[..layout.len], &file[..]);
        let dump = CoreDump::parse(&file).unwrap();
        let notes = dump.image_notes().unwrap();
        assert_eq!(
            (notes.phdr_addr, notes.phnum, notes.entry),
            (0x20_0040, 5, 0x20_1020)
        );
        let entries: Vec<_> = notes.files.entries().collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].0.file_offset, 0x3_9000);
        assert!(entries.iter().all(|(_, name)| *name == b"hv"));
        assert_eq!(dump.cpus().count(), 3);
        assert!(dump.crash_note().is_some());
        // Without an image there are no image notes.
        assert!(
            CoreDump::parse(&dump_file())
                .unwrap()
                .image_notes()
                .is_none()
        );
    }

    #[test]
    fn the_sizing_function_counts_the_image_notes() {
        let bytes = image_bytes();
        let image = image(&bytes);
        with_crash_record(|record| {
            let desc = record.desc_len().unwrap();
            let without = core_header_len(3, 2, desc, None).unwrap();
            let nt_file = 16 + 3 * (24 + 3);
            assert_eq!(image.nt_file_desc_len(), nt_file);
            assert_eq!(
                core_header_len(3, 2, desc, Some(&image)),
                Some(without + (12 + 8 + 96) + (12 + 8 + nt_file.next_multiple_of(4)))
            );
        });
    }

    /// hv prepares the header when it loads the capture kernel and
    /// completes it at the crash: the same bytes as one write, the prepared
    /// part untouched by the completion, and a second completion (the
    /// hand-over's second attempt, with fewer CPUs) as good as the first.
    #[test]
    fn a_prepared_header_completed_at_the_crash_is_the_one_written_at_once() {
        const HEADER_PHYS: u64 = 0x1010_0000;
        let placement = Placement::OldMemory {
            header_phys: HEADER_PHYS,
        };
        let (once, written) = write_with_image(placement);
        let len = written.len;
        let bytes = image_bytes();
        let image = image(&bytes);
        with_crash_record(|record| {
            let mut split = vec![0x55u8; len + 64];
            let prepared =
                prepare_core_header(&mut split, &segments(), Some(&image), HEADER_PHYS).unwrap();
            assert_eq!(
                prepared_len(segments().len(), Some(&image)),
                Some(prepared.fixed_len())
            );
            let fixed = split[..prepared.fixed_len()].to_vec();
            assert!(split[prepared.fixed_len()..].iter().all(|&b| b == 0x55));
            // The completion writes the PT_NOTE program header (the second
            // 56 bytes) and from the fixed part's end on, nothing else.
            let untouched = |bytes: &[u8]| {
                let mut kept = bytes[..prepared.fixed_len()].to_vec();
                kept[EHDR_LEN..EHDR_LEN + PHDR_LEN].fill(0);
                kept
            };
            let fixed = untouched(&fixed);
            let completed = complete_core_header(&mut split, &prepared, &cpus(), record).unwrap();
            assert_eq!(completed, written);
            assert_eq!(split[..len], once[..len]);
            assert_eq!(untouched(&split), fixed);
            assert!(split[len..].iter().all(|&b| b == 0x55));

            // Again with the crashing CPU alone: a valid, shorter header.
            let alone = &cpus()[..1];
            let again = complete_core_header(&mut split, &prepared, alone, record).unwrap();
            assert!(again.len < completed.len);
            assert_eq!(untouched(&split), fixed);
            let dump = CoreDump::parse_elfcorehdr(&split[..again.len], HEADER_PHYS).unwrap();
            assert_eq!(dump.cpus().count(), 1);
            assert!(dump.image_notes().is_some());
        });
    }

    #[test]
    fn a_completion_that_does_not_fit_writes_nothing() {
        let bytes = image_bytes();
        let image = image(&bytes);
        with_crash_record(|record| {
            let len = core_header_len(3, 2, record.desc_len().unwrap(), Some(&image)).unwrap();
            let mut out = vec![0x55u8; len - 1];
            let prepared =
                prepare_core_header(&mut out, &segments(), Some(&image), 0x1000_0000).unwrap();
            let before = out.clone();
            assert_eq!(
                complete_core_header(&mut out, &prepared, &cpus(), record),
                Err(ElfCoreError::BufferTooSmall {
                    needed: len,
                    len: len - 1
                })
            );
            assert_eq!(out, before);
            // Too small for the prepared part itself.
            let mut tiny = vec![0u8; 100];
            assert!(matches!(
                prepare_core_header(&mut tiny, &segments(), Some(&image), 0x1000_0000),
                Err(ElfCoreError::BufferTooSmall { len: 100, .. })
            ));
        });
    }

    #[test]
    fn headers_that_do_not_describe_a_loaded_image_are_refused() {
        use ImageError as E;
        let bytes = image_bytes();
        let from = |name: &str, addr: u64, bytes: &[u8]| {
            LoadedImage::from_loaded_headers(name, addr, bytes).map(|_| ())
        };
        // Read somewhere the headers are not loaded.
        assert_eq!(from("hv", 0x30_0000, &bytes), Err(E::HeadersNotLoaded));
        for len in 0..bytes.len() {
            assert!(
                from("hv", LOAD_ADDR, &bytes[..len]).is_err(),
                "length {len}"
            );
        }
        let mut bad = bytes.clone();
        bad[1] = b'F';
        assert_eq!(from("hv", LOAD_ADDR, &bad), Err(E::BadMagic));
        let mut bad = bytes.clone();
        bad[4] = 1;
        assert_eq!(from("hv", LOAD_ADDR, &bad), Err(E::NotX86_64Executable));
        let mut bad = bytes.clone();
        bad[16] = 4; // ET_CORE
        assert_eq!(from("hv", LOAD_ADDR, &bad), Err(E::NotX86_64Executable));
        let mut bad = bytes.clone();
        bad[54] = 32;
        assert_eq!(from("hv", LOAD_ADDR, &bad), Err(E::BadPhentsize(32)));
        for name in ["", "a\0b", &"x".repeat(MAX_IMAGE_NAME_FOR_TESTS + 1)] {
            assert_eq!(from(name, LOAD_ADDR, &bytes), Err(E::BadName), "{name:?}");
        }
        let mut phdrs = PHDRS;
        phdrs[1].1 += 8; // offset and address no longer congruent
        assert_eq!(
            from("hv", LOAD_ADDR, &headers(&phdrs)),
            Err(E::BadSegment(1))
        );
        let mut phdrs = PHDRS;
        phdrs[2].2 = u64::MAX - 0x100;
        assert_eq!(
            from("hv", LOAD_ADDR, &headers(&phdrs)),
            Err(E::BadSegment(2))
        );
        let mut phdrs = PHDRS;
        phdrs[0].3 = 0x20; // the text segment ends inside the program headers
        assert_eq!(
            from("hv", LOAD_ADDR, &headers(&phdrs)),
            Err(E::HeadersNotLoaded)
        );
        let many: Vec<_> = (0..9u64)
            .map(|i| (PT_LOAD, i * 0x1000, LOAD_ADDR + i * 0x1000, 0x1000, 0x1000))
            .collect();
        assert_eq!(
            from("hv", LOAD_ADDR, &headers(&many)),
            Err(E::TooManyMappings(9))
        );
        assert!(from("hv", LOAD_ADDR, &headers(&many[..8])).is_ok());
    }

    const MAX_IMAGE_NAME_FOR_TESTS: usize = super::super::image::MAX_IMAGE_NAME;

    #[test]
    fn malformed_image_notes_are_refused_by_the_reader() {
        let (file, layout) = write_with_image(Placement::File);
        // The image's notes come first: NT_AUXV, then NT_FILE.
        let nt_file_desc = layout.notes.start + (12 + 8 + 96) + 12 + 8;
        // A count that promises more entries than the descriptor holds.
        let mut bad = file.clone();
        bad[nt_file_desc..nt_file_desc + 8].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(
            CoreDump::parse(&bad).unwrap_err(),
            ElfCoreError::Image(ImageError::MalformedNote)
        );
        // A last name without its NUL.
        let mut bad = file.clone();
        let last_nul = nt_file_desc + 16 + 3 * 24 + 8;
        assert_eq!(bad[last_nul], 0);
        bad[last_nul] = b'x';
        assert_eq!(
            CoreDump::parse(&bad).unwrap_err(),
            ElfCoreError::Image(ImageError::MalformedNote)
        );
        // An auxv whose size is not a multiple of 16.
        let mut bad = file;
        let auxv_note = layout.notes.start;
        bad[auxv_note + 4..auxv_note + 8].copy_from_slice(&88u32.to_le_bytes());
        assert!(CoreDump::parse(&bad).is_err());
    }

    #[test]
    fn every_image_error_has_a_message() {
        use ImageError as E;
        for error in [
            E::Truncated,
            E::BadMagic,
            E::NotX86_64Executable,
            E::BadPhentsize(1),
            E::BadSegment(0),
            E::TooManyMappings(9),
            E::HeadersNotLoaded,
            E::BadName,
            E::MalformedNote,
        ] {
            assert!(error.to_string().len() > 8, "{error:?}");
            assert!(
                ElfCoreError::from(error)
                    .to_string()
                    .contains(&error.to_string())
            );
        }
    }
}
