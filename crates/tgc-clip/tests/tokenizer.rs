//! Tokenizer ids against an independent Python implementation of open_clip's
//! SimpleTokenizer (tests/fixtures/tokenizer_ids.json.gz, written by
//! make_fixtures.py) on every distinct QaTa-COV19 caption plus edge cases.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use candle_core::Device;
use common::fixture;
use tgc_clip::{ClipTokenizer, Padding, EOS_ID};

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/clip-tokenizer.json")
}

fn reference() -> BTreeMap<String, Vec<u32>> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture("tokenizer_ids.json.gz")).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}

#[test]
fn paper_example() {
    let tok = ClipTokenizer::from_file(shipped()).unwrap();
    assert_eq!(
        tok.encode("a photo of a cat").unwrap(),
        vec![49406, 320, 1125, 539, 320, 2368, 49407]
    );
}

#[test]
fn matches_reference_on_all_captions() {
    let tok = ClipTokenizer::from_file(shipped()).unwrap();
    let table = reference();
    assert!(table.len() >= 60, "fixture has {} texts", table.len());
    for (text, want) in &table {
        assert_eq!(&tok.encode(text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn batch_padding_and_truncation() {
    let dev = Device::Cpu;
    let long = "tumour of the spleen ".repeat(30);
    let texts = ["a photo of a cat", long.as_str()];
    let table = reference();
    for padding in [Padding::Zero, Padding::Eos] {
        let tok = ClipTokenizer::from_file(shipped())
            .unwrap()
            .with_padding(padding);
        let (ids, mask) = tok.encode_batch(&texts, &dev).unwrap();
        assert_eq!(ids.dims(), &[2, 77]);
        assert_eq!(mask.dims(), &[2, 77]);
        let ids = ids.to_vec2::<u32>().unwrap();
        let mask = mask.to_vec2::<f32>().unwrap();
        let pad = if padding == Padding::Zero { 0 } else { EOS_ID };
        assert_eq!(&ids[0][..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[0][7..].iter().all(|&t| t == pad));
        assert!(mask[0][..7].iter().all(|&m| m == 1.0) && mask[0][7..].iter().all(|&m| m == 0.0));
        // truncated: 77 real tokens, EOS last, equal to the reference
        assert_eq!(&ids[1], &table[&long]);
        assert_eq!(ids[1][76], EOS_ID);
        assert!(mask[1].iter().all(|&m| m == 1.0));
    }
}

#[test]
fn not_a_clip_tokenizer_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    std::fs::write(&p, "{ not json").unwrap();
    assert!(matches!(
        ClipTokenizer::from_file(&p),
        Err(tgc_clip::Error::Tokenizer { .. })
    ));
}
