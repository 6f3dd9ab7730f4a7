//! LViT-layout folders: QaTa-COV19, MosMedData+ and any dataset laid out the same way.
//!
//! ```text
//! root/
//!   Train_Folder/ img/*.png  labelcol/*.png  Train_text.csv (or .xlsx)
//!   Val_Folder/   ...                          Val_text.csv
//!   Test_Folder/  ...                          Test_text.csv
//! ```
//! The text table has the columns `Image` (the mask file name) and `Description` (the
//! caption). The image of mask `mask_X.png` is `img/X.png` (QaTa) or, when that does not
//! exist, `img/mask_X.png` (MosMedData+ uses the same name); this is detected per row.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::sample::{ImageF32, Mask, Sample, SegDataset};
use crate::text::{read_table, AuxPromptSource};
use crate::{Error, Result};

/// A split of an LViT-layout dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// `Train_Folder`
    Train,
    /// `Val_Folder`
    Val,
    /// `Test_Folder`
    Test,
}

impl Split {
    /// "Train", "Val" or "Test".
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "Train",
            Split::Val => "Val",
            Split::Test => "Test",
        }
    }
}

/// Options of [`LvitDataset::open_with`].
#[derive(Debug, Clone, Default)]
pub struct LvitOptions {
    /// Source of the auxiliary prompt. `None` here means "automatic": the built-in rewriter
    /// with modality "Chest CT" when the root folder name contains "mosmed", else
    /// "Chest X-ray".
    pub aux: Option<AuxPromptSource>,
    /// Use this text table instead of looking for `<Split>_text.{csv,xlsx}`.
    pub text_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    image: PathBuf,
    mask: PathBuf,
    caption: String,
    aux: Option<String>,
}

/// A dataset in LViT folder layout (see the module docs).
#[derive(Debug, Clone)]
pub struct LvitDataset {
    name: String,
    text_file: PathBuf,
    entries: Vec<Entry>,
}

impl LvitDataset {
    /// Opens `root/<Split>_Folder` with default options. Reads the text table and checks
    /// that every row has a non-empty caption, a mask file and an image file (no decoding).
    pub fn open(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        Self::open_with(root, split, LvitOptions::default())
    }

    /// Opens with explicit options.
    pub fn open_with(root: impl AsRef<Path>, split: Split, opts: LvitOptions) -> Result<Self> {
        let root = root.as_ref();
        let folder = root.join(format!("{}_Folder", split.as_str()));
        if !folder.is_dir() {
            return Err(Error::file(&folder, "split folder not found"));
        }
        let text_file = match opts.text_file {
            Some(p) => p,
            None => find_text_file(root, &folder, split)?,
        };
        let table = read_table(&text_file)?;
        let ic = table.column(&text_file, "Image")?;
        let dc = table.column(&text_file, "Description")?;
        let aux = opts.aux.unwrap_or_else(|| {
            let n = root.to_string_lossy().to_lowercase();
            AuxPromptSource::Rewriter(
                if n.contains("mosmed") {
                    "Chest CT"
                } else {
                    "Chest X-ray"
                }
                .into(),
            )
        });
        let aux_col = match &aux {
            AuxPromptSource::Column(c) => Some(table.column(&text_file, c)?),
            _ => None,
        };
        let img_dir = folder.join("img");
        let mask_dir = folder.join("labelcol");
        let mut entries = Vec::with_capacity(table.rows.len());
        for (r, row) in table.rows.iter().enumerate() {
            let cell = |c: usize| row.get(c).map(|s| s.trim()).unwrap_or("");
            let mask_name = cell(ic);
            let caption = cell(dc);
            let line = r + 2;
            if mask_name.is_empty() {
                return Err(Error::file(
                    &text_file,
                    format!("row {line}: empty Image cell"),
                ));
            }
            if caption.is_empty() {
                return Err(Error::file(
                    &text_file,
                    format!("row {line}: empty caption for {mask_name}"),
                ));
            }
            let mask = mask_dir.join(mask_name);
            if !mask.is_file() {
                return Err(Error::file(
                    &mask,
                    format!(
                        "missing mask (listed in {} row {line})",
                        text_file.display()
                    ),
                ));
            }
            let stripped = mask_name.strip_prefix("mask_").unwrap_or(mask_name);
            let image = [img_dir.join(stripped), img_dir.join(mask_name)]
                .into_iter()
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::file(
                        img_dir.join(stripped),
                        format!("missing image for mask {mask_name} (also tried the same name)"),
                    )
                })?;
            let aux_caption = aux
                .lookup(caption, aux_col.map(cell))
                .map_err(|e| match e {
                    Error::Msg(m) => Error::file(&text_file, format!("row {line}: {m}")),
                    e => e,
                })?;
            entries.push(Entry {
                id: image
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                image,
                mask,
                caption: caption.to_string(),
                aux: aux_caption,
            });
        }
        let base = root
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lvit".into());
        Ok(Self {
            name: format!("{base}/{}", split.as_str()),
            text_file,
            entries,
        })
    }

    /// The text table that was read.
    pub fn text_file(&self) -> &Path {
        &self.text_file
    }

    /// The (image, mask) paths of sample `i`.
    pub fn paths(&self, i: usize) -> Option<(&Path, &Path)> {
        self.entries
            .get(i)
            .map(|e| (e.image.as_path(), e.mask.as_path()))
    }

    /// The caption of sample `i` without decoding anything.
    pub fn caption(&self, i: usize) -> Option<&str> {
        self.entries.get(i).map(|e| e.caption.as_str())
    }

    /// Checks every image/mask pair from the PNG headers only (in parallel): both readable
    /// and of the same size. Returns the per-sample (height, width).
    pub fn validate(&self) -> Result<Vec<(usize, usize)>> {
        self.entries
            .par_iter()
            .map(|e| {
                let (iw, ih) = dims(&e.image)?;
                let (mw, mh) = dims(&e.mask)?;
                if (iw, ih) != (mw, mh) {
                    return Err(Error::file(
                        &e.mask,
                        format!(
                            "size mismatch: mask {mw}x{mh}, image {} {iw}x{ih}",
                            e.image.display()
                        ),
                    ));
                }
                Ok((ih as usize, iw as usize))
            })
            .collect()
    }
}

fn dims(p: &Path) -> Result<(u32, u32)> {
    image::ImageReader::open(p)
        .map_err(|e| Error::io(p, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(p, e))?
        .into_dimensions()
        .map_err(|e| Error::file(p, format!("unreadable image header: {e}")))
}

fn find_text_file(root: &Path, folder: &Path, split: Split) -> Result<PathBuf> {
    let s = split.as_str();
    for dir in [folder, root] {
        for ext in ["csv", "xlsx"] {
            let p = dir.join(format!("{s}_text.{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    // Any "*<Split>_text.*" (e.g. MoNuSeg_Train_text.xlsx) in the folder or the root.
    for dir in [folder, root] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().to_lowercase());
                    n.is_some_and(|n| {
                        n.contains(&format!("{}_text.", s.to_lowercase()))
                            && (n.ends_with(".csv") || n.ends_with(".xlsx"))
                    })
                })
                .collect();
            found.sort();
            if let Some(p) = found.into_iter().next() {
                return Ok(p);
            }
        }
    }
    Err(Error::file(
        folder,
        format!("no {s}_text.csv or {s}_text.xlsx found"),
    ))
}

/// Decodes an image file to C x H x W in [0, 1]: grey (8/16 bit) stays 1 channel, colour
/// images whose channels are all equal become 1 channel, others 3 channels (alpha dropped).
pub fn read_image(path: &Path) -> Result<ImageF32> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    use image::DynamicImage as D;
    Ok(match img {
        D::ImageLuma8(g) => ImageF32 {
            channels: 1,
            height: h,
            width: w,
            data: g.into_raw().into_iter().map(|v| v as f32 / 255.0).collect(),
        },
        D::ImageLuma16(g) => ImageF32 {
            channels: 1,
            height: h,
            width: w,
            data: g
                .into_raw()
                .into_iter()
                .map(|v| v as f32 / 65535.0)
                .collect(),
        },
        other => {
            let rgb = other.to_rgb8().into_raw();
            let grey = rgb.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]);
            if grey {
                ImageF32 {
                    channels: 1,
                    height: h,
                    width: w,
                    data: rgb.chunks_exact(3).map(|p| p[0] as f32 / 255.0).collect(),
                }
            } else {
                let mut data = vec![0f32; 3 * h * w];
                for (i, p) in rgb.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        data[c * h * w + i] = p[c] as f32 / 255.0;
                    }
                }
                ImageF32 {
                    channels: 3,
                    height: h,
                    width: w,
                    data,
                }
            }
        }
    })
}

/// Decodes a mask file and binarises it: a pixel is foreground when any channel is > 0.
pub fn read_mask(path: &Path) -> Result<Mask> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match img {
        image::DynamicImage::ImageLuma8(g) => {
            g.into_raw().into_iter().map(|v| (v > 0) as u8).collect()
        }
        other => other
            .to_rgb16()
            .into_raw()
            .chunks_exact(3)
            .map(|p| (p.iter().any(|&v| v > 0)) as u8)
            .collect(),
    };
    Ok(Mask {
        height: h,
        width: w,
        data,
    })
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::file(path, format!("unreadable image: {e}")))
}

impl SegDataset for LvitDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let e = self
            .entries
            .get(i)
            .ok_or_else(|| Error::Msg(format!("{}: index {i} out of range", self.name)))?;
        let image = read_image(&e.image)?;
        let mask = read_mask(&e.mask)?;
        if (image.height, image.width) != (mask.height, mask.width) {
            return Err(Error::file(
                &e.mask,
                format!(
                    "size mismatch: mask {}x{}, image {} {}x{}",
                    mask.width,
                    mask.height,
                    e.image.display(),
                    image.width,
                    image.height
                ),
            ));
        }
        Ok(Sample {
            id: e.id.clone(),
            image,
            mask,
            caption: e.caption.clone(),
            aux_caption: e.aux.clone(),
        })
    }
}
