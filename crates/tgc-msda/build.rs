//! With feature `cuda`, compiles kernels/msda.cu to PTX with nvcc (into OUT_DIR); the CPU
//! build does nothing and needs no CUDA toolkit.
//!
//! Environment: `NVCC` (default `nvcc` on PATH), `CUDA_COMPUTE_CAP` (default 90, e.g. 80
//! for A100), extra flags in `TGC_MSDA_NVCC_FLAGS` (space separated).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/msda.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=TGC_MSDA_NVCC_FLAGS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ptx = out_dir.join("msda.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut cmd = std::process::Command::new(&nvcc);
    cmd.arg("--ptx")
        .arg(format!("-arch=compute_{cap}"))
        .arg("-O3")
        .arg("-o")
        .arg(&ptx)
        .arg("kernels/msda.cu");
    if let Ok(extra) = std::env::var("TGC_MSDA_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("tgc-msda: feature `cuda` needs nvcc ({nvcc}) to compile kernels/msda.cu: {e}")
    });
    assert!(
        status.success(),
        "tgc-msda: nvcc failed on kernels/msda.cu ({status})"
    );
}
