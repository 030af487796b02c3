//! Executable mappings of the process and their GNU build IDs, for the profile's
//! `Mapping` messages: so a profile can be symbolized offline against the right binary.
//!
//! The mapping list comes from `/proc/self/maps` (every executable mapping); build IDs
//! from the `NT_GNU_BUILD_ID` notes of the mapped files, read from disk (see
//! [`build_id_of_file`] for why not through the loader). Runs at export time only.

use std::collections::HashMap;

/// One executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub limit: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Path of the mapped file, or a pseudo-name such as `[vdso]`.
    pub path: String,
    /// GNU build ID as lower-case hex, empty when the object has none.
    pub build_id: String,
}

/// The executable mappings of this process, in address order.
pub fn executable_mappings() -> Vec<MappingInfo> {
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut out = executable_ranges();
    for m in out.iter_mut().filter(|m| m.path.starts_with('/')) {
        m.build_id = ids
            .entry(m.path.clone())
            .or_insert_with(|| build_id_of_file(&m.path).unwrap_or_default())
            .clone();
    }
    out
}

/// The executable mappings in address order, without build IDs (no file is opened).
pub(crate) fn executable_ranges() -> Vec<MappingInfo> {
    let text = match std::fs::read_to_string("/proc/self/maps") {
        Ok(t) => t,
        Err(_) => return Vec::new(),
    };
    let mut out: Vec<MappingInfo> = text.lines().filter_map(parse_maps_line).collect();
    out.sort_by_key(|m| m.start);
    out
}

/// Parses an executable line of `/proc/self/maps`:
/// `start-limit perms offset dev inode [path]`.
fn parse_maps_line(line: &str) -> Option<MappingInfo> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let _dev = it.next()?;
    let _inode = it.next()?;
    let path = it.next().unwrap_or("").trim().to_string();
    if !perms.contains('x') {
        return None;
    }
    let (start, limit) = range.split_once('-')?;
    Some(MappingInfo {
        start: u64::from_str_radix(start, 16).ok()?,
        limit: u64::from_str_radix(limit, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        path,
        build_id: String::new(),
    })
}

/// The GNU build ID of the ELF file at `path`, read from its `PT_NOTE` segments on disk.
///
/// Deliberately not through `dl_iterate_phdr`: that takes the dynamic loader's lock, and
/// the child of a `fork` made while another thread held it (exporting, or unwinding
/// through libgcc) would wait for it forever. Reading the file takes no lock.
pub fn build_id_of_file(path: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut ehdr = [0u8; 64];
    f.read_exact(&mut ehdr).ok()?;
    // ELF64, little-endian: the only layout the platforms we build for use.
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u64;
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 || phnum > 4096 {
        return None;
    }
    let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff)).ok()?;
    f.read_exact(&mut phdrs).ok()?;
    for ph in phdrs.chunks_exact(phentsize as usize) {
        if u32_at(ph, 0) != libc::PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(ph, 8), u64_at(ph, 32));
        if size == 0 || size > 1 << 20 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).ok()?;
        if f.read_exact(&mut notes).is_err() {
            continue;
        }
        if let Some(id) = find_gnu_build_id(&notes) {
            return Some(id);
        }
    }
    None
}

/// Finds the `NT_GNU_BUILD_ID` note in an ELF note segment; hex of its descriptor.
pub(crate) fn find_gnu_build_id(mut notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let word =
            |i: usize| u32::from_ne_bytes([notes[i], notes[i + 1], notes[i + 2], notes[i + 3]]);
        let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
        let name_end = 12 + align4(namesz);
        let desc_end = name_end.checked_add(align4(descsz))?;
        if desc_end > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && &notes[12..12 + namesz] == b"GNU\0" {
            let desc = &notes[name_end..name_end + descsz];
            return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        notes = &notes[desc_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let m = parse_maps_line(
            "55d0c0a00000-55d0c0b00000 r-xp 00021000 08:01 1234    /usr/bin/my service",
        )
        .unwrap();
        assert_eq!(
            (m.start, m.limit, m.offset),
            (0x55d0c0a00000, 0x55d0c0b00000, 0x21000)
        );
        assert_eq!(m.path, "/usr/bin/my service");
        assert!(parse_maps_line("7f00-7f10 r--p 00000000 00:00 0").is_none());
    }

    #[test]
    fn this_binary_has_a_build_id() {
        let maps = executable_mappings();
        let exe = std::fs::read_link("/proc/self/exe")
            .unwrap()
            .display()
            .to_string();
        let main = maps.iter().find(|m| m.path == exe).expect("main mapping");
        assert!(main.build_id.len() >= 16, "build id {:?}", main.build_id);
        assert!(main.build_id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
