//! Auxiliary prompt sources: side files (CSV, JSONL), dataset column, rewriter.

use std::path::Path;

use tgc_data::*;

const CAP: &str = "unilateral pulmonary infection, one infected area, lower left lung.";

fn lvit(dir: &Path, csv: &str) -> std::path::PathBuf {
    let root = dir.join("MosMedData+");
    let f = root.join("Train_Folder");
    std::fs::create_dir_all(f.join("img")).unwrap();
    std::fs::create_dir_all(f.join("labelcol")).unwrap();
    // MosMedData+ style: image and mask share the name; RGB grey image.
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9]))
        .save(f.join("img/a.png"))
        .unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([1]))
        .save(f.join("labelcol/a.png"))
        .unwrap();
    std::fs::write(f.join("Train_text.csv"), csv).unwrap();
    root
}

#[test]
fn side_files_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("aux.csv");
    std::fs::write(&csv, format!("caption,aux\n\"{CAP}\",\"LLM text A\"\n")).unwrap();
    let jsonl = dir.path().join("aux.jsonl");
    std::fs::write(
        &jsonl,
        format!("{{\"caption\": \"{CAP}\", \"aux\": \"LLM text B\"}}\n\n"),
    )
    .unwrap();
    let a = AuxPromptSource::from_side_file(&csv).unwrap();
    let b = AuxPromptSource::from_side_file(&jsonl).unwrap();
    assert_eq!(a.lookup(CAP, None).unwrap().as_deref(), Some("LLM text A"));
    assert_eq!(b.lookup(CAP, None).unwrap().as_deref(), Some("LLM text B"));
    let err = a.lookup("other caption", None).unwrap_err().to_string();
    assert!(
        err.contains("aux.csv") && err.contains("other caption"),
        "{err}"
    );

    // Through a dataset: side file, column, default (rewriter, CT for MosMed roots).
    let root = lvit(
        dir.path(),
        &format!("Image,Description,Aux\na.png,\"{CAP}\",column text\n"),
    );
    let with = |aux| {
        LvitDataset::open_with(
            &root,
            Split::Train,
            LvitOptions {
                aux: Some(aux),
                text_file: None,
            },
        )
        .unwrap()
        .get(0)
        .unwrap()
    };
    assert_eq!(with(a.clone()).aux_caption.as_deref(), Some("LLM text A"));
    assert_eq!(
        with(AuxPromptSource::Column("Aux".into()))
            .aux_caption
            .as_deref(),
        Some("column text")
    );
    assert_eq!(with(AuxPromptSource::None).aux_caption, None);
    let s = LvitDataset::open(&root, Split::Train)
        .unwrap()
        .get(0)
        .unwrap();
    assert_eq!(
        s.aux_caption.as_deref(),
        Some("Chest CT with a focal opacity in the left lower zone.")
    );
    // Same-name image found; RGB grey collapsed to one channel; mask value 1 -> foreground.
    assert_eq!(s.image.channels, 1);
    assert!((s.image.data[0] - 9.0 / 255.0).abs() < 1e-7);
    assert_eq!(s.mask.count(), 16);
    // A missing column named as the aux source is an error naming the table.
    let err = LvitDataset::open_with(
        &root,
        Split::Train,
        LvitOptions {
            aux: Some(AuxPromptSource::Column("Nope".into())),
            text_file: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Train_text.csv") && err.contains("\"Nope\""),
        "{err}"
    );
}
