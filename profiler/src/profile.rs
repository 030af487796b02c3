//! [`Profile`]: the symbolized, format-neutral profile built from a [`Snapshot`].
//!
//! Building a profile symbolizes every distinct address (cached), strips the profiler's
//! own frames from the leaf side, merges stacks that become identical, and orders
//! everything deterministically. Encoders ([`crate::pprof`], [`crate::text`]) and
//! renderers (folded stacks for flame graphs) read this model; it knows no wire format.

use crate::guard::ReentrancyGuard;
use crate::maps::{executable_mappings, MappingInfo};
use crate::snapshot::Snapshot;
use crate::stack::{LookupAddress, ReturnAddress};
use crate::stats::Stats;
use crate::symbolize::{symbolize, SymbolFrame, Symbols};
use crate::table::Counters;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

/// Which of the four heap sample types a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleType {
    /// Estimated allocations (`alloc_objects`, count).
    AllocObjects,
    /// Estimated bytes allocated (`alloc_space`, bytes).
    AllocSpace,
    /// Estimated live objects (`inuse_objects`, count).
    InuseObjects,
    /// Estimated live bytes (`inuse_space`, bytes).
    InuseSpace,
}

impl SampleType {
    /// All four, in pprof's order.
    pub const ALL: [SampleType; 4] = [
        SampleType::AllocObjects,
        SampleType::AllocSpace,
        SampleType::InuseObjects,
        SampleType::InuseSpace,
    ];

    /// pprof's name (`alloc_objects`, …).
    pub fn name(self) -> &'static str {
        match self {
            SampleType::AllocObjects => "alloc_objects",
            SampleType::AllocSpace => "alloc_space",
            SampleType::InuseObjects => "inuse_objects",
            SampleType::InuseSpace => "inuse_space",
        }
    }

    /// pprof's unit (`count` or `bytes`).
    pub fn unit(self) -> &'static str {
        match self {
            SampleType::AllocObjects | SampleType::InuseObjects => "count",
            SampleType::AllocSpace | SampleType::InuseSpace => "bytes",
        }
    }

    /// Parses a name as [`SampleType::name`] prints it.
    pub fn from_name(name: &str) -> Option<SampleType> {
        SampleType::ALL.into_iter().find(|t| t.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The two profiles Go serves from the same data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProfileKind {
    /// Live objects: pprof shows `inuse_space` by default.
    Heap,
    /// All allocations since start: default sample type `alloc_space`.
    Allocs,
}

impl ProfileKind {
    /// `heap` or `allocs`.
    pub fn name(self) -> &'static str {
        match self {
            ProfileKind::Heap => "heap",
            ProfileKind::Allocs => "allocs",
        }
    }

    /// The sample type a viewer shows first.
    pub fn default_sample_type(self) -> SampleType {
        match self {
            ProfileKind::Heap => SampleType::InuseSpace,
            ProfileKind::Allocs => SampleType::AllocSpace,
        }
    }
}

/// A symbolized profile.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The sampling rate in bytes (pprof's `period`).
    pub sample_rate: u64,
    /// When it was taken.
    pub time: SystemTime,
    /// For a delta profile, the time it covers.
    pub duration: Option<Duration>,
    /// Samples in a deterministic order.
    pub samples: Vec<Sample>,
    /// Distinct locations, referenced by index from samples.
    pub locations: Vec<Location>,
    /// Distinct functions, referenced by index from lines.
    pub functions: Vec<Function>,
    /// Executable mappings, referenced by index from locations.
    pub mappings: Vec<Mapping>,
    /// Exact totals at the time of the snapshot.
    pub stats: Stats,
}

/// One stack and its estimates.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Indices into [`Profile::locations`], leaf first.
    pub locations: Vec<usize>,
    /// The weighted estimates and raw counts.
    pub counters: Counters,
}

impl Sample {
    /// The four estimates in [`SampleType::ALL`] order, rounded to whole numbers.
    pub fn values(&self) -> [i64; 4] {
        let c = &self.counters;
        [
            c.alloc_objects.round() as i64,
            c.alloc_bytes.round() as i64,
            (c.alloc_objects - c.free_objects).round() as i64,
            (c.alloc_bytes - c.free_bytes).round() as i64,
        ]
    }

    /// One estimate.
    pub fn value(&self, t: SampleType) -> i64 {
        self.values()[t.index()]
    }

    /// The raw sample counts in the same order (Go's legacy text prints these).
    pub fn raw_values(&self) -> [i64; 4] {
        let c = &self.counters;
        [
            c.raw_alloc_objects as i64,
            c.raw_alloc_bytes as i64,
            c.raw_alloc_objects as i64 - c.raw_free_objects as i64,
            c.raw_alloc_bytes as i64 - c.raw_free_bytes as i64,
        ]
    }

    /// Average object size (the `bytes` label), or 0 if nothing was allocated.
    pub fn object_size(&self) -> i64 {
        let c = &self.counters;
        c.raw_alloc_bytes
            .checked_div(c.raw_alloc_objects)
            .map_or(0, |b| b as i64)
    }
}

/// One code address and the functions (inlined ones first) it belongs to.
#[derive(Clone, Debug)]
pub struct Location {
    /// The address inside the call instruction (return address − 1).
    pub address: LookupAddress,
    /// Index into [`Profile::mappings`], if the address is in one.
    pub mapping: Option<usize>,
    /// Innermost (inlined callee) first, the function containing the address last.
    pub lines: Vec<Line>,
    /// Start of the enclosing symbol, when known.
    pub symbol_address: Option<usize>,
}

/// A function and line of a location.
#[derive(Clone, Debug)]
pub struct Line {
    /// Index into [`Profile::functions`].
    pub function: usize,
    /// Source line, 0 when unknown.
    pub line: u32,
}

/// A function.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Function {
    /// Demangled name.
    pub name: String,
    /// Name in the binary.
    pub system_name: String,
    /// Source file.
    pub filename: String,
}

/// An executable mapping and how far its locations were symbolized.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// Address range, file and build ID.
    pub info: MappingInfo,
    /// Every location in it has function names.
    pub has_functions: bool,
    /// Every location in it has file names.
    pub has_filenames: bool,
    /// Every location in it has line numbers.
    pub has_line_numbers: bool,
    /// Inline frames were resolved (from DWARF) for every location in it.
    pub has_inline_frames: bool,
}

/// Pseudo-address of the overflow entry's location. Non-zero (Grafana Alloy keys
/// locations by address) and outside any mapping.
const OVERFLOW_ADDRESS: usize = 1;
/// The overflow entry's function name.
pub const OVERFLOW_FUNCTION: &str = "[allocprof: stack table full]";

/// Is this one of the profiler's own functions, to be stripped from the leaf side?
/// Covers the wrapper and its machinery, the global-allocator shims and `alloc::alloc`'s
/// entry points; keeps `RawVec`, `Vec`, `String` and the other collection frames.
pub fn is_internal_function(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "allocprof_core::",
        "<allocprof_core::",
        "backtrace::",
        "<backtrace::",
        "__rustc::",
        "__rust_alloc",
        "__rust_realloc",
        "__rust_dealloc",
        "__rg_",
        "__rdl_",
        "alloc::alloc::",
        "<alloc::alloc::Global as core::alloc::Allocator>",
        "<alloc::alloc::Global>::",
        "std::alloc::",
        "<std::alloc::System as core::alloc::global::GlobalAlloc>",
        "core::alloc::global::GlobalAlloc::",
        "_Unwind_",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

impl Snapshot {
    /// Symbolizes and builds the profile. Allocates; takes no table lock.
    pub fn to_profile(&self) -> Profile {
        let _mark = ReentrancyGuard::enter();
        let mut addrs: Vec<ReturnAddress> =
            self.stacks().flat_map(|(s, _)| s.iter().copied()).collect();
        addrs.sort_unstable();
        addrs.dedup();
        let lookups: Vec<LookupAddress> = addrs.iter().map(|a| a.lookup()).collect();
        let symbols: HashMap<ReturnAddress, Symbols> =
            addrs.iter().copied().zip(symbolize(&lookups)).collect();

        // Strip leaf-side internal frames, then merge stacks that became identical.
        let mut merged: BTreeMap<Vec<ReturnAddress>, Counters> = BTreeMap::new();
        for (stack, counters) in self.stacks() {
            let keep = stack
                .iter()
                .position(|a| !all_internal(&symbols[a]))
                .unwrap_or(stack.len());
            let stack = if keep == stack.len() {
                stack
            } else {
                &stack[keep..]
            };
            merged.entry(stack.to_vec()).or_default().merge(counters);
        }
        if self.overflow().raw_alloc_objects > 0 || self.overflow().raw_free_objects > 0 {
            merged
                .entry(vec![ReturnAddress(OVERFLOW_ADDRESS + 1)])
                .or_default()
                .merge(self.overflow());
        }

        let mut b = Builder {
            mappings: executable_mappings(),
            locations: Vec::new(),
            location_index: HashMap::new(),
            functions: Vec::new(),
            function_index: HashMap::new(),
        };
        let samples = merged
            .into_iter()
            .filter(|(stack, _)| !stack.is_empty())
            .map(|(stack, counters)| Sample {
                locations: stack
                    .iter()
                    .map(|a| b.location(*a, symbols.get(a)))
                    .collect(),
                counters,
            })
            .filter(|s| s.values() != [0; 4] || s.raw_values() != [0; 4])
            .collect();
        let mappings = b.finish_mappings();
        Profile {
            sample_rate: self.rate as u64,
            time: self.time,
            duration: self.duration,
            samples,
            locations: b.locations,
            functions: b.functions,
            mappings,
            stats: self.stats.clone(),
        }
    }
}

/// A leaf-side location is the profiler's when the function that contains the address
/// (the last, outermost frame) is: whatever was inlined into `__rust_alloc` or the
/// wrapper is machinery too, even where debug info gives inlined frames short names.
fn all_internal(symbols: &Symbols) -> bool {
    symbols
        .last()
        .is_some_and(|f| is_internal_function(&f.name))
}

struct Builder {
    mappings: Vec<MappingInfo>,
    locations: Vec<Location>,
    location_index: HashMap<ReturnAddress, usize>,
    functions: Vec<Function>,
    function_index: HashMap<Function, usize>,
}

impl Builder {
    fn location(&mut self, ret: ReturnAddress, symbols: Option<&Symbols>) -> usize {
        if let Some(&i) = self.location_index.get(&ret) {
            return i;
        }
        let address = ret.lookup();
        let frames: Vec<SymbolFrame> = match symbols {
            Some(s) => {
                // Inside a kept location, drop inlined internal callees (for example
                // `alloc::alloc::alloc` inlined into `RawVec::grow`).
                let first = s
                    .iter()
                    .position(|f| !is_internal_function(&f.name))
                    .unwrap_or(0);
                s[first..].to_vec()
            }
            None if address.0 == OVERFLOW_ADDRESS => vec![SymbolFrame {
                name: OVERFLOW_FUNCTION.to_string(),
                system_name: OVERFLOW_FUNCTION.to_string(),
                file: String::new(),
                line: 0,
                symbol_address: None,
            }],
            None => Vec::new(),
        };
        let lines = frames
            .iter()
            .map(|f| Line {
                function: self.function(f),
                line: f.line,
            })
            .collect();
        let mapping = self
            .mappings
            .iter()
            .position(|m| (m.start..m.limit).contains(&(address.0 as u64)));
        let i = self.locations.len();
        self.locations.push(Location {
            address,
            mapping,
            lines,
            symbol_address: frames.last().and_then(|f| f.symbol_address),
        });
        self.location_index.insert(ret, i);
        i
    }

    fn function(&mut self, f: &SymbolFrame) -> usize {
        let key = Function {
            name: f.name.clone(),
            system_name: f.system_name.clone(),
            filename: f.file.clone(),
        };
        if let Some(&i) = self.function_index.get(&key) {
            return i;
        }
        let i = self.functions.len();
        self.functions.push(key.clone());
        self.function_index.insert(key, i);
        i
    }

    fn finish_mappings(&self) -> Vec<Mapping> {
        let mut flags = vec![[true; 3]; self.mappings.len()];
        for loc in &self.locations {
            if let Some(m) = loc.mapping {
                let f = &mut flags[m];
                f[0] &= !loc.lines.is_empty();
                f[1] &= !loc.lines.is_empty()
                    && loc
                        .lines
                        .iter()
                        .all(|l| !self.functions[l.function].filename.is_empty());
                f[2] &= !loc.lines.is_empty() && loc.lines.iter().all(|l| l.line > 0);
            }
        }
        self.mappings
            .iter()
            .zip(flags)
            .map(|(info, [functions, filenames, lines])| Mapping {
                info: info.clone(),
                has_functions: functions,
                has_filenames: filenames,
                has_line_numbers: lines,
                has_inline_frames: lines,
            })
            .collect()
    }
}

impl Profile {
    /// Folded stacks (`root;…;leaf value`, inline frames expanded) for one sample type,
    /// skipping zero values; the input of flame-graph renderers. A `;` inside a function
    /// name is written as `；` (U+FF1B) so that it cannot split a frame.
    pub fn folded(&self, t: SampleType) -> Vec<(String, i64)> {
        let _mark = ReentrancyGuard::enter();
        let mut out: BTreeMap<String, i64> = BTreeMap::new();
        for s in &self.samples {
            let v = s.value(t);
            if v == 0 {
                continue;
            }
            let mut names: Vec<std::borrow::Cow<'_, str>> = Vec::new();
            for &l in s.locations.iter().rev() {
                let loc = &self.locations[l];
                if loc.lines.is_empty() {
                    names.push("??".into());
                }
                for line in loc.lines.iter().rev() {
                    // `;` separates frames in the folded format, and Rust names can
                    // contain it (`<[u8; 32] as Trait>`): write those as a full-width `；`.
                    let name = &self.functions[line.function].name;
                    names.push(if name.contains(';') {
                        name.replace(';', "\u{FF1B}").into()
                    } else {
                        name.as_str().into()
                    });
                }
            }
            *out.entry(names.join(";")).or_default() += v;
        }
        out.into_iter().collect()
    }

    /// Sum of one sample type over all samples.
    pub fn total(&self, t: SampleType) -> i64 {
        self.samples.iter().map(|s| s.value(t)).sum()
    }
}
