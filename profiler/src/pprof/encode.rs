//! [`Profile`] → `profile.proto`, gzipped, exactly as PPROF.md describes Go's heap
//! profile: four sample types, `space`/`bytes` period, a `bytes` label, ids 1..N.

use super::proto;
use crate::guard::ReentrancyGuard;
use crate::profile::{Profile, ProfileKind, SampleType};
use std::collections::HashMap;
use std::io::Write;
use std::time::UNIX_EPOCH;

/// Encodes and gzips `profile` as the `kind` profile.
pub fn encode(profile: &Profile, kind: ProfileKind) -> Vec<u8> {
    let _mark = ReentrancyGuard::enter();
    let raw = encode_uncompressed(profile, kind);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// Encodes `profile` as the `kind` profile, without gzip.
pub fn encode_uncompressed(profile: &Profile, kind: ProfileKind) -> Vec<u8> {
    let _mark = ReentrancyGuard::enter();
    prost::Message::encode_to_vec(&to_proto(profile, kind))
}

/// The `string_table`: index 0 is "", each string once.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// Builds the message. Ids of mappings, locations and functions are 1..N in the order
/// of the model's vectors, which is deterministic.
pub fn to_proto(profile: &Profile, kind: ProfileKind) -> proto::Profile {
    let mut st = Strings::new();
    let sample_type: Vec<proto::ValueType> = SampleType::ALL
        .iter()
        .map(|t| proto::ValueType {
            r#type: st.get(t.name()),
            unit: st.get(t.unit()),
        })
        .collect();
    let bytes_key = st.get("bytes");
    let sample = profile
        .samples
        .iter()
        .map(|s| proto::Sample {
            location_id: s.locations.iter().map(|&l| l as u64 + 1).collect(),
            value: s.values().to_vec(),
            label: vec![proto::Label {
                key: bytes_key,
                str: 0,
                num: s.object_size(),
                num_unit: 0,
            }],
        })
        .collect();
    let mapping = profile
        .mappings
        .iter()
        .enumerate()
        .map(|(i, m)| proto::Mapping {
            id: i as u64 + 1,
            memory_start: m.info.start,
            memory_limit: m.info.limit,
            file_offset: m.info.offset,
            filename: st.get(&m.info.path),
            build_id: st.get(&m.info.build_id),
            has_functions: m.has_functions,
            has_filenames: m.has_filenames,
            has_line_numbers: m.has_line_numbers,
            has_inline_frames: m.has_inline_frames,
        })
        .collect();
    let location = profile
        .locations
        .iter()
        .enumerate()
        .map(|(i, l)| proto::Location {
            id: i as u64 + 1,
            mapping_id: l.mapping.map_or(0, |m| m as u64 + 1),
            address: l.address.0 as u64,
            line: l
                .lines
                .iter()
                .map(|line| proto::Line {
                    function_id: line.function as u64 + 1,
                    line: i64::from(line.line),
                    column: 0,
                })
                .collect(),
            is_folded: false,
        })
        .collect();
    let function = profile
        .functions
        .iter()
        .enumerate()
        .map(|(i, f)| proto::Function {
            id: i as u64 + 1,
            name: st.get(&f.name),
            system_name: st.get(&f.system_name),
            filename: st.get(&f.filename),
            start_line: 0,
        })
        .collect();
    let period_type = Some(proto::ValueType {
        r#type: st.get("space"),
        unit: st.get("bytes"),
    });
    let default_sample_type = match kind {
        // Unset: pprof then shows the last sample type, inuse_space (as Go's heap).
        ProfileKind::Heap => 0,
        ProfileKind::Allocs => st.get(SampleType::AllocSpace.name()),
    };
    proto::Profile {
        sample_type,
        sample,
        mapping,
        location,
        function,
        string_table: std::mem::take(&mut st.table),
        drop_frames: 0,
        keep_frames: 0,
        time_nanos: profile
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: profile.duration.map_or(0, |d| d.as_nanos() as i64),
        period_type,
        period: profile.sample_rate as i64,
        comment: Vec::new(),
        default_sample_type,
    }
}
