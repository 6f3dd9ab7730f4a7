//! The real all-MiniLM-L6-v2 text tower against sentence-transformers' output, recorded by
//! `tests/fixtures/make_minilm_fixture.py`.

use std::path::PathBuf;

use candle_core::Device;
use tgc_model::text::{BertTextTower, MINILM_FETCH_SCRIPT};
use tgc_model::{clip_param_count, TgcConfig, TgcNet, WeightSource};

mod common;
use common::check_gradients;

fn minilm_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM weights missing in {}; run `bash {MINILM_FETCH_SCRIPT}` from the repository root",
        dir.display()
    );
    dir
}

#[derive(serde::Deserialize)]
struct Case {
    caption: String,
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[test]
fn minilm_sentence_embedding_matches_sentence_transformers() {
    let dir = minilm_dir();
    let tower = match BertTextTower::load(&dir, &Device::Cpu) {
        Ok(t) => t,
        Err(e) => panic!(
            "MiniLM weights missing ({e}); run `bash {MINILM_FETCH_SCRIPT}` from the repository root"
        ),
    };
    // The safetensors header lists 22,713,216 f32 parameters (the model card's 22.7M);
    // less the pooler's 384 x 384 + 384 = 147,840, which the encoder does not load.
    assert_eq!(tower.param_count(), 22_713_216 - 147_840);
    let cases: Vec<Case> =
        serde_json::from_str(include_str!("fixtures/minilm_embedding.json")).unwrap();
    for case in cases {
        let (ids, mask) = tower.tokenize(&[&case.caption], 128).unwrap();
        let n = case.input_ids.len();
        let got_ids: Vec<u32> = ids.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(
            &got_ids[..n],
            &case.input_ids[..],
            "token ids of {:?}",
            case.caption
        );
        let m: Vec<f32> = mask.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(m.iter().filter(|&&x| x == 1.0).count(), n);
        let emb: Vec<f32> = tower
            .sentence_embedding(&[&case.caption])
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = emb
            .iter()
            .zip(&case.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{:?}: max abs diff {worst}", case.caption);
    }
}

/// The `tiny` model with MiniLM as its text tower (`train_qata --text-tower minilm`):
/// the tower's 22.6M parameters count as frozen, its states are 384 wide, and every
/// trainable parameter, including DATE's and VLCM's projections from those states, gets a
/// gradient while the frozen features carry no graph (the model tests' check).
#[test]
fn tiny_model_with_minilm_trains_every_parameter_and_counts_the_tower_as_frozen() {
    let cfg = TgcConfig::tiny().with_bert_text(minilm_dir().display().to_string(), 384);
    let model = TgcNet::load(cfg.clone(), &WeightSource::Random { seed: 1 }, &Device::Cpu).unwrap();
    assert_eq!(
        model.param_counts().frozen,
        clip_param_count(&cfg) + 22_713_216 - 147_840
    );
    let (primary, _) = model
        .encode_prompts(&[vec!["upper left lung".to_string()]], None)
        .unwrap();
    assert_eq!(primary.states.dim(2).unwrap(), 384);
    check_gradients(cfg, 1);
}
