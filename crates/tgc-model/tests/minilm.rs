//! The real all-MiniLM-L6-v2 text tower against sentence-transformers' output, recorded by
//! `tests/fixtures/make_minilm_fixture.py`.

use std::path::PathBuf;

use candle_core::Device;
use tgc_model::text::{BertTextTower, MINILM_FETCH_SCRIPT};

#[derive(serde::Deserialize)]
struct Case {
    caption: String,
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[test]
fn minilm_sentence_embedding_matches_sentence_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("weights/minilm");
    let tower = match BertTextTower::load(&dir, &Device::Cpu) {
        Ok(t) => t,
        Err(e) => panic!(
            "MiniLM weights missing ({e}); run `bash {MINILM_FETCH_SCRIPT}` from the repository root"
        ),
    };
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
