//! Preprocessing and heat-map writing against hand-computed values.

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, Luma, RgbImage};
use tgc_clip::{normalize, preprocess, write_heatmap_png, CLIP_MEAN, CLIP_STD};

#[test]
#[allow(clippy::needless_range_loop)]
fn preprocess_grey_is_repeated_and_normalised() {
    // 2x2 grey image at its own size: no resampling, only normalisation.
    let img = GrayImage::from_fn(2, 2, |x, y| Luma([(x * 100 + y * 50) as u8]));
    let t = preprocess(&DynamicImage::ImageLuma8(img), 2, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 2, 2]);
    let v = t.to_vec3::<f32>().unwrap();
    for c in 0..3 {
        for y in 0..2 {
            for x in 0..2 {
                let want = ((x * 100 + y * 50) as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
                assert!((v[c][y][x] - want).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn preprocess_centre_crops_the_long_side() {
    // 6 wide x 2 high at size 2: the shorter side already fits, so the centre 2x2
    // columns 2..4 are kept, channels in RGB order.
    let img = RgbImage::from_fn(6, 2, |x, _| image::Rgb([(x * 40) as u8, 0, 255]));
    let t = preprocess(&DynamicImage::ImageRgb8(img), 2, &Device::Cpu).unwrap();
    let v = t.to_vec3::<f32>().unwrap();
    for (xi, x) in [2u32, 3].iter().enumerate() {
        let r = ((x * 40) as f32 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((v[0][0][xi] - r).abs() < 1e-6);
        assert!((v[1][1][xi] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
        assert!((v[2][0][xi] - (1.0 - CLIP_MEAN[2]) / CLIP_STD[2]).abs() < 1e-6);
    }
    // normalize() on [0, 1] pixels gives the same numbers
    let raw = Tensor::new(&[[[0.5f32]], [[0.0]], [[1.0]]], &Device::Cpu).unwrap();
    let n = normalize(&raw)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((n[0] - (0.5 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
    assert!((n[2] - (1.0 - CLIP_MEAN[2]) / CLIP_STD[2]).abs() < 1e-6);
}

#[test]
fn heatmap_png_is_min_max_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.png");
    // 2 x 4 map; min at (0,0), max at (1,3); values shifted/scaled must not matter.
    let vals = [-3.0f32, 0.0, 1.0, 2.0, 0.5, 1.5, 2.5, 5.0];
    let map = Tensor::from_vec(vals.to_vec(), (2, 4), &Device::Cpu).unwrap();
    write_heatmap_png(&map, &p).unwrap();
    let scaled = ((map * 10.0).unwrap() + 7.0).unwrap();
    let p2 = dir.path().join("m2.png");
    write_heatmap_png(&scaled, &p2).unwrap();
    let a = image::open(&p).unwrap().to_rgb8();
    let b = image::open(&p2).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (256, 128)); // 64 px cells
    assert_eq!(a.as_raw(), b.as_raw());
    // bottom of the colour map is dark blue, top dark red
    assert_eq!(a.get_pixel(0, 0).0, [0, 0, 128]);
    assert_eq!(a.get_pixel(255, 127).0, [128, 0, 0]);
    // a cell is uniform
    assert_eq!(a.get_pixel(64, 0), a.get_pixel(127, 63));
    assert!(write_heatmap_png(
        &Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        &p
    )
    .is_err());
}
