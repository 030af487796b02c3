//! `?format=svg`: an interactive flame graph of one sample type, rendered in-process by
//! inferno from [`Profile::folded`].

use allocprof_core::{Profile, ProfileKind, SampleType};
use inferno::flamegraph::{self, color::BasicPalette, Options, Palette};

/// Renders `profile` as an SVG flame graph of `sample_type`. Titled `PROFILE profile:
/// SAMPLE_TYPE`, with the total and the sampling rate in the subtitle. Negative values
/// (in-use values of a delta profile can be negative) cannot be drawn as widths and are
/// left out; the subtitle says how much was left out. Allocates; runs off the executor.
pub(crate) fn render(
    profile: &Profile,
    kind: ProfileKind,
    sample_type: SampleType,
) -> Result<Vec<u8>, String> {
    let folded = profile.folded(sample_type);
    let lines: Vec<String> = folded
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(stack, v)| format!("{stack} {v}"))
        .collect();
    let negative: i64 = folded.iter().map(|(_, v)| *v).filter(|v| *v < 0).sum();
    let total = profile.total(sample_type);
    let delta = match profile.duration {
        Some(d) => format!("delta over {:.1} s, ", d.as_secs_f64()),
        None => String::new(),
    };
    let unit = sample_type.unit();
    let mut subtitle = format!(
        "{delta}total {total} {unit}, sampling one per {} bytes allocated (allocprof)",
        profile.sample_rate
    );
    if negative < 0 {
        subtitle.push_str(&format!("; {negative} {unit} of decreases not drawn"));
    }
    let title = format!("{} profile: {}", kind.name(), sample_type.name());
    if lines.is_empty() {
        return Ok(empty_svg(&title, &subtitle).into_bytes());
    }

    let mut opt = Options::default();
    opt.title = title;
    opt.subtitle = Some(subtitle);
    opt.colors = Palette::Basic(BasicPalette::Mem);
    opt.count_name = unit.to_string();
    opt.name_type = "Function:".to_string();
    opt.hash = true;
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut svg)
        .map_err(|e| format!("rendering flame graph: {e}"))?;
    Ok(svg)
}

/// A small SVG that says there is nothing to draw (inferno refuses empty input).
fn empty_svg(title: &str, subtitle: &str) -> String {
    format!(
        concat!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n",
            "<svg version=\"1.1\" width=\"1200\" height=\"90\" xmlns=\"http://www.w3.org/2000/svg\">\n",
            "<text x=\"600\" y=\"24\" font-size=\"17\" text-anchor=\"middle\">{}</text>\n",
            "<text x=\"600\" y=\"48\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n",
            "<text x=\"600\" y=\"72\" font-size=\"12\" text-anchor=\"middle\">no samples to draw</text>\n",
            "</svg>\n"
        ),
        escape(title),
        escape(subtitle)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
