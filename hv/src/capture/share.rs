//! The woken CPUs share the dump's work: while one CPU streams the dump in
//! order, the others look at old memory ahead of it and note which pages
//! are all zero (the stream sends those as ZERO records, nothing else).
//!
//! The pages of the dump's segments, in stream order, are cut into chunks.
//! A helper claims a chunk (one atomic swap), scans its pages and stores
//! each page's verdict (release); the streaming CPU claims each chunk it
//! reaches too, so that helpers skip what it has passed, and takes a
//! page's verdict (acquire) when there is one, or scans the page itself.
//! It never waits for a helper: a slow or silent helper costs nothing but
//! its share. The stream is the same whoever scanned a page, since every
//! verdict comes from the same [`is_zero`] over the same bytes. Borrowed
//! pages (the wake's, `super::wake`) are always judged by the streaming
//! CPU from their saved copies.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hv_abi::dump_stream::is_zero;
use kexec_loader::elfcore::CoreDump;

use super::wake::Borrowed;
use crate::mm::{self, phys};

const PAGE: u64 = 4096;
/// Pages a helper claims at a time (256 KiB).
const CHUNK_PAGES: usize = 64;
/// Segments shared; the streaming CPU scans the pages of any beyond.
const MAX_SEGMENTS: usize = 128;
/// Old memory the capture image reads: its identity map's 4 GiB.
const READABLE_END: u64 = 4 << 30;

/// A page's verdict.
const UNKNOWN: u8 = 0;
const ZERO: u8 = 1;
const DATA: u8 = 2;

/// A segment of old memory and where its pages start among all the
/// segments' pages.
#[derive(Debug, Clone, Copy, Default)]
struct Segment {
    start: u64,
    end: u64,
    first_page: usize,
}

impl Segment {
    /// Page-sized steps, aligned to the memory's own pages, as the stream
    /// takes them.
    fn pages(&self) -> usize {
        ((self.end.next_multiple_of(PAGE) - (self.start & !(PAGE - 1))) / PAGE) as usize
    }

    /// The bytes of its `page`-th step.
    fn step(&self, page: usize) -> (u64, u64) {
        let base = (self.start & !(PAGE - 1)) + page as u64 * PAGE;
        let from = base.max(self.start);
        (from, (base + PAGE).min(self.end) - from)
    }

    fn page_of(&self, address: u64) -> usize {
        ((address - (self.start & !(PAGE - 1))) / PAGE) as usize
    }
}

/// The shared plan: made before the other CPUs wake, read by all.
struct Plan {
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
    pages: usize,
    verdicts: &'static [AtomicU8],
    claims: &'static [AtomicBool],
    next_chunk: AtomicUsize,
    /// Pages the helpers judged.
    helper_pages: AtomicU64,
    /// Helpers that judged at least one chunk.
    helpers: AtomicU32,
}

static PLAN: spin::Once<Plan> = spin::Once::new();

/// Lays out the shared work for `dump`'s segments. `false` (and the
/// streaming CPU does it all) when there is no memory for the verdicts.
pub fn prepare(dump: &CoreDump<'_>) -> bool {
    let mut segments = [Segment::default(); MAX_SEGMENTS];
    let mut count = 0;
    let mut pages = 0;
    for segment in dump.load_segments().take(MAX_SEGMENTS) {
        let start = segment.p_offset;
        // One the stream cannot read stays in the plan, empty, so that the
        // indices match the dump's.
        let end = start
            .checked_add(segment.p_memsz)
            .filter(|&end| end <= READABLE_END && end > start);
        let segment = match end {
            Some(end) => Segment {
                start,
                end,
                first_page: pages,
            },
            None => Segment {
                first_page: pages,
                ..Segment::default()
            },
        };
        pages += segment.pages();
        segments[count] = segment;
        count += 1;
    }
    let chunks = pages.div_ceil(CHUNK_PAGES);
    let Some(verdicts) = mm::alloc_permanent_slice_with(pages, |_| AtomicU8::new(UNKNOWN)) else {
        return false;
    };
    let Some(claims) = mm::alloc_permanent_slice_with(chunks, |_| AtomicBool::new(false)) else {
        return false;
    };
    PLAN.call_once(|| Plan {
        segments,
        count,
        pages,
        verdicts,
        claims,
        next_chunk: AtomicUsize::new(0),
        helper_pages: AtomicU64::new(0),
        helpers: AtomicU32::new(0),
    });
    true
}

/// A woken CPU's work (handed to the idle loop): claims chunks until none
/// is left, and judges their pages.
pub fn help(_index: usize) {
    let Some(plan) = PLAN.get() else { return };
    let mut judged = 0u64;
    loop {
        let chunk = plan.next_chunk.fetch_add(1, Ordering::Relaxed);
        if chunk >= plan.claims.len() {
            break;
        }
        if plan.claims[chunk].swap(true, Ordering::AcqRel) {
            continue;
        }
        let first = chunk * CHUNK_PAGES;
        for page in first..(first + CHUNK_PAGES).min(plan.pages) {
            let Some(segment) = plan.segments[..plan.count]
                .iter()
                .find(|segment| page < segment.first_page + segment.pages())
            else {
                break;
            };
            let (address, len) = segment.step(page - segment.first_page);
            if address == 0 {
                // A Rust reference to address 0 is undefined behaviour:
                // this page is the streaming CPU's.
                continue;
            }
            // Old memory, which nobody writes while the capture runs.
            let verdict = if is_zero(phys::read(address, len)) {
                ZERO
            } else {
                DATA
            };
            plan.verdicts[page].store(verdict, Ordering::Release);
            judged += 1;
        }
    }
    if judged > 0 {
        plan.helper_pages.fetch_add(judged, Ordering::Relaxed);
        plan.helpers.fetch_add(1, Ordering::Relaxed);
    }
}

/// The streaming CPU's side: which pages are zero, from the helpers'
/// verdicts where they have one.
#[derive(Debug)]
pub struct Streamer {
    borrowed: Borrowed,
    last_chunk: usize,
    /// Pages whose verdict a helper had given.
    pub taken: u64,
    /// Pages the streaming CPU judged itself.
    pub scanned: u64,
}

impl Streamer {
    /// For a stream that reads `borrowed` pages from their copies.
    pub fn new(borrowed: Borrowed) -> Self {
        Self {
            borrowed,
            last_chunk: usize::MAX,
            taken: 0,
            scanned: 0,
        }
    }

    /// Whether the page-sized step at `address` (of the `segment`-th
    /// segment, in the dump's order) is all zero; `bytes` are its bytes.
    pub fn is_zero(&mut self, segment: usize, address: u64, bytes: &[u8]) -> bool {
        if let Some(plan) = PLAN.get()
            && let Some(segment) = plan.segments[..plan.count]
                .get(segment)
                .filter(|s| (s.start..s.end).contains(&address))
            && !self.borrowed.contains(address)
        {
            let page = segment.first_page + segment.page_of(address);
            let chunk = page / CHUNK_PAGES;
            if chunk != self.last_chunk {
                // Helpers need not start on what this CPU has reached.
                plan.claims[chunk].store(true, Ordering::Release);
                self.last_chunk = chunk;
            }
            match plan.verdicts[page].load(Ordering::Acquire) {
                ZERO => {
                    self.taken += 1;
                    return true;
                }
                DATA => {
                    self.taken += 1;
                    return false;
                }
                _ => {}
            }
        }
        self.scanned += 1;
        is_zero(bytes)
    }
}

/// What the helpers did: pages judged, and how many helpers judged any.
pub fn helpers() -> (u64, u32) {
    PLAN.get().map_or((0, 0), |plan| {
        (
            plan.helper_pages.load(Ordering::Relaxed),
            plan.helpers.load(Ordering::Relaxed),
        )
    })
}
