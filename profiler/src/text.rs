//! Go's legacy heap text format (`?debug=1`), which `go tool pprof` also parses.
//!
//! Values are the raw sample counts, as Go prints them; pprof un-samples them using the
//! `heap/2R` header (per record, from the record's average object size). Records whose
//! samples had mixed sizes are therefore estimated slightly differently from the
//! protobuf profile, whose estimates are weighted per sample (see [`crate::sampler`]).
//!
//! After the records come the exact totals as `# Name = value` lines (pprof ignores `#`
//! lines) and a `MAPPED_LIBRARIES:` section with the executable mappings, which pprof
//! reads to symbolize the addresses from the binaries on disk.

use crate::guard::ReentrancyGuard;
use crate::profile::Profile;
use std::fmt::Write;

/// Renders `profile` in the legacy text format, with the exact totals as `#` lines.
pub fn legacy_text(profile: &Profile) -> String {
    let _mark = ReentrancyGuard::enter();
    let mut out = String::new();
    let mut total = [0i64; 4];
    for s in &profile.samples {
        for (t, v) in total.iter_mut().zip(s.raw_values()) {
            *t += v;
        }
    }
    let [alloc_objects, mut alloc_bytes, inuse_objects, inuse_bytes] = total;
    // As newer Go: keep the header from reading as a two-column profile.
    if alloc_bytes == inuse_bytes {
        alloc_bytes += 1;
    }
    let _ = writeln!(
        out,
        "heap profile: {inuse_objects}: {inuse_bytes} [{alloc_objects}: {alloc_bytes}] @ heap/{}",
        profile.sample_rate.saturating_mul(2)
    );
    for s in &profile.samples {
        let [a, ab, i, ib] = s.raw_values();
        let _ = write!(out, "{i}: {ib} [{a}: {ab}] @");
        for &l in &s.locations {
            // The stack line carries return addresses (lookup + 1), as Go's does.
            let _ = write!(out, " {:#x}", profile.locations[l].address.0 + 1);
        }
        out.push('\n');
        for &l in &s.locations {
            let loc = &profile.locations[l];
            if loc.lines.is_empty() {
                let _ = writeln!(out, "#\t{:#x}", loc.address.0);
            }
            for line in &loc.lines {
                let f = &profile.functions[line.function];
                // The offset into the function, when the symbolizer knew where it starts.
                let off = match loc.symbol_address {
                    Some(start) if start < loc.address.0 => {
                        format!("+{:#x}", loc.address.0 - start)
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "#\t{:#x}\t{}{off}\t{}:{}",
                    loc.address.0, f.name, f.filename, line.line
                );
            }
        }
        out.push('\n');
    }
    out.push_str("\n# allocprof.Stats\n");
    for (name, value) in profile.stats.fields() {
        let _ = writeln!(out, "# {} = {value}", go_name(name));
    }
    // The executable mappings, in /proc/self/maps form after pprof's memory-map sentinel,
    // so that `go tool pprof` can symbolize the addresses from the binaries on disk.
    out.push_str("\nMAPPED_LIBRARIES:\n");
    for m in &profile.mappings {
        let _ = writeln!(
            out,
            "{:x}-{:x} r-xp {:08x} 00:00 0 {}",
            m.info.start, m.info.limit, m.info.offset, m.info.path
        );
    }
    out
}

/// `allocated_bytes` → `AllocatedBytes`, in the style of Go's `# runtime.MemStats` lines.
fn go_name(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}
