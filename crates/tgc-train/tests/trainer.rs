//! The training loop end to end on synthetic phantoms with the `tiny` preset: exact
//! resume, the NaN guard, and that the text path carries information.

use std::sync::Arc;

use candle_core::Device;
use tgc_data::{swap_left_right, PhantomKind, Preprocess, Sample, SegDataset, SyntheticPhantoms};
use tgc_model::{TgcConfig, TgcNet, WeightSource};
use tgc_train::{evaluate, FeatureStore, TrainConfig, Trainer, Tta};

fn preprocess(cfg: &TgcConfig) -> Preprocess {
    Preprocess {
        clip_size: cfg.clip_size,
        cnn_size: cfg.cnn_size,
        label_size: cfg.label_size,
    }
}

fn model(cfg: &TgcConfig) -> TgcNet {
    TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap()
}

fn phantoms(n: usize, seed: u64, size: usize) -> Arc<dyn SegDataset> {
    Arc::new(SyntheticPhantoms::new(PhantomKind::CtSlice, n, seed, size))
}

fn quiet(max_steps: u64) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        max_steps: Some(max_steps),
        batch_size: 4,
        lr: 1e-3,
        progress: false,
        overlays: 0,
        patience: 0,
        ..TrainConfig::default()
    }
}

#[test]
fn resuming_mid_epoch_equals_training_straight_through() {
    resume_equals_straight_through(1, 0.0);
}

#[test]
fn resuming_mid_epoch_equals_training_straight_through_data_parallel() {
    resume_equals_straight_through(2, 0.0);
}

/// Dropout in the MSDeformAttn encoder, DATE and the decoder: its masks are drawn from
/// the run's seed and the step, so a resumed run draws the same ones, with one part or
/// two on their own threads.
#[test]
fn resuming_with_dropout_equals_training_straight_through() {
    resume_equals_straight_through(1, 0.2);
    resume_equals_straight_through(2, 0.2);
}

fn resume_equals_straight_through(data_parallel: usize, dropout: f32) {
    let quiet = |steps| TrainConfig {
        data_parallel,
        ..quiet(steps)
    };
    let mut cfg = TgcConfig::tiny();
    cfg.sse.msda.dropout = dropout;
    cfg.date.dropout = f64::from(dropout);
    cfg.decoder.dropout = dropout;
    let pre = preprocess(&cfg);
    let train = phantoms(12, 1, cfg.label_size);
    let val = phantoms(4, 2, cfg.label_size);
    let dir = tempfile::tempdir().unwrap();

    // 6 steps straight (3 batches per epoch: crosses an epoch boundary).
    let a = model(&cfg);
    Trainer::new(
        &a,
        quiet(6),
        train.clone(),
        val.clone(),
        pre,
        dir.path().join("a"),
    )
    .unwrap()
    .fit()
    .unwrap();

    // 4 steps (stops mid-epoch), then a fresh process-like restart: new model, resume, 6.
    let b = model(&cfg);
    let out_b = dir.path().join("b");
    Trainer::new(&b, quiet(4), train.clone(), val.clone(), pre, &out_b)
        .unwrap()
        .fit()
        .unwrap();
    let c = model(&cfg);
    let mut t = Trainer::new(&c, quiet(6), train, val, pre, &out_b).unwrap();
    t.resume(out_b.join("last.safetensors")).unwrap();
    assert_eq!(t.steps(), 4);
    t.fit().unwrap();
    assert_eq!(t.steps(), 6);

    let wa = a.trainable_tensors();
    let wc = c.trainable_tensors();
    assert_eq!(wa.len(), wc.len());
    let mut changed = false;
    let init = model(&cfg).trainable_tensors();
    for (name, ta) in &wa {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vc: Vec<f32> = wc[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(va == vc, "{name} differs after resume");
        let v0: Vec<f32> = init[name].flatten_all().unwrap().to_vec1().unwrap();
        changed |= v0 != va;
    }
    assert!(changed, "training did not change the weights");
    if dropout > 0.0 {
        // The dropout is live: without it the same steps end elsewhere.
        let mut plain = cfg.clone();
        plain.sse.msda.dropout = 0.0;
        plain.date.dropout = 0.0;
        plain.decoder.dropout = 0.0;
        let d = model(&plain);
        Trainer::new(
            &d,
            quiet(6),
            phantoms(12, 1, cfg.label_size),
            phantoms(4, 2, cfg.label_size),
            pre,
            dir.path().join("d"),
        )
        .unwrap()
        .fit()
        .unwrap();
        let wd = d.trainable_tensors();
        assert!(
            wa.iter().any(|(name, t)| {
                let va: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let vd: Vec<f32> = wd[name].flatten_all().unwrap().to_vec1().unwrap();
                va != vd
            }),
            "dropout {dropout} changed nothing"
        );
    }
}

/// Rotations and zooms: a resumed run repeats the same draws (bit-exact weights), the
/// augmentation changes what is learned, and only the discrete variants reach the disk
/// cache (here none from training: every sample gets a continuous variant).
#[test]
fn geometric_augmentation_resumes_exactly_and_skips_the_cache() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let train = phantoms(12, 1, cfg.label_size);
    let dir = tempfile::tempdir().unwrap();
    let aug = |steps, cache: &str| TrainConfig {
        max_rotation_deg: 10.0,
        scale_range: (0.9, 1.1),
        cache_dir: Some(dir.path().join(cache)),
        ..quiet(steps)
    };
    let val = || phantoms(4, 2, cfg.label_size);

    let a = model(&cfg);
    Trainer::new(
        &a,
        aug(6, "cache-a"),
        train.clone(),
        val(),
        pre,
        dir.path().join("a"),
    )
    .unwrap()
    .fit()
    .unwrap();
    let b = model(&cfg);
    let out_b = dir.path().join("b");
    Trainer::new(&b, aug(4, "cache-b"), train.clone(), val(), pre, &out_b)
        .unwrap()
        .fit()
        .unwrap();
    let c = model(&cfg);
    let mut t = Trainer::new(&c, aug(6, "cache-b"), train.clone(), val(), pre, &out_b).unwrap();
    t.resume(out_b.join("last.safetensors")).unwrap();
    t.fit().unwrap();
    assert_eq!(t.steps(), 6);

    // The same 6 steps with flips only.
    let d = model(&cfg);
    let flips = TrainConfig {
        max_rotation_deg: 0.0,
        scale_range: (1.0, 1.0),
        ..aug(6, "cache-d")
    };
    Trainer::new(
        &d,
        flips.clone(),
        train.clone(),
        val(),
        pre,
        dir.path().join("d"),
    )
    .unwrap()
    .fit()
    .unwrap();

    let (wa, wc, wd) = (
        a.trainable_tensors(),
        c.trainable_tensors(),
        d.trainable_tensors(),
    );
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut differs_from_flips = false;
    for (name, ta) in &wa {
        assert!(flat(ta) == flat(&wc[name]), "{name} differs after resume");
        differs_from_flips |= flat(ta) != flat(&wd[name]);
    }
    assert!(differs_from_flips, "rotations and zooms changed nothing");

    // Contrast, brightness and gamma alone: they change what is learned too, and make
    // every training sample a continuous variant (nothing cached from training).
    let e = model(&cfg);
    let intensity = TrainConfig {
        contrast_range: (0.8, 1.2),
        max_brightness: 0.1,
        gamma_range: (0.8, 1.25),
        cache_dir: Some(dir.path().join("cache-e")),
        ..flips.clone()
    };
    Trainer::new(
        &e,
        intensity,
        train.clone(),
        val(),
        pre,
        dir.path().join("i"),
    )
    .unwrap()
    .fit()
    .unwrap();
    let we = e.trainable_tensors();
    assert!(
        wd.iter().any(|(name, td)| flat(td) != flat(&we[name])),
        "contrast, brightness and gamma changed nothing"
    );

    // Cache entries: flips only caches every (image, flip) seen in training (12 images,
    // 24 draws) besides the 4 validation images; with rotations and zooms training
    // caches nothing, validation its 4 identity images.
    let id = cfg.frozen_id("");
    let entries = |name: &str| {
        tgc_data::FeatureCache::open(dir.path().join(name), &id)
            .unwrap()
            .len()
    };
    assert!(entries("cache-d") >= 16, "{}", entries("cache-d"));
    assert_eq!(entries("cache-a"), 4);
    assert_eq!(entries("cache-e"), 4);

    // Bad settings are refused with the field named.
    for bad in [
        TrainConfig {
            max_rotation_deg: -1.0,
            ..quiet(1)
        },
        TrainConfig {
            scale_range: (1.2, 0.8),
            ..quiet(1)
        },
        TrainConfig {
            scale_range: (0.0, 1.0),
            ..quiet(1)
        },
        TrainConfig {
            contrast_range: (1.2, 0.8),
            ..quiet(1)
        },
        TrainConfig {
            gamma_range: (0.0, 1.5),
            ..quiet(1)
        },
        TrainConfig {
            max_brightness: f32::NAN,
            ..quiet(1)
        },
    ] {
        let e = Trainer::new(
            &model(&cfg),
            bad,
            train.clone(),
            val(),
            pre,
            dir.path().join("e"),
        )
        .err()
        .expect("bad augmentation accepted")
        .to_string();
        assert!(
            [
                "max_rotation_deg",
                "scale_range",
                "contrast_range",
                "gamma_range",
                "max_brightness"
            ]
            .iter()
            .any(|f| e.contains(f)),
            "{e}"
        );
    }
}

#[test]
fn non_finite_loss_stops_the_run_naming_step_and_batch() {
    // A learning rate of 1e30 blows the weights up after the first update: the loss of
    // the second batch is not finite.
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let m = model(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut tc = quiet(10);
    tc.lr = 1e30;
    tc.warmup_frac = 0.0;
    tc.grad_clip = 0.0;
    let mut t = Trainer::new(
        &m,
        tc,
        phantoms(16, 1, cfg.label_size),
        phantoms(2, 2, cfg.label_size),
        pre,
        dir.path(),
    )
    .unwrap();
    let err = t.fit().unwrap_err().to_string();
    assert!(
        err.contains("non-finite loss")
            && err.contains("step 1")
            && err.contains("last good checkpoint"),
        "{err}"
    );
}

/// The README's main job (`examples/train_mosmed.rs` with no arguments): the same
/// phantoms (640 train from seed 1, 128 held out from seed 2), model seeds and
/// `TrainConfig::for_phantoms`, with two data-parallel parts as on the 2-core machines it
/// was measured on. The caption decides which of 2-4 identical-looking lesions is the
/// target, so a model that ignores the text plateaus near 0.59 (segmenting all of them);
/// the text-guided one must clear it by 10 points. This guards against the main job
/// silently stalling on that plateau, as it did at lr 3e-3 after a change of rounding.
#[test]
fn main_job_recipe_reads_the_text() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let train = phantoms(640, 1, cfg.label_size);
    let val = phantoms(128, 2, cfg.label_size);
    let tc = TrainConfig {
        data_parallel: 2,
        progress: false,
        overlays: 0,
        ..TrainConfig::for_phantoms()
    };
    let dir = tempfile::tempdir().unwrap();
    let fit = |cfg: &TgcConfig, out: &str| {
        Trainer::new(
            &model(cfg),
            tc.clone(),
            train.clone(),
            val.clone(),
            pre,
            dir.path().join(out),
        )
        .unwrap()
        .fit()
        .unwrap()
        .best_val_dice
    };
    let text = fit(&cfg, "text");
    let image_only = fit(
        &TgcConfig {
            image_only: true,
            ..cfg.clone()
        },
        "image",
    );
    println!("held-out Dice: text {text:.4}, image-only {image_only:.4}");
    assert!(
        (0.5..0.65).contains(&image_only),
        "image-only {image_only:.3} is off the every-lesion plateau"
    );
    assert!(
        text > image_only + 0.10,
        "text-guided {text:.3} is not well above image-only {image_only:.3}"
    );
}

/// `schedule_steps` plans warm-up + cosine over a step budget: a run stopped by
/// `max_steps` at the same count ends at the minimum learning rate (without it the
/// schedule spans `epochs` and the run would still be warming up). The stop is mid-epoch,
/// so its record is marked partial and lands in metrics.jsonl.
#[test]
fn schedule_steps_fits_the_schedule_into_a_step_budget() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let run = |schedule_steps: Option<u64>, name: &str| {
        let m = model(&cfg);
        let tc = TrainConfig {
            epochs: 100,
            schedule_steps,
            ..quiet(4)
        };
        let out = dir.path().join(name);
        let summary = Trainer::new(
            &m,
            tc.clone(),
            phantoms(24, 1, cfg.label_size),
            phantoms(4, 2, cfg.label_size),
            pre,
            &out,
        )
        .unwrap()
        .fit()
        .unwrap();
        (tc, summary, out)
    };
    let (tc, planned, out) = run(Some(4), "planned");
    let last = planned
        .epochs
        .last()
        .expect("a record for the partial epoch");
    assert!(last.partial && last.step == 4, "{last:?}");
    let min_lr = tc.lr * tc.min_lr_frac;
    assert!(
        (last.lr - min_lr).abs() < 1e-12,
        "lr {} vs {min_lr}",
        last.lr
    );
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(log.contains("\"partial\":true"), "{log}");
    // Without it: 6 batches x 100 epochs, 5% warm-up = 30 steps, so step 4 is warming up.
    let (_, unplanned, _) = run(None, "unplanned");
    let lr = unplanned.epochs.last().unwrap().lr;
    assert!(lr < 0.2 * tc.lr, "still warming up: {lr}");
}

/// Splitting a batch over threads or into micro-batches run one after another changes
/// only the rounding: the loss and every trainable parameter's gradient equal the
/// unsplit batch's (an uneven 3 + 2 split and a 5-way split of a batch of 5, in threads
/// or in micro-batches, and micro-batches split again over two threads).
#[test]
fn data_parallel_and_micro_batch_gradients_equal_the_whole_batch() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let train = phantoms(5, 3, cfg.label_size);
    let val = phantoms(2, 4, cfg.label_size);
    let net = model(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let loader = tgc_data::DataLoader::new(
        train.clone(),
        pre,
        5,
        None,
        tgc_data::Augment::default(),
        Device::Cpu,
    );
    let batch = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(batch.len(), 5);
    let grads = |dp: usize, micro: usize| {
        let tc = TrainConfig {
            data_parallel: dp,
            micro_batches: micro,
            ..quiet(1)
        };
        let mut t = Trainer::new(&net, tc, train.clone(), val.clone(), pre, dir.path()).unwrap();
        t.loss_and_gradients(&batch).unwrap()
    };
    let (l1, g1) = grads(1, 1);
    let vars = net.trainable_vars();
    assert!(!vars.is_empty());
    for (dp, micro) in [(2, 1), (5, 1), (1, 2), (1, 5), (2, 2)] {
        let (l, g) = grads(dp, micro);
        assert!(
            (l - l1).abs() < 1e-6 * l1.abs().max(1.0),
            "loss {l} vs {l1} (dp {dp}, micro {micro})"
        );
        for (name, var) in &vars {
            let t = var.as_tensor();
            let a: Vec<f32> = g1.get(t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = g
                .get(t)
                .unwrap_or_else(|| panic!("{name}: no gradient (dp {dp}, micro {micro})"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = a.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{name}: {x} vs {y} (dp {dp}, micro {micro})"
                );
            }
        }
    }
}

/// `plan_steps` against hand-computed budgets (1 s per step, 10 s per validation,
/// 30 steps per epoch).
#[test]
fn plan_steps_fits_steps_and_validations_into_the_time_left() {
    use tgc_train::plan_steps;
    // 70 steps = epochs of 30 + 30 + 10, three validations: 70 + 30 = 100 s.
    assert_eq!(plan_steps(100.0, 1.0, 10.0, 30, 1000), 70);
    // Capped by the epochs left.
    assert_eq!(plan_steps(100.0, 1.0, 10.0, 30, 50), 50);
    // 45 steps in two epochs (65 s); a third validation would not pay.
    assert_eq!(plan_steps(65.0, 1.0, 10.0, 30, 1000), 45);
    // 30 steps and one validation (40 s); a second epoch's validation leaves no room.
    assert_eq!(plan_steps(41.0, 1.0, 10.0, 30, 1000), 30);
    // Not even one validation fits; nonsense inputs plan nothing.
    assert_eq!(plan_steps(5.0, 1.0, 10.0, 30, 1000), 0);
    assert_eq!(plan_steps(-1.0, 1.0, 0.0, 30, 1000), 0);
    assert_eq!(plan_steps(100.0, 0.0, 0.0, 30, 1000), 0);
    assert_eq!(plan_steps(f64::NAN, 1.0, 0.0, 30, 1000), 0);
    // Half-second steps, no overhead: everything allowed.
    assert_eq!(plan_steps(1e6, 0.5, 0.0, 30, 90), 90);
}

/// A time budget re-plans the run after its first epoch: a generous budget stretches a
/// 100-step first plan to what the epochs allow (the cosine ends at its floor there), a
/// budget already spent ends the run after epoch 1, and the plan survives a resume.
#[test]
fn time_budget_replans_after_the_first_epoch_and_survives_resume() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let train = phantoms(12, 1, cfg.label_size); // 3 batches of 4 per epoch
    let val = phantoms(4, 2, cfg.label_size);
    let run = |budget: Option<f64>, name: &str| {
        let m = model(&cfg);
        let tc = TrainConfig {
            epochs: 3,
            schedule_steps: Some(100),
            time_budget_secs: budget,
            ..quiet(100)
        };
        let mut t = Trainer::new(
            &m,
            tc.clone(),
            train.clone(),
            val.clone(),
            pre,
            dir.path().join(name),
        )
        .unwrap();
        let summary = t.fit().unwrap();
        (tc, summary, t.planned_steps(), t.last_checkpoint())
    };
    let (tc, generous, planned, _) = run(Some(1e6), "generous");
    assert_eq!(planned, Some(9));
    assert_eq!(generous.steps, 9);
    let last = generous.epochs.last().unwrap();
    let min_lr = tc.lr * tc.min_lr_frac;
    assert!(
        (last.lr - min_lr).abs() < 1e-12,
        "lr {} vs {min_lr}",
        last.lr
    );

    let (_, spent, planned, last_ck) = run(Some(1e-3), "spent");
    assert_eq!(planned, Some(3));
    assert_eq!(spent.steps, 3);
    assert_eq!(spent.epochs.len(), 1);
    // The first plan's warm-up (5% of 100 steps) was still running at step 3: the new
    // plan shortens it to the steps taken (5% of 3 rounds to 0).
    let ck = tgc_train::checkpoint::load_checkpoint(&last_ck, &Device::Cpu).unwrap();
    assert_eq!(ck.meta(tgc_train::META_PLANNED_STEPS).unwrap(), "3");
    assert_eq!(ck.meta(tgc_train::META_PLANNED_WARMUP).unwrap(), "3");

    // A resumed run keeps the plan even without a budget of its own.
    let m = model(&cfg);
    let mut t = Trainer::new(
        &m,
        quiet(100),
        train.clone(),
        val.clone(),
        pre,
        dir.path().join("resumed"),
    )
    .unwrap();
    t.resume(&last_ck).unwrap();
    assert_eq!(t.planned_steps(), Some(3));
    assert_eq!(t.fit().unwrap().steps, 3);
}

/// A dataset's mirror image built from its samples: every pixel row and mask row reversed
/// and, when `swap_text`, "left"/"right" swapped in the captions. Independent of the
/// loader's flip (which mirrors while resampling).
struct Mirrored {
    inner: Arc<dyn SegDataset>,
    swap_text: bool,
}

impl SegDataset for Mirrored {
    fn name(&self) -> &str {
        "mirrored"
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, i: usize) -> tgc_data::Result<Sample> {
        let mut s = self.inner.get(i)?;
        let w = s.image.width;
        for row in s.image.data.chunks_mut(w) {
            row.reverse();
        }
        for row in s.mask.data.chunks_mut(s.mask.width) {
            row.reverse();
        }
        if self.swap_text {
            s.caption = swap_left_right(&s.caption);
            s.aux_caption = s.aux_caption.as_deref().map(swap_left_right);
        }
        Ok(s)
    }
}

/// Probability maps (one flat `S x S` vector per image) and the summary of an evaluation.
fn eval_probs(
    model: &TgcNet,
    ds: Arc<dyn SegDataset>,
    pre: Preprocess,
    tta: Tta,
) -> (tgc_data::MetricsSummary, Vec<Vec<f32>>) {
    let mut store = FeatureStore::new(None, &pre, false);
    let mut maps = vec![];
    let (m, _) = evaluate(model, ds, pre, 4, &mut store, false, tta, |batch, probs| {
        for i in 0..batch.len() {
            maps.push(probs.get(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    })
    .unwrap();
    (m, maps)
}

#[test]
fn flip_tta_averages_the_plain_and_the_mirrored_pass() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let s = cfg.label_size;
    let ds: Arc<dyn SegDataset> = Arc::new(SyntheticPhantoms::new(
        PhantomKind::ChestXray,
        6,
        3,
        cfg.label_size,
    ));
    assert!((0..ds.len()).any(|i| {
        let c = ds.get(i).unwrap().caption;
        c.contains("left") || c.contains("right")
    }));
    let m = model(&cfg);
    let mirrored = |swap_text| -> Arc<dyn SegDataset> {
        Arc::new(Mirrored {
            inner: ds.clone(),
            swap_text,
        })
    };
    let (plain_m, plain) = eval_probs(&m, ds.clone(), pre, Tta::None);
    let (_, mirror) = eval_probs(&m, mirrored(true), pre, Tta::None);
    let (_, mirror_same_text) = eval_probs(&m, mirrored(false), pre, Tta::None);
    let (tta_m, tta) = eval_probs(&m, ds.clone(), pre, Tta::Flip);
    assert_eq!(tta.len(), ds.len());

    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max)
    };
    // Mean of the plain map and the mirrored map mirrored back, pixel by pixel.
    let expected: Vec<Vec<f32>> = plain
        .iter()
        .zip(&mirror)
        .map(|(p, q)| {
            (0..s * s)
                .map(|k| {
                    let (y, x) = (k / s, k % s);
                    0.5 * (p[k] + q[y * s + (s - 1 - x)])
                })
                .collect()
        })
        .collect();
    let err = max_diff(&tta, &expected);
    assert!(err < 1e-4, "flip TTA differs from the oracle by {err}");
    // The check has teeth: the model is not mirror-symmetric and reads the swapped words.
    assert!(max_diff(&tta, &plain) > 1e-3);
    assert!(max_diff(&mirror, &mirror_same_text) > 1e-4);
    assert_ne!(tta_m.dice, plain_m.dice);
}

#[test]
fn early_stopping_ends_the_run_after_patience_epochs_without_improvement() {
    // With lr 0 the weights never change, so val Dice repeats exactly: epoch 1 sets the
    // best, epochs 2 and 3 fail to improve it, and patience 2 stops the run there.
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let train = phantoms(12, 1, cfg.label_size);
    let val = phantoms(4, 2, cfg.label_size);
    let dir = tempfile::tempdir().unwrap();
    let run = |patience, out: &str| {
        let m = model(&cfg);
        let tc = TrainConfig {
            epochs: 5,
            max_steps: None,
            lr: 0.0,
            patience,
            ..quiet(0)
        };
        Trainer::new(
            &m,
            tc,
            train.clone(),
            val.clone(),
            pre,
            dir.path().join(out),
        )
        .unwrap()
        .fit()
        .unwrap()
    };
    let stopped = run(2, "patience2");
    assert!(stopped.early_stopped);
    assert_eq!(stopped.epochs.len(), 3);
    assert_eq!(stopped.steps, 9, "3 epochs of 3 batches");
    let dice: Vec<f64> = stopped.epochs.iter().map(|r| r.val_dice).collect();
    assert!(dice.iter().all(|&d| d == dice[0]), "{dice:?}");
    assert!(stopped.best_checkpoint.is_file());

    let full = run(0, "patience0");
    assert!(!full.early_stopped);
    assert_eq!(full.epochs.len(), 5);
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The weight average: it never changes what is trained (the raw weights equal a run
/// without it), it follows the recurrence `s = d s + (1 - d) w` with the warm-up decay
/// (checked in f64 against the raw weights after every step), it is what validation
/// scores and `best.safetensors` holds, and a resumed run continues it bit for bit.
#[test]
fn weight_average_is_validated_saved_and_resumed_exactly() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let train = phantoms(12, 1, cfg.label_size);
    let val = phantoms(4, 2, cfg.label_size);
    let dir = tempfile::tempdir().unwrap();
    let decay = 0.2;
    let with_ema = |steps| TrainConfig {
        ema_decay: decay,
        ..quiet(steps)
    };
    let run = |tc: TrainConfig, out: &str| {
        let m = model(&cfg);
        let summary = Trainer::new(
            &m,
            tc,
            train.clone(),
            val.clone(),
            pre,
            dir.path().join(out),
        )
        .unwrap()
        .fit()
        .unwrap();
        (m, summary)
    };

    // The raw weights after 0..=6 steps, from runs without the average.
    let init = model(&cfg).trainable_tensors();
    let mut raw_after = vec![init.clone()];
    for k in 1..=6 {
        raw_after.push(run(quiet(k), &format!("plain{k}")).0.trainable_tensors());
    }

    let (a, summary) = run(with_ema(6), "ema");
    let last =
        tgc_train::load_checkpoint(dir.path().join("ema/last.safetensors"), &Device::Cpu).unwrap();
    let mut averaged_differs = false;
    for (name, w0) in &init {
        // Training itself is untouched, and the model is left holding the raw weights.
        assert!(
            flat(&a.trainable_tensors()[name]) == flat(&raw_after[6][name]),
            "{name}"
        );
        let raw_key = format!("{}{name}", tgc_train::RAW_WEIGHT_PREFIX);
        assert!(
            flat(&last.tensors[&raw_key]) == flat(&raw_after[6][name]),
            "{name}"
        );
        // The recurrence in f64.
        let mut s: Vec<f64> = flat(w0).iter().map(|&x| x as f64).collect();
        for (n, w) in raw_after[1..].iter().enumerate() {
            let d = decay.min((1.0 + n as f64) / (10.0 + n as f64));
            for (si, wi) in s.iter_mut().zip(flat(&w[name])) {
                *si = d * *si + (1.0 - d) * wi as f64;
            }
        }
        let got = flat(&last.tensors[name]);
        for (g, e) in got.iter().zip(&s) {
            assert!(
                (*g as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()),
                "{name}: average {g}, expected {e}"
            );
        }
        averaged_differs |= got != flat(&raw_after[6][name]);
    }
    assert!(averaged_differs, "the average equals the raw weights");
    let updates = last.tensors[tgc_train::EMA_UPDATES_KEY]
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(updates, 6);

    // `best.safetensors` loads like any checkpoint and scores what validation reported.
    let best = model(&cfg);
    best.load_weights(&summary.best_checkpoint).unwrap();
    let (m, _) = eval_probs(&best, val.clone(), pre, Tta::None);
    assert_eq!(m.dice, summary.best_val_dice);

    // 4 steps, then a restart that resumes and runs to 6: every tensor of the last
    // checkpoint (average, raw weights, moments) equals the straight run's.
    run(with_ema(4), "ema-b");
    let out_b = dir.path().join("ema-b");
    let c = model(&cfg);
    let mut t = Trainer::new(&c, with_ema(6), train.clone(), val.clone(), pre, &out_b).unwrap();
    t.resume(out_b.join("last.safetensors")).unwrap();
    assert_eq!(t.ema().unwrap().updates(), 4);
    t.fit().unwrap();
    assert!(t.ema().unwrap().is_detached());
    let resumed = tgc_train::load_checkpoint(out_b.join("last.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(resumed.tensors.len(), last.tensors.len());
    for (name, t) in &last.tensors {
        if t.dtype() == candle_core::DType::F32 {
            assert!(
                flat(t) == flat(&resumed.tensors[name]),
                "{name} differs after resume"
            );
        }
    }

    // Mixing runs with and without the average is refused, with the reason.
    let d = model(&cfg);
    let mut t = Trainer::new(&d, quiet(6), train.clone(), val.clone(), pre, &out_b).unwrap();
    let e = t
        .resume(out_b.join("last.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ema_decay"), "{e}");
    let plain = dir.path().join("plain4");
    let mut t = Trainer::new(&d, with_ema(6), train.clone(), val.clone(), pre, &plain).unwrap();
    let e = t
        .resume(plain.join("last.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ema.updates") && e.contains("last.safetensors"),
        "{e}"
    );
    for bad in [1.0, -0.5, f64::NAN] {
        let tc = TrainConfig {
            ema_decay: bad,
            ..quiet(1)
        };
        let r = Trainer::new(&d, tc, train.clone(), val.clone(), pre, &plain);
        assert!(
            r.is_err_and(|e| e.to_string().contains("ema_decay")),
            "{bad}"
        );
    }
}

#[test]
fn an_ensemble_scores_the_mean_of_its_members_maps() {
    let cfg = TgcConfig::tiny();
    let pre = preprocess(&cfg);
    let ds = phantoms(6, 5, cfg.label_size);
    let load = |seed| TgcNet::load(cfg.clone(), &WeightSource::Random { seed }, &Device::Cpu);
    let (a, b) = (load(1).unwrap(), load(2).unwrap());
    for tta in [Tta::None, Tta::Flip] {
        let (_, pa) = eval_probs(&a, ds.clone(), pre, tta);
        let (_, pb) = eval_probs(&b, ds.clone(), pre, tta);
        let mut maps = vec![];
        let (m, scores) =
            tgc_train::evaluate_ensemble(&[&a, &b], ds.clone(), pre, 4, false, tta, |batch, p| {
                for i in 0..batch.len() {
                    maps.push(p.get(i)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(())
            })
            .unwrap();
        assert_eq!((m.n_images, scores.len(), maps.len()), (6, 6, 6));
        let mut worst = 0f32;
        let mut spread = 0f32;
        for ((e, x), y) in maps.iter().zip(&pa).zip(&pb) {
            for k in 0..e.len() {
                worst = worst.max((e[k] - 0.5 * (x[k] + y[k])).abs());
                spread = spread.max((x[k] - y[k]).abs());
            }
        }
        assert!(
            worst < 1e-6,
            "{tta:?}: ensemble map off the members' mean by {worst}"
        );
        // Two different members, or the mean would equal either one.
        assert!(spread > 1e-3, "{tta:?}: the members agree to {spread}");
        // A one-member ensemble is plain evaluation.
        let (single, _) =
            tgc_train::evaluate_ensemble(&[&a], ds.clone(), pre, 4, false, tta, |_, _| Ok(()))
                .unwrap();
        let (plain, _) = eval_probs(&a, ds.clone(), pre, tta);
        assert_eq!(single.dice, plain.dice);
    }
}

#[test]
fn an_ensemble_refuses_members_of_another_geometry() {
    let cfg = TgcConfig::tiny();
    let mut other = cfg.clone();
    other.label_size = cfg.label_size / 2;
    let a = model(&cfg);
    let b = model(&other);
    let ds = phantoms(2, 5, cfg.label_size);
    let error_of = |members: &[&TgcNet]| {
        let pre = preprocess(&cfg);
        tgc_train::evaluate_ensemble(members, ds.clone(), pre, 2, false, Tta::None, |_, _| Ok(()))
            .unwrap_err()
            .to_string()
    };
    let err = error_of(&[&a, &b]);
    assert!(
        err.contains("member 1") && err.contains("geometry"),
        "{err}"
    );
    let err = error_of(&[]);
    assert!(err.contains("at least one member"), "{err}");
}
