//! Samples, images, masks and the common dataset trait.

use crate::Result;

/// A floating point image, channel-major (C x H x W), values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageF32 {
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `channels * height * width` values, row-major per channel.
    pub data: Vec<f32>,
}

impl ImageF32 {
    /// A zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// A grey image from row-major values.
    pub fn grey(height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != height * width {
            return Err(crate::Error::Msg(format!(
                "grey image: {} values for {height}x{width}",
                data.len()
            )));
        }
        Ok(Self {
            channels: 1,
            height,
            width,
            data,
        })
    }

    /// Channel `c` as a row-major slice.
    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// A 32-byte BLAKE3 hash of the pixel content and geometry: the image part of a
    /// frozen-feature cache key (see [`crate::FeatureCache::key_for_image`]).
    pub fn content_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&(self.channels as u64).to_le_bytes());
        h.update(&(self.height as u64).to_le_bytes());
        h.update(&(self.width as u64).to_le_bytes());
        // One contiguous buffer: hashing 4-byte pieces one by one is several times slower.
        let mut bytes = Vec::with_capacity(self.data.len() * 4);
        for v in &self.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&bytes);
        *h.finalize().as_bytes()
    }
}

/// A binary mask (H x W), values 0 or 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width` values in {0, 1}, row-major.
    pub data: Vec<u8>,
}

impl Mask {
    /// An empty mask.
    pub fn zeros(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            data: vec![0; height * width],
        }
    }

    /// Number of foreground pixels.
    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }
}

/// One training/evaluation example: an image, its target mask and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// A unique, stable id (e.g. the image file name, or `volume:slice:organ`).
    pub id: String,
    /// The image, C x H x W in [0, 1].
    pub image: ImageF32,
    /// The target for `caption`, same H x W as the image.
    pub mask: Mask,
    /// The primary prompt T_p (report sentence or organ name).
    pub caption: String,
    /// The auxiliary prompt T_a for DATE, if a source provides one.
    pub aux_caption: Option<String>,
}

/// The common interface of every dataset of this crate. Random access, thread-safe so the
/// [`crate::DataLoader`] can decode samples in parallel.
pub trait SegDataset: Send + Sync {
    /// A short name for logs ("qata-cov19/Train", "phantoms-ct", ...).
    fn name(&self) -> &str;
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` (`i < len()`); errors name the file that is wrong.
    fn get(&self, i: usize) -> Result<Sample>;
}

impl<T: SegDataset + ?Sized> SegDataset for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        (**self).get(i)
    }
}

/// Small deterministic RNG (SplitMix64): identical streams on every platform and run,
/// no dependency. Used for phantoms, shuffling and augmentation.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// A generator from a seed and a stream index (e.g. sample index): independent,
    /// random-access streams.
    pub fn stream(seed: u64, index: u64) -> Self {
        let mut g = Self(seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(index.wrapping_add(1)));
        g.next_u64();
        g
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Uniform integer in [0, n) (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A view of some samples of another dataset (e.g. a train/validation split of volumes or
/// a benchmark subset).
#[derive(Debug, Clone)]
pub struct Subset<D> {
    inner: D,
    indices: Vec<usize>,
    name: String,
}

impl<D: SegDataset> Subset<D> {
    /// The samples `indices` of `inner` (out-of-range indices are errors at `get`).
    pub fn new(inner: D, indices: Vec<usize>) -> Self {
        let name = format!("{}[subset {}]", inner.name(), indices.len());
        Self {
            inner,
            indices,
            name,
        }
    }

    /// `n` samples spread evenly over `inner` (index `k * len / n` for `k < n`; all of
    /// `inner` when `n >= len`).
    ///
    /// Prefer this to the first `n` when a folder is sorted by name and the names encode
    /// the source: QaTa-COV19's training folder lists its 2,951 `covid_*` images before
    /// its 2,765 `sub-*` ones, so its first 1,429 images come from one source only.
    ///
    /// ```
    /// use tgc_data::{PhantomKind, SegDataset, Subset, SyntheticPhantoms};
    /// let ds = SyntheticPhantoms::new(PhantomKind::CtSlice, 10, 1, 32);
    /// let sub = Subset::evenly_spaced(ds, 4);
    /// assert_eq!(sub.indices(), &[0, 2, 5, 7]);
    /// assert_eq!(sub.len(), 4);
    /// ```
    pub fn evenly_spaced(inner: D, n: usize) -> Self {
        let len = inner.len();
        let indices = if n >= len {
            (0..len).collect()
        } else {
            (0..n).map(|k| k * len / n).collect()
        };
        let mut s = Self::new(inner, indices);
        s.name = format!(
            "{}[{} evenly spaced of {len}]",
            s.inner.name(),
            s.indices.len()
        );
        s
    }

    /// Indices into the inner dataset, in order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl<D: SegDataset> SegDataset for Subset<D> {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let j = *self
            .indices
            .get(i)
            .ok_or_else(|| crate::Error::Msg(format!("{}: index {i} out of range", self.name)))?;
        self.inner.get(j)
    }
}
