//! Executable mappings of the process and their GNU build IDs, for the profile's
//! `Mapping` messages: so a profile can be symbolized offline against the right binary.
//!
//! The mapping list comes from `/proc/self/maps` (every executable mapping); build IDs
//! from the `NT_GNU_BUILD_ID` notes of the loaded objects, read in memory through
//! `dl_iterate_phdr` (no file I/O). Runs at export time only.

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
    let text = match std::fs::read_to_string("/proc/self/maps") {
        Ok(t) => t,
        Err(_) => return Vec::new(),
    };
    let ids = build_ids();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut out: Vec<MappingInfo> = text
        .lines()
        .filter_map(parse_maps_line)
        .map(|mut m| {
            let key = if m.path == exe { "" } else { m.path.as_str() };
            m.build_id = ids.get(key).cloned().unwrap_or_default();
            m
        })
        .collect();
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

/// Build IDs of loaded objects by `dlpi_name` ("" for the main executable).
fn build_ids() -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    unsafe extern "C" fn callback(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of the call, and
        // `data` is the `&mut HashMap` passed below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut HashMap<String, String>)) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: dlpi_phdr points to dlpi_phnum program headers of a loaded object.
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        for ph in phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
            let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
            // SAFETY: a PT_NOTE segment of a loaded object is mapped readable at
            // load base + p_vaddr for p_memsz bytes.
            let notes =
                unsafe { std::slice::from_raw_parts(start as *const u8, ph.p_memsz as usize) };
            if let Some(id) = find_gnu_build_id(notes) {
                out.insert(name.clone(), id);
                break;
            }
        }
        0
    }
    // SAFETY: the callback only reads loader data during the call and writes to `out`.
    unsafe {
        libc::dl_iterate_phdr(
            Some(callback),
            (&mut out as *mut HashMap<String, String>).cast(),
        );
    }
    out
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
