//! Caption utilities: the text side of augmentation (left/right swap), LViT caption
//! parsing, the built-in radiology rewriter and auxiliary prompt sources for DATE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Swaps the whole words "left" and "right" (any case, case pattern kept: "Left" ->
/// "Right", "LEFT" -> "RIGHT"); everything else, including "bilateral"/"unilateral" and
/// words that merely contain "left"/"right", is untouched. This is the text half of a
/// horizontal flip.
pub fn swap_left_right(caption: &str) -> String {
    let mut out = String::with_capacity(caption.len() + 4);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if !word.is_empty() {
            out.push_str(&swap_word(word));
            word.clear();
        }
    };
    for ch in caption.chars() {
        if ch.is_alphabetic() {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn swap_word(w: &str) -> String {
    let lower = w.to_lowercase();
    let target = match lower.as_str() {
        "left" => "right",
        "right" => "left",
        _ => return w.to_string(),
    };
    if w.chars().all(|c| c.is_uppercase()) {
        target.to_uppercase()
    } else if w.chars().next().is_some_and(|c| c.is_uppercase()) {
        let mut s = target.to_string();
        s[..1].make_ascii_uppercase();
        s
    } else {
        target.to_string()
    }
}

/// A lung zone of LViT captions (top to bottom on a chest X-ray).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Zone {
    /// "upper"
    Upper,
    /// "middle"
    Middle,
    /// "lower"
    Lower,
}

impl Zone {
    /// All zones, top to bottom.
    pub const ALL: [Zone; 3] = [Zone::Upper, Zone::Middle, Zone::Lower];
    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Zone::Upper => "upper",
            Zone::Middle => "middle",
            Zone::Lower => "lower",
        }
    }
    fn report_word(self) -> &'static str {
        match self {
            Zone::Upper => "upper",
            Zone::Middle => "mid",
            Zone::Lower => "lower",
        }
    }
}

/// The content of an LViT-style caption such as "bilateral pulmonary infection, two
/// infected areas, upper left lung and middle right lung.".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LvitCaption {
    /// Number of infected areas.
    pub areas: usize,
    /// Zones named for the patient's left lung.
    pub left: Vec<Zone>,
    /// Zones named for the patient's right lung.
    pub right: Vec<Zone>,
}

const NUMBERS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

impl LvitCaption {
    /// Parses an LViT caption; `None` if it does not follow the pattern.
    pub fn parse(caption: &str) -> Option<Self> {
        let c = caption.trim().trim_end_matches('.').to_lowercase();
        let parts: Vec<&str> = c.split(',').map(str::trim).collect();
        if parts.len() != 3 || !parts[0].ends_with("pulmonary infection") {
            return None;
        }
        let mut w = parts[1].split_whitespace();
        let n = w.next()?;
        let areas = NUMBERS
            .iter()
            .position(|x| *x == n)
            .or_else(|| n.parse().ok())?;
        let mut out = LvitCaption {
            areas,
            ..Default::default()
        };
        for seg in parts[2].split(" and ") {
            let words: Vec<&str> = seg.split_whitespace().collect();
            if words.len() < 3 || *words.last()? != "lung" {
                return None;
            }
            let side = words[words.len() - 2];
            let zones: Option<Vec<Zone>> = words[..words.len() - 2]
                .iter()
                .map(|z| Zone::ALL.iter().copied().find(|x| x.word() == *z))
                .collect();
            match side {
                "left" => out.left.extend(zones?),
                "right" => out.right.extend(zones?),
                _ => return None,
            }
        }
        Some(out)
    }

    /// Writes the caption back in LViT's format (left lung first, zones top to bottom).
    pub fn to_caption(&self) -> String {
        let lat = if !self.left.is_empty() && !self.right.is_empty() {
            "bilateral"
        } else {
            "unilateral"
        };
        let n = NUMBERS
            .get(self.areas)
            .map(|s| s.to_string())
            .unwrap_or(self.areas.to_string());
        let area = if self.areas == 1 { "area" } else { "areas" };
        let side = |zones: &[Zone], name: &str| {
            let mut z = zones.to_vec();
            z.sort();
            z.dedup();
            let words: Vec<&str> = z.iter().map(|z| z.word()).collect();
            format!("{} {name} lung", words.join(" "))
        };
        let mut sides = Vec::new();
        if !self.left.is_empty() {
            sides.push(side(&self.left, "left"));
        }
        if !self.right.is_empty() {
            sides.push(side(&self.right, "right"));
        }
        format!(
            "{lat} pulmonary infection, {n} infected {area}, {}.",
            sides.join(" and ")
        )
    }
}

/// The built-in, deterministic radiology rewriter: turns an LViT-style caption into
/// report language (laterality, extent, zones), e.g. "bilateral pulmonary infection, two
/// infected areas, upper left lung and middle right lung." -> "Chest X-ray with bilateral
/// multifocal opacities in the left upper zone and right mid zone.".
///
/// It is a template, not a language model: it adds no knowledge beyond the caption, only
/// a second phrasing in the register of radiology reports. Captions that do not parse
/// are returned as `"{modality} findings: {caption}"`.
pub fn radiology_rewrite(caption: &str, modality: &str) -> String {
    let Some(p) = LvitCaption::parse(caption) else {
        return format!("{modality} findings: {}", caption.trim());
    };
    let lat = match (p.left.is_empty(), p.right.is_empty()) {
        (false, false) => "bilateral ",
        _ => "",
    };
    let what = if p.areas <= 1 {
        "a focal opacity".to_string()
    } else {
        format!("{lat}multifocal opacities")
    };
    let what = if p.areas <= 1 && !lat.is_empty() {
        format!("{lat}opacities")
    } else {
        what
    };
    let side = |zones: &[Zone], name: &str| -> String {
        let mut z = zones.to_vec();
        z.sort();
        z.dedup();
        let w: Vec<&str> = z.iter().map(|z| z.report_word()).collect();
        match w.len() {
            1 => format!("{name} {} zone", w[0]),
            _ => format!(
                "{name} {} and {} zones",
                w[..w.len() - 1].join(", "),
                w[w.len() - 1]
            ),
        }
    };
    let mut locs = Vec::new();
    if !p.left.is_empty() {
        locs.push(side(&p.left, "left"));
    }
    if !p.right.is_empty() {
        locs.push(side(&p.right, "right"));
    }
    format!("{modality} with {what} in the {}.", locs.join(" and "))
}

/// Where the auxiliary prompt T_a of DATE comes from.
#[derive(Debug, Clone, Default)]
pub enum AuxPromptSource {
    /// No auxiliary prompt (`Sample::aux_caption` is `None`; the loader then repeats the
    /// caption).
    #[default]
    None,
    /// A column of the dataset's own text table (LViT folders), by name.
    Column(String),
    /// A caption -> auxiliary prompt map, e.g. loaded from a side file written once by an
    /// LLM ([`AuxPromptSource::from_side_file`]). Lookups of unknown captions are errors.
    Map {
        /// The file the map came from (for error messages).
        path: PathBuf,
        /// caption -> auxiliary prompt.
        map: HashMap<String, String>,
    },
    /// The built-in [`radiology_rewrite`] with the given modality ("Chest X-ray", "Chest CT").
    Rewriter(String),
}

impl AuxPromptSource {
    /// Loads a side file keyed by caption: CSV with columns `caption` and `aux` (header
    /// required), or JSONL (`.jsonl`) with one `{"caption": ..., "aux": ...}` per line.
    pub fn from_side_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut map = HashMap::new();
        let is_jsonl = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        if is_jsonl {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for (ln, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::file(path, format!("line {}: {e}", ln + 1)))?;
                let get = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            Error::file(
                                path,
                                format!("line {}: missing string field {k:?}", ln + 1),
                            )
                        })
                };
                map.insert(get("caption")?, get("aux")?);
            }
        } else {
            let table = read_csv_table(path)?;
            let ci = table.column(path, "caption")?;
            let ai = table.column(path, "aux")?;
            for row in &table.rows {
                map.insert(row[ci].clone(), row[ai].clone());
            }
        }
        Ok(AuxPromptSource::Map {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The auxiliary prompt for `caption`. `column_value` is the row's value of the
    /// configured column (datasets with a text table pass it).
    pub fn lookup(&self, caption: &str, column_value: Option<&str>) -> Result<Option<String>> {
        Ok(match self {
            AuxPromptSource::None => None,
            AuxPromptSource::Column(c) => Some(
                column_value
                    .ok_or_else(|| Error::Msg(format!("aux prompt column {c:?} not available")))?
                    .to_string(),
            ),
            AuxPromptSource::Map { path, map } => Some(
                map.get(caption)
                    .or_else(|| map.get(caption.trim()))
                    .ok_or_else(|| {
                        Error::file(path, format!("no auxiliary prompt for caption {caption:?}"))
                    })?
                    .clone(),
            ),
            AuxPromptSource::Rewriter(m) => Some(radiology_rewrite(caption, m)),
        })
    }
}

/// Reads an LViT text table (`.csv` or `.xlsx`/`.xls`) and returns its `(Image,
/// Description)` rows, trimmed. Errors name the file (unreadable, missing column).
pub fn read_captions(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let t = read_table(path)?;
    let ic = t.column(path, "Image")?;
    let dc = t.column(path, "Description")?;
    Ok(t.rows
        .iter()
        .map(|r| {
            let c = |i: usize| r.get(i).map(|s| s.trim().to_string()).unwrap_or_default();
            (c(ic), c(dc))
        })
        .collect())
}

pub(crate) fn read_table(path: &Path) -> Result<Table> {
    let is_xlsx = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("xlsx") || e.eq_ignore_ascii_case("xls"));
    if is_xlsx {
        read_xlsx_table(path)
    } else {
        read_csv_table(path)
    }
}

/// A text table (header + rows), from CSV or XLSX.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn column(&self, path: &Path, name: &str) -> Result<usize> {
        self.header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::file(
                    path,
                    format!("missing column {name:?} (found columns {:?})", self.header),
                )
            })
    }
}

pub(crate) fn read_csv_table(path: &Path) -> Result<Table> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::file(path, format!("cannot read CSV: {e}")))?;
    let header = rdr
        .headers()
        .map_err(|e| Error::file(path, format!("cannot read CSV header: {e}")))?
        .iter()
        .map(|s| s.trim_start_matches('\u{feff}').to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, r) in rdr.records().enumerate() {
        let r = r.map_err(|e| Error::file(path, format!("CSV row {}: {e}", i + 2)))?;
        rows.push(r.iter().map(str::to_string).collect());
    }
    Ok(Table { header, rows })
}

pub(crate) fn read_xlsx_table(path: &Path) -> Result<Table> {
    use calamine::Reader;
    let mut wb = calamine::open_workbook_auto(path)
        .map_err(|e| Error::file(path, format!("cannot open workbook: {e}")))?;
    let sheet = wb
        .sheet_names()
        .first()
        .cloned()
        .ok_or_else(|| Error::file(path, "workbook has no sheets"))?;
    let range = wb
        .worksheet_range(&sheet)
        .map_err(|e| Error::file(path, format!("cannot read sheet {sheet:?}: {e}")))?;
    let mut it = range.rows();
    let header: Vec<String> = it
        .next()
        .ok_or_else(|| Error::file(path, "empty sheet"))?
        .iter()
        .map(|c| c.to_string())
        .collect();
    let rows = it
        .map(|r| r.iter().map(|c| c.to_string()).collect::<Vec<_>>())
        .filter(|r: &Vec<String>| r.iter().any(|c| !c.trim().is_empty()))
        .collect();
    Ok(Table { header, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_keeps_case_and_other_words() {
        assert_eq!(
            swap_left_right("bilateral infection, upper Left lung and LEFT-right x leftover."),
            "bilateral infection, upper Right lung and RIGHT-left x leftover."
        );
    }

    #[test]
    fn rewriter_example_from_the_brief() {
        assert_eq!(
            radiology_rewrite(
                "bilateral pulmonary infection, two infected areas, upper left lung and middle right lung.",
                "Chest X-ray"
            ),
            "Chest X-ray with bilateral multifocal opacities in the left upper zone and right mid zone."
        );
        assert_eq!(
            radiology_rewrite(
                "unilateral pulmonary infection, one infected area, lower right lung.",
                "Chest X-ray"
            ),
            "Chest X-ray with a focal opacity in the right lower zone."
        );
        assert_eq!(
            radiology_rewrite(
                "bilateral pulmonary infection, five infected areas, upper middle lower left lung and middle lower right lung.",
                "Chest X-ray"
            ),
            "Chest X-ray with bilateral multifocal opacities in the left upper, mid and lower zones and right mid and lower zones."
        );
    }

    #[test]
    fn caption_parse_roundtrip() {
        let c = "bilateral pulmonary infection, three infected areas, upper lower left lung and lower right lung.";
        let p = LvitCaption::parse(c).unwrap();
        assert_eq!(p.areas, 3);
        assert_eq!(p.left, vec![Zone::Upper, Zone::Lower]);
        assert_eq!(p.right, vec![Zone::Lower]);
        assert_eq!(p.to_caption(), c);
        assert!(LvitCaption::parse("spleen").is_none());
    }
}
