//! A batched, multi-threaded loader with prefetch.
//!
//! Samples of a batch are decoded and preprocessed in parallel on the rayon pool; a
//! background thread runs ahead by up to `prefetch` batches through a bounded channel;
//! the consumer thread turns each host batch into candle tensors on the chosen device.
//! Order and augmentation depend only on `(seed, epoch, index)`.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::sample::{SegDataset, SplitMix64};
use crate::transform::{Augment, Prepared, Preprocess};
use crate::Result;

/// One batch on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// B x 3 x S_c x S_c, CLIP-normalised.
    pub clip_images: Tensor,
    /// B x 3 x S_n x S_n, in [-1, 1].
    pub cnn_images: Tensor,
    /// B x 1 x S_l x S_l, f32 0/1.
    pub masks: Tensor,
    /// Primary prompts (after augmentation).
    pub captions: Vec<String>,
    /// Auxiliary prompts (the caption when the dataset has none).
    pub aux_captions: Vec<String>,
    /// Sample ids.
    pub ids: Vec<String>,
    /// Dataset indices.
    pub indices: Vec<usize>,
    /// Content hashes of the source images (see [`crate::ImageF32::content_hash`]).
    pub image_hashes: Vec<[u8; 32]>,
    /// Augmentation variants (see [`crate::AugmentParams::variant`]).
    pub variants: Vec<u64>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Splits the batch into `parts` consecutive sub-batches whose sizes differ by at
    /// most one (the first ones are larger); `parts` is clamped to `1..=len`. For
    /// computing one optimiser step on several threads.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// # use tgc_data::Batch;
    /// let dev = Device::Cpu;
    /// let t = |c: usize, s: usize| Tensor::arange(0f32, (5 * c * s * s) as f32, &dev)
    ///     .unwrap().reshape((5, c, s, s)).unwrap();
    /// let names = |p: &str| (0..5).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    /// let batch = Batch {
    ///     clip_images: t(3, 2), cnn_images: t(3, 4), masks: t(1, 4),
    ///     captions: names("c"), aux_captions: names("a"), ids: names("id"),
    ///     indices: (0..5).collect(), image_hashes: vec![[0; 32]; 5], variants: vec![0; 5],
    /// };
    /// let parts = batch.split(2).unwrap();
    /// assert_eq!(parts.iter().map(|b| b.len()).collect::<Vec<_>>(), [3, 2]);
    /// assert_eq!(parts[1].ids, ["id3", "id4"]);
    /// assert_eq!(parts[1].masks.dims(), [2, 1, 4, 4]);
    /// let first = parts[1].masks.flatten_all().unwrap().get(0).unwrap();
    /// assert_eq!(first.to_scalar::<f32>().unwrap(), (3 * 16) as f32);
    /// ```
    pub fn split(&self, parts: usize) -> Result<Vec<Batch>> {
        let n = self.len();
        let parts = parts.clamp(1, n.max(1));
        let mut out = Vec::with_capacity(parts);
        let mut start = 0;
        for i in 0..parts {
            let len = n / parts + usize::from(i < n % parts);
            let r = start..start + len;
            out.push(Batch {
                clip_images: self.clip_images.narrow(0, start, len)?,
                cnn_images: self.cnn_images.narrow(0, start, len)?,
                masks: self.masks.narrow(0, start, len)?,
                captions: self.captions[r.clone()].to_vec(),
                aux_captions: self.aux_captions[r.clone()].to_vec(),
                ids: self.ids[r.clone()].to_vec(),
                indices: self.indices[r.clone()].to_vec(),
                image_hashes: self.image_hashes[r.clone()].to_vec(),
                variants: self.variants[r].to_vec(),
            });
            start += len;
        }
        Ok(out)
    }
}

/// The loader (see the module docs).
#[derive(Clone)]
pub struct DataLoader {
    dataset: Arc<dyn SegDataset>,
    preprocess: Preprocess,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    augment: Augment,
    device: Device,
    drop_last: bool,
    prefetch: usize,
}

impl DataLoader {
    /// A loader over `dataset`. `shuffle_seed = None` keeps the dataset order (and seeds
    /// augmentation with 0). The last, smaller batch is kept; prefetch depth is 2.
    pub fn new(
        dataset: Arc<dyn SegDataset>,
        preprocess: Preprocess,
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: Augment,
        device: Device,
    ) -> Self {
        Self {
            dataset,
            preprocess,
            batch_size: batch_size.max(1),
            shuffle_seed,
            augment,
            device,
            drop_last: false,
            prefetch: 2,
        }
    }

    /// Drop the last incomplete batch.
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Number of batches prepared ahead of the consumer (at least 1).
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn SegDataset> {
        &self.dataset
    }

    /// The preprocessing.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The sample order of `epoch`: identity without a seed, else a Fisher-Yates shuffle
    /// seeded by `(seed, epoch)`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if let Some(seed) = self.shuffle_seed {
            SplitMix64::stream(seed, 0x5eed_0000 + epoch as u64).shuffle(&mut idx);
        }
        idx
    }

    /// Iterates the batches of `epoch`.
    pub fn epoch(&self, epoch: usize) -> BatchIter {
        let order = self.order(epoch);
        let mut chunks: Vec<Vec<usize>> =
            order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if self.drop_last && chunks.last().is_some_and(|c| c.len() < self.batch_size) {
            chunks.pop();
        }
        let (tx, rx) = sync_channel(self.prefetch);
        let ds = self.dataset.clone();
        let pre = self.preprocess;
        let aug = self.augment;
        let aug_seed =
            self.shuffle_seed.unwrap_or(0) ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407);
        let handle = std::thread::spawn(move || {
            for chunk in chunks {
                let host: Result<Vec<Prepared>> = chunk
                    .par_iter()
                    .map(|&i| {
                        let s = ds.get(i)?;
                        let p = aug.draw(&mut SplitMix64::stream(aug_seed, i as u64));
                        Ok(pre.apply(&s, &p))
                    })
                    .collect();
                let failed = host.is_err();
                if tx.send(host.map(|h| (chunk, h))).is_err() || failed {
                    break;
                }
            }
        });
        BatchIter {
            rx,
            handle: Some(handle),
            preprocess: self.preprocess,
            device: self.device.clone(),
        }
    }

    /// Iterates epoch 0.
    pub fn iter(&self) -> BatchIter {
        self.epoch(0)
    }
}

impl IntoIterator for &DataLoader {
    type Item = Result<Batch>;
    type IntoIter = BatchIter;
    fn into_iter(self) -> BatchIter {
        self.iter()
    }
}

/// Iterator over the batches of one epoch. Stops after the first error.
pub struct BatchIter {
    rx: Receiver<Result<(Vec<usize>, Vec<Prepared>)>>,
    handle: Option<JoinHandle<()>>,
    preprocess: Preprocess,
    device: Device,
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        match self.rx.recv() {
            Ok(Ok((idx, host))) => Some(to_batch(idx, host, &self.preprocess, &self.device)),
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => {
                if let Some(h) = self.handle.take() {
                    let _ = h.join();
                }
                None
            }
        }
    }
}

impl Drop for BatchIter {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's next send fail, so it exits; we do
        // not join here to avoid waiting for a batch in progress.
        self.handle.take();
    }
}

fn to_batch(
    indices: Vec<usize>,
    host: Vec<Prepared>,
    p: &Preprocess,
    dev: &Device,
) -> Result<Batch> {
    let b = host.len();
    let cat = |f: &dyn Fn(&Prepared) -> &Vec<f32>| {
        let mut v = Vec::with_capacity(b * f(&host[0]).len());
        for h in &host {
            v.extend_from_slice(f(h));
        }
        v
    };
    let clip = Tensor::from_vec(cat(&|h| &h.clip), (b, 3, p.clip_size, p.clip_size), dev)?;
    let cnn = Tensor::from_vec(cat(&|h| &h.cnn), (b, 3, p.cnn_size, p.cnn_size), dev)?;
    let masks = Tensor::from_vec(cat(&|h| &h.mask), (b, 1, p.label_size, p.label_size), dev)?;
    let mut out = Batch {
        clip_images: clip,
        cnn_images: cnn,
        masks,
        captions: Vec::with_capacity(b),
        aux_captions: Vec::with_capacity(b),
        ids: Vec::with_capacity(b),
        indices,
        image_hashes: Vec::with_capacity(b),
        variants: Vec::with_capacity(b),
    };
    for h in host {
        out.captions.push(h.caption);
        out.aux_captions.push(h.aux_caption);
        out.ids.push(h.id);
        out.image_hashes.push(h.image_hash);
        out.variants.push(h.variant);
    }
    Ok(out)
}
