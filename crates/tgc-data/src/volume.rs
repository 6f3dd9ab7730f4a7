//! NIfTI volumes: reading, HU windowing, canonical axial slicing, datasets of slices with
//! one prompt per organ, and reassembly of slice predictions into a NIfTI volume.
//!
//! Orientation. The voxel-to-world affine is taken from the sform when `sform_code > 0`,
//! else from the qform quaternion when `qform_code > 0`, else `diag(pixdim)` (NIfTI's
//! "method 1"); world coordinates are RAS+ (NIfTI convention). Each voxel axis is assigned
//! to the world axis it is closest to (largest absolute direction cosine, a permutation;
//! the same idea as nibabel's `io_orientation`). Slices are then laid out in the
//! radiological display convention:
//! - slice index k runs inferior -> superior (+S),
//! - image rows run anterior -> posterior (anterior at the top),
//! - image columns run from the patient's right to the patient's left (the patient's
//!   right is on the image left, as a radiologist views an axial CT and a chest X-ray).
//!
//! This is a permutation and flips only, no resampling; obliquity is ignored (the
//! closest axes are used). In-plane pixels keep the volume's grid, so non-square slices
//! or anisotropic in-plane spacing are stretched by the loader's square resize.
//! [`VolumeAssembler`] inverts exactly this mapping and writes the source header back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nifti::{IntoNdArray, NiftiHeader, NiftiObject, ReaderOptions};
use serde::{Deserialize, Serialize};

use crate::sample::{ImageF32, Mask, Sample, SegDataset};
use crate::text::AuxPromptSource;
use crate::{Error, Result};

/// A CT intensity window in Hounsfield units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HuWindow {
    /// Window centre (level), HU.
    pub level: f32,
    /// Window width, HU.
    pub width: f32,
}

impl Default for HuWindow {
    /// The abdomen window: level 40, width 400 (-160 .. 240 HU).
    fn default() -> Self {
        Self {
            level: 40.0,
            width: 400.0,
        }
    }
}

impl HuWindow {
    /// Maps HU to [0, 1]: `clamp((hu - (level - width/2)) / width, 0, 1)`.
    #[inline]
    pub fn apply(&self, hu: f32) -> f32 {
        ((hu - (self.level - self.width / 2.0)) / self.width.max(1e-6)).clamp(0.0, 1.0)
    }
}

/// Voxel axes to display axes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orientation {
    /// For display axis d (0 = column, 1 = row, 2 = slice), the voxel axis it reads.
    pub perm: [usize; 3],
    /// For display axis d, whether the voxel axis is read backwards.
    pub flip: [bool; 3],
}

impl Orientation {
    /// From a voxel-to-RAS affine (3 x 3 linear part, rows = world x, y, z).
    pub fn from_affine(a: &[[f64; 4]; 4]) -> Self {
        // Greedy assignment: repeatedly take the largest |a[w][v]| among unused pairs.
        let mut used_w = [false; 3];
        let mut used_v = [false; 3];
        let mut world_of_voxel = [0usize; 3];
        let mut sign_of_voxel = [1.0f64; 3];
        for _ in 0..3 {
            let mut best = (0, 0, -1.0);
            for (w, row) in a.iter().take(3).enumerate() {
                for (v, &x) in row.iter().take(3).enumerate() {
                    if !used_w[w] && !used_v[v] && x.abs() > best.2 {
                        best = (w, v, x.abs());
                    }
                }
            }
            let (w, v, _) = best;
            used_w[w] = true;
            used_v[v] = true;
            world_of_voxel[v] = w;
            sign_of_voxel[v] = if a[w][v] < 0.0 { -1.0 } else { 1.0 };
        }
        // Display axes: column = -x (toward patient left), row = -y (toward posterior),
        // slice = +z (toward superior).
        let want = [(0usize, -1.0f64), (1, -1.0), (2, 1.0)];
        let mut perm = [0; 3];
        let mut flip = [false; 3];
        for (d, &(w, s)) in want.iter().enumerate() {
            let v = (0..3).find(|&v| world_of_voxel[v] == w).unwrap_or(d);
            perm[d] = v;
            flip[d] = sign_of_voxel[v] != s;
        }
        Self { perm, flip }
    }

    /// Display dims (columns, rows, slices) from voxel dims.
    pub fn display_dims(&self, dims: [usize; 3]) -> [usize; 3] {
        [dims[self.perm[0]], dims[self.perm[1]], dims[self.perm[2]]]
    }

    /// Voxel index (Fortran order: i fastest) of display position (col, row, slice).
    #[inline]
    pub fn voxel_index(&self, dims: [usize; 3], disp: [usize; 3]) -> usize {
        let mut v = [0usize; 3];
        for (d, &x) in disp.iter().enumerate() {
            let ax = self.perm[d];
            v[ax] = if self.flip[d] { dims[ax] - 1 - x } else { x };
        }
        v[0] + dims[0] * (v[1] + dims[1] * v[2])
    }
}

/// The voxel-to-world (RAS+, mm) affine of a header (sform, else qform, else pixdim).
pub fn header_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let mut a = [[0.0f64; 4]; 4];
    a[3][3] = 1.0;
    if h.sform_code > 0 {
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                a[r][c] = row[c] as f64;
            }
        }
        return a;
    }
    let px = |i: usize| {
        let v = h.pixdim[i] as f64;
        if v == 0.0 {
            1.0
        } else {
            v.abs()
        }
    };
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a0 = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [
                a0 * a0 + b * b - c * c - d * d,
                2.0 * (b * c - a0 * d),
                2.0 * (b * d + a0 * c),
            ],
            [
                2.0 * (b * c + a0 * d),
                a0 * a0 + c * c - b * b - d * d,
                2.0 * (c * d - a0 * b),
            ],
            [
                2.0 * (b * d - a0 * c),
                2.0 * (c * d + a0 * b),
                a0 * a0 + d * d - b * b - c * c,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [px(1), px(2), px(3) * qfac];
        for (i, row) in r.iter().enumerate() {
            for j in 0..3 {
                a[i][j] = row[j] * s[j];
            }
        }
        a[0][3] = h.quatern_x as f64;
        a[1][3] = h.quatern_y as f64;
        a[2][3] = h.quatern_z as f64;
        return a;
    }
    for (i, row) in a.iter_mut().take(3).enumerate() {
        row[i] = px(i + 1);
    }
    a
}

/// A 3D volume in memory, voxel (file) order: index `i + nx * (j + ny * k)`.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The source header (written back with predictions).
    pub header: NiftiHeader,
    /// Voxel dims (nx, ny, nz).
    pub dims: [usize; 3],
    /// Voxel spacing in mm (pixdim 1..3).
    pub spacing: [f32; 3],
    /// Values after `scl_slope`/`scl_inter` (HU for CT).
    pub data: Vec<f32>,
    /// Voxel -> display mapping.
    pub orientation: Orientation,
}

impl Volume {
    /// Reads a `.nii` or `.nii.gz` file. 4D files are accepted when the 4th dim is 1.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::file(path, "missing NIfTI file"));
        }
        let obj = ReaderOptions::new()
            .read_file(path)
            .map_err(|e| Error::file(path, format!("unreadable NIfTI: {e}")))?;
        let header = obj.header().clone();
        let arr = obj
            .into_volume()
            .into_ndarray::<f32>()
            .map_err(|e| Error::file(path, format!("unreadable NIfTI data: {e}")))?;
        let shape = arr.shape().to_vec();
        if shape.len() < 3 || shape[3..].iter().any(|&d| d != 1) {
            return Err(Error::file(
                path,
                format!("expected a 3D volume, got shape {shape:?}"),
            ));
        }
        let dims = [shape[0], shape[1], shape[2]];
        let mut arr = arr;
        while arr.ndim() > 3 {
            let last = ndarray::Axis(arr.ndim() - 1);
            arr = arr.index_axis_move(last, 0);
        }
        // Logical iteration of the transposed array visits i fastest: file order.
        let data: Vec<f32> = arr.t().iter().copied().collect();
        let orientation = Orientation::from_affine(&header_affine(&header));
        Ok(Self {
            spacing: [header.pixdim[1], header.pixdim[2], header.pixdim[3]],
            header,
            dims,
            data,
            orientation,
        })
    }

    /// Display dims (columns W, rows H, slices).
    pub fn display_dims(&self) -> [usize; 3] {
        self.orientation.display_dims(self.dims)
    }

    /// Axial slice `k` (display order) as row-major H x W values.
    pub fn slice(&self, k: usize) -> Vec<f32> {
        let [w, h, _] = self.display_dims();
        let mut out = Vec::with_capacity(w * h);
        for r in 0..h {
            for c in 0..w {
                out.push(self.data[self.orientation.voxel_index(self.dims, [c, r, k])]);
            }
        }
        out
    }
}

/// Writes `data` (voxel order, as [`Volume::data`]) as a NIfTI file with `reference`'s
/// header (affine, spacing, descriptions); `.nii.gz` paths are compressed.
pub fn write_volume_u8(
    path: impl AsRef<Path>,
    reference: &NiftiHeader,
    dims: [usize; 3],
    data: &[u8],
) -> Result<()> {
    use ndarray::ShapeBuilder;
    let path = path.as_ref();
    let arr = ndarray::Array3::from_shape_vec((dims[0], dims[1], dims[2]).f(), data.to_vec())
        .map_err(|e| {
            Error::file(
                path,
                format!("volume data does not match dims {dims:?}: {e}"),
            )
        })?;
    nifti::writer::WriterOptions::new(path)
        .reference_header(reference)
        .write_nifti(&arr)
        .map_err(|e| Error::file(path, format!("cannot write NIfTI: {e}")))
}

/// How a [`NiftiVolumeDataset`] folder is laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NiftiLayout {
    /// Medical Segmentation Decathlon: `imagesTr/`, `labelsTr/`, `dataset.json` with
    /// `labels` (`{"0": "background", "1": "spleen"}` or nnU-Net v2 `{"spleen": 1}`)
    /// and optionally `training` pairs.
    Msd,
    /// WORD: `images<Suffix>/`, `labels<Suffix>/` (`Tr`, `Val`, `Ts`), same file names;
    /// label names from `dataset.json` when present, else WORD's published table.
    Word,
    /// AbdomenCT-1k: `Image/Case_00001_0000.nii.gz` with `Mask/Case_00001.nii.gz`;
    /// labels 1 liver, 2 kidney, 3 spleen, 4 pancreas.
    AbdomenCt1k,
}

/// Options of [`NiftiVolumeDataset`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NiftiOptions {
    /// Intensity window.
    pub window: HuWindow,
    /// Organs to prompt (names as in the label table); None = all non-background labels.
    pub organs: Option<Vec<String>>,
    /// For `Word`: the folder suffix (`Tr`, `Val`, `Ts`); for `Msd`: `Tr` (default).
    pub suffix: String,
    /// Keep only slices where the prompted organ is present (training); false keeps every
    /// slice (evaluation and 3D reassembly).
    pub only_slices_with_organ: bool,
    /// Volumes kept decoded in memory (LRU).
    pub cached_volumes: usize,
}

impl Default for NiftiOptions {
    fn default() -> Self {
        Self {
            window: HuWindow::default(),
            organs: None,
            suffix: "Tr".into(),
            only_slices_with_organ: false,
            cached_volumes: 2,
        }
    }
}

/// WORD's label table (WORD paper, 16 organs).
pub const WORD_LABELS: [(u8, &str); 16] = [
    (1, "liver"),
    (2, "spleen"),
    (3, "left kidney"),
    (4, "right kidney"),
    (5, "stomach"),
    (6, "gallbladder"),
    (7, "esophagus"),
    (8, "pancreas"),
    (9, "duodenum"),
    (10, "colon"),
    (11, "intestine"),
    (12, "adrenal"),
    (13, "rectum"),
    (14, "bladder"),
    (15, "left head of femur"),
    (16, "right head of femur"),
];

/// AbdomenCT-1k's label table.
pub const ABDOMENCT1K_LABELS: [(u8, &str); 4] =
    [(1, "liver"), (2, "kidney"), (3, "spleen"), (4, "pancreas")];

struct Loaded {
    /// Windowed image, display order: slice-major, then row, then column.
    image: Vec<f32>,
    /// Labels, display order.
    labels: Vec<u8>,
}

/// 2D axial slices of labelled CT volumes, one sample per (volume, slice, organ) with the
/// organ name as the prompt (see the module docs for orientation).
pub struct NiftiVolumeDataset {
    name: String,
    pairs: Vec<(PathBuf, PathBuf)>,
    organs: Vec<(u8, String)>,
    opts: NiftiOptions,
    aux: AuxPromptSource,
    /// Per volume: header, voxel dims, orientation.
    meta: Vec<(NiftiHeader, [usize; 3], Orientation)>,
    /// (volume, slice, organ index).
    index: Vec<(usize, usize, usize)>,
    cache: Mutex<Vec<(usize, Arc<Loaded>)>>,
}

impl std::fmt::Debug for NiftiVolumeDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NiftiVolumeDataset")
            .field("name", &self.name)
            .field("volumes", &self.pairs.len())
            .field("organs", &self.organs)
            .field("samples", &self.index.len())
            .finish()
    }
}

fn list_nii(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !n.starts_with('.') && (n.ends_with(".nii") || n.ends_with(".nii.gz"))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn labels_from_dataset_json(path: &Path) -> Result<Vec<(u8, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let labels = v
        .get("labels")
        .and_then(|l| l.as_object())
        .ok_or_else(|| Error::file(path, "no \"labels\" object"))?;
    let mut out = Vec::new();
    for (k, val) in labels {
        // MSD: {"1": "spleen"}; nnU-Net v2: {"spleen": 1}.
        let (id, name) = if let Ok(id) = k.parse::<u8>() {
            (id, val.as_str().map(str::to_string))
        } else {
            (val.as_u64().unwrap_or(0) as u8, Some(k.clone()))
        };
        let name = name.ok_or_else(|| Error::file(path, format!("label {k:?} has no name")))?;
        if id != 0 && !name.eq_ignore_ascii_case("background") {
            out.push((id, name.to_lowercase().replace('_', " ")));
        }
    }
    out.sort();
    Ok(out)
}

impl NiftiVolumeDataset {
    /// Opens a folder in the given layout.
    pub fn open(root: impl AsRef<Path>, layout: NiftiLayout, opts: NiftiOptions) -> Result<Self> {
        let root = root.as_ref();
        let (pairs, labels) = match layout {
            NiftiLayout::Msd | NiftiLayout::Word => {
                let img_dir = root.join(format!("images{}", opts.suffix));
                let lbl_dir = root.join(format!("labels{}", opts.suffix));
                let json = root.join("dataset.json");
                let labels = if json.is_file() {
                    labels_from_dataset_json(&json)?
                } else if layout == NiftiLayout::Word {
                    WORD_LABELS
                        .iter()
                        .map(|(i, n)| (*i, n.to_string()))
                        .collect()
                } else {
                    return Err(Error::file(&json, "missing dataset.json (MSD layout)"));
                };
                let mut pairs = Vec::new();
                for img in list_nii(&img_dir)? {
                    let fname = img
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // nnU-Net style "case_0000.nii.gz" images have "case.nii.gz" labels.
                    let candidates = [fname.clone(), fname.replace("_0000.nii", ".nii")];
                    let lbl = candidates
                        .iter()
                        .map(|n| lbl_dir.join(n))
                        .find(|p| p.is_file())
                        .ok_or_else(|| {
                            Error::file(
                                lbl_dir.join(&fname),
                                format!("missing label for image {}", img.display()),
                            )
                        })?;
                    pairs.push((img, lbl));
                }
                (pairs, labels)
            }
            NiftiLayout::AbdomenCt1k => {
                let img_dir = root.join("Image");
                let lbl_dir = root.join("Mask");
                let mut pairs = Vec::new();
                for img in list_nii(&img_dir)? {
                    let fname = img
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let lbl = lbl_dir.join(fname.replace("_0000.nii", ".nii"));
                    if !lbl.is_file() {
                        return Err(Error::file(
                            &lbl,
                            format!("missing mask for image {}", img.display()),
                        ));
                    }
                    pairs.push((img, lbl));
                }
                (
                    pairs,
                    ABDOMENCT1K_LABELS
                        .iter()
                        .map(|(i, n)| (*i, n.to_string()))
                        .collect(),
                )
            }
        };
        if pairs.is_empty() {
            return Err(Error::file(root, "no NIfTI image/label pairs found"));
        }
        let name = root
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "nifti".into());
        Self::from_pairs(name, pairs, labels, opts)
    }

    /// A dataset from explicit (image, label) file pairs and a label table
    /// `(label id, organ name)`.
    pub fn from_pairs(
        name: impl Into<String>,
        pairs: Vec<(PathBuf, PathBuf)>,
        labels: Vec<(u8, String)>,
        opts: NiftiOptions,
    ) -> Result<Self> {
        let organs: Vec<(u8, String)> = match &opts.organs {
            None => labels.clone(),
            Some(want) => want
                .iter()
                .map(|w| {
                    labels
                        .iter()
                        .find(|(_, n)| n.eq_ignore_ascii_case(w))
                        .cloned()
                        .ok_or_else(|| {
                            Error::Msg(format!("organ {w:?} is not in the label table {labels:?}"))
                        })
                })
                .collect::<Result<_>>()?,
        };
        let mut meta = Vec::new();
        for (img, lbl) in &pairs {
            let h = read_header(img)?;
            let hl = read_header(lbl)?;
            let dims = header_dims(img, &h)?;
            let dl = header_dims(lbl, &hl)?;
            if dims != dl {
                return Err(Error::file(
                    lbl,
                    format!(
                        "size mismatch: label {dl:?}, image {} {dims:?}",
                        img.display()
                    ),
                ));
            }
            let o = Orientation::from_affine(&header_affine(&h));
            meta.push((h, dims, o));
        }
        let mut ds = Self {
            name: name.into(),
            pairs,
            organs,
            aux: AuxPromptSource::None,
            meta,
            index: Vec::new(),
            cache: Mutex::new(Vec::new()),
            opts,
        };
        for v in 0..ds.pairs.len() {
            let nz = ds.meta[v].2.display_dims(ds.meta[v].1)[2];
            if ds.opts.only_slices_with_organ {
                let l = ds.load(v)?;
                let [w, h, _] = ds.meta[v].2.display_dims(ds.meta[v].1);
                for k in 0..nz {
                    let sl = &l.labels[k * w * h..(k + 1) * w * h];
                    for (oi, (id, _)) in ds.organs.iter().enumerate() {
                        if sl.contains(id) {
                            ds.index.push((v, k, oi));
                        }
                    }
                }
            } else {
                for k in 0..nz {
                    for oi in 0..ds.organs.len() {
                        ds.index.push((v, k, oi));
                    }
                }
            }
        }
        Ok(ds)
    }

    /// Sets the auxiliary prompt source (looked up by organ name).
    pub fn with_aux(mut self, aux: AuxPromptSource) -> Self {
        self.aux = aux;
        self
    }

    /// The prompted organs `(label id, name)`.
    pub fn organs(&self) -> &[(u8, String)] {
        &self.organs
    }

    /// Number of volumes.
    pub fn num_volumes(&self) -> usize {
        self.pairs.len()
    }

    /// The (image, label) files of volume `v`.
    pub fn volume_paths(&self, v: usize) -> Option<(&Path, &Path)> {
        self.pairs.get(v).map(|(a, b)| (a.as_path(), b.as_path()))
    }

    /// Header, voxel dims and orientation of volume `v`.
    pub fn volume_meta(&self, v: usize) -> Option<(&NiftiHeader, [usize; 3], Orientation)> {
        self.meta.get(v).map(|(h, d, o)| (h, *d, *o))
    }

    /// (volume, slice, organ index) of sample `i`.
    pub fn locate(&self, i: usize) -> Option<(usize, usize, usize)> {
        self.index.get(i).copied()
    }

    /// The ground-truth label map of volume `v` in display order (slice-major, rows,
    /// columns), as used by [`VolumeAssembler::label_map`].
    pub fn label_volume(&self, v: usize) -> Result<Vec<u8>> {
        Ok(self.load(v)?.labels.clone())
    }

    fn load(&self, v: usize) -> Result<Arc<Loaded>> {
        {
            let mut c = self
                .cache
                .lock()
                .map_err(|_| Error::Msg("volume cache poisoned".into()))?;
            if let Some(pos) = c.iter().position(|(i, _)| *i == v) {
                let e = c.remove(pos);
                let l = e.1.clone();
                c.push(e);
                return Ok(l);
            }
        }
        let (img_p, lbl_p) = &self.pairs[v];
        let img = Volume::read(img_p)?;
        let lbl = Volume::read(lbl_p)?;
        if img.dims != lbl.dims {
            return Err(Error::file(
                lbl_p,
                format!("size mismatch: label {:?}, image {:?}", lbl.dims, img.dims),
            ));
        }
        // Both use the image's orientation so they stay voxel-aligned.
        let o = img.orientation;
        let [w, h, n] = o.display_dims(img.dims);
        let mut image = Vec::with_capacity(w * h * n);
        let mut labels = Vec::with_capacity(w * h * n);
        for k in 0..n {
            for r in 0..h {
                for c in 0..w {
                    let vi = o.voxel_index(img.dims, [c, r, k]);
                    image.push(self.opts.window.apply(img.data[vi]));
                    labels.push(lbl.data[vi].round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        let l = Arc::new(Loaded { image, labels });
        let mut c = self
            .cache
            .lock()
            .map_err(|_| Error::Msg("volume cache poisoned".into()))?;
        c.push((v, l.clone()));
        while c.len() > self.opts.cached_volumes.max(1) {
            c.remove(0);
        }
        Ok(l)
    }
}

fn read_header(p: &Path) -> Result<NiftiHeader> {
    if !p.is_file() {
        return Err(Error::file(p, "missing NIfTI file"));
    }
    NiftiHeader::from_file(p).map_err(|e| Error::file(p, format!("unreadable NIfTI header: {e}")))
}

fn header_dims(p: &Path, h: &NiftiHeader) -> Result<[usize; 3]> {
    let d = h
        .dim()
        .map_err(|e| Error::file(p, format!("bad dims: {e}")))?;
    if d.len() < 3 || d[3..].iter().any(|&x| x != 1) {
        return Err(Error::file(
            p,
            format!("expected a 3D volume, got dims {d:?}"),
        ));
    }
    Ok([d[0] as usize, d[1] as usize, d[2] as usize])
}

impl SegDataset for NiftiVolumeDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let (v, k, oi) = self
            .locate(i)
            .ok_or_else(|| Error::Msg(format!("{}: index {i} out of range", self.name)))?;
        let l = self.load(v)?;
        let (_, dims, o) = &self.meta[v];
        let [w, h, _] = o.display_dims(*dims);
        let range = k * w * h..(k + 1) * w * h;
        let (id, organ) = &self.organs[oi];
        let mask = l.labels[range.clone()]
            .iter()
            .map(|&x| (x == *id) as u8)
            .collect();
        let stem = self.pairs[v]
            .0
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Sample {
            id: format!("{stem}:{k}:{organ}"),
            image: ImageF32::grey(h, w, l.image[range].to_vec())?,
            mask: Mask {
                height: h,
                width: w,
                data: mask,
            },
            caption: organ.clone(),
            aux_caption: self.aux.lookup(organ, None)?,
        })
    }
}

/// Reassembles slice predictions of one volume into a label volume and writes it as
/// NIfTI with the source header.
#[derive(Debug, Clone)]
pub struct VolumeAssembler {
    header: NiftiHeader,
    dims: [usize; 3],
    orientation: Orientation,
    organs: Vec<(u8, String)>,
    /// Per organ: probabilities in display order.
    probs: Vec<Vec<f32>>,
}

impl VolumeAssembler {
    /// An empty assembler for volume `v` of `ds`.
    pub fn new(ds: &NiftiVolumeDataset, v: usize) -> Result<Self> {
        let (h, dims, o) = ds
            .volume_meta(v)
            .ok_or_else(|| Error::Msg(format!("volume {v} out of range")))?;
        let n = dims.iter().product();
        Ok(Self {
            header: h.clone(),
            dims,
            orientation: o,
            organs: ds.organs().to_vec(),
            probs: vec![vec![0.0; n]; ds.organs().len()],
        })
    }

    /// Adds the probabilities (`ph` x `pw`, row-major, display orientation) of organ
    /// index `organ` on slice `k`; resized to the slice grid by nearest neighbour.
    pub fn add_slice(
        &mut self,
        k: usize,
        organ: usize,
        probs: &[f32],
        ph: usize,
        pw: usize,
    ) -> Result<()> {
        let [w, h, n] = self.orientation.display_dims(self.dims);
        if k >= n || organ >= self.organs.len() || probs.len() != ph * pw || ph == 0 || pw == 0 {
            return Err(Error::Msg(format!(
                "VolumeAssembler::add_slice: slice {k}/{n}, organ {organ}/{}, {} values for {ph}x{pw}",
                self.organs.len(),
                probs.len()
            )));
        }
        let dst = &mut self.probs[organ][k * w * h..(k + 1) * w * h];
        for r in 0..h {
            let sr = ((r as f64 + 0.5) * ph as f64 / h as f64) as usize;
            for c in 0..w {
                let sc = ((c as f64 + 0.5) * pw as f64 / w as f64) as usize;
                dst[r * w + c] = probs[sr.min(ph - 1) * pw + sc.min(pw - 1)];
            }
        }
        Ok(())
    }

    /// The predicted label map in display order: for each voxel the organ with the highest
    /// probability if that is > 0.5, else 0.
    pub fn label_map(&self) -> Vec<u8> {
        let n = self.probs.first().map_or(0, |p| p.len());
        (0..n)
            .map(|i| {
                let mut best = (0u8, 0.5f32);
                for (o, p) in self.probs.iter().enumerate() {
                    if p[i] > best.1 {
                        best = (self.organs[o].0, p[i]);
                    }
                }
                best.0
            })
            .collect()
    }

    /// A display-order volume back in voxel (file) order.
    pub fn to_voxel_order<T: Copy + Default>(&self, display: &[T]) -> Vec<T> {
        let [w, h, n] = self.orientation.display_dims(self.dims);
        let mut out = vec![T::default(); display.len()];
        for k in 0..n {
            for r in 0..h {
                for c in 0..w {
                    out[self.orientation.voxel_index(self.dims, [c, r, k])] =
                        display[(k * h + r) * w + c];
                }
            }
        }
        out
    }

    /// Writes the label map as NIfTI (u8) with the source header.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let vox = self.to_voxel_order(&self.label_map());
        write_volume_u8(path, &self.header, self.dims, &vox)
    }

    /// Per-organ 3D Dice of the current label map against `ds`'s ground truth of volume
    /// `v`, added to `metrics`.
    pub fn score(
        &self,
        ds: &NiftiVolumeDataset,
        v: usize,
        metrics: &mut crate::SegMetrics,
    ) -> Result<BTreeMap<String, Option<f64>>> {
        let gt = ds.label_volume(v)?;
        let pred = self.label_map();
        let mut out = BTreeMap::new();
        for (id, name) in &self.organs {
            let p: Vec<bool> = pred.iter().map(|&x| x == *id).collect();
            let t: Vec<bool> = gt.iter().map(|&x| x == *id).collect();
            out.insert(name.clone(), metrics.update_volume(name, &p, &t)?);
        }
        Ok(out)
    }
}
