//! Where the model runs, chosen by name (the `--device` flag of `tgc` and the examples).

use candle_core::Device;

use crate::{Error, Result};

/// The device named by `spec`:
///
/// - `auto`: the first CUDA GPU when this build has CUDA (feature `cuda`) and one
///   answers, else the first Metal GPU likewise (feature `metal`), else the CPU;
/// - `cpu`;
/// - `cuda` or `cuda:N`, `metal` or `metal:N` (ordinal `N`, default 0).
///
/// Asking for CUDA or Metal in a build without that feature is an error that names the
/// feature to build with; a GPU that does not answer is an error with candle's reason.
/// Case and surrounding spaces are ignored.
///
/// ```
/// use candle_core::Device;
///
/// assert!(matches!(tgc_model::select_device("cpu")?, Device::Cpu));
/// assert!(tgc_model::select_device("tpu").is_err());
/// # Ok::<(), tgc_model::Error>(())
/// ```
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => {
            let n = n.parse::<usize>().map_err(|_| {
                Error::Device(format!(
                    "{spec:?}: the part after ':' must be a device number, e.g. cuda:0"
                ))
            })?;
            (kind, Some(n))
        }
        None => (spec.as_str(), None),
    };
    let n = ordinal.unwrap_or(0);
    match (kind, ordinal) {
        ("cpu", None) => Ok(Device::Cpu),
        ("auto", None) => Ok(auto()),
        ("cuda", _) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Device(format!(
                    "{spec}: this build has no CUDA support; rebuild with `--features cuda` \
                     (docs/reproducing.md)"
                )));
            }
            Device::new_cuda(n).map_err(|e| Error::Device(format!("cuda:{n}: {e}")))
        }
        ("metal", _) => {
            if !candle_core::utils::metal_is_available() {
                return Err(Error::Device(format!(
                    "{spec}: this build has no Metal support; rebuild with `--features metal`"
                )));
            }
            Device::new_metal(n).map_err(|e| Error::Device(format!("metal:{n}: {e}")))
        }
        _ => Err(Error::Device(format!(
            "unknown device {spec:?}: expected auto, cpu, cuda, cuda:N, metal or metal:N"
        ))),
    }
}

fn auto() -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_missing_backends_name_their_feature() {
        assert!(matches!(select_device(" CPU ").unwrap(), Device::Cpu));
        for bad in ["tpu", "cpu:0", "auto:1", "cuda:x", "cuda:", ""] {
            let e = select_device(bad).unwrap_err().to_string();
            assert!(e.starts_with("device: "), "{bad}: {e}");
        }
        let e = select_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("device number"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = select_device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        if !candle_core::utils::metal_is_available() {
            let e = select_device("metal").unwrap_err().to_string();
            assert!(e.contains("--features metal"), "{e}");
        }
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(matches!(select_device("auto").unwrap(), Device::Cpu));
        }
    }
}
