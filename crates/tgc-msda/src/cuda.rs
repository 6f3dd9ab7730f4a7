//! CUDA kernels (kernels/msda.cu, compiled to PTX by build.rs) launched through candle's
//! CUDA device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};

use crate::Geometry;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/msda.ptx"));
const MODULE: &str = "tgc_msda";
const FWD_THREADS: u32 = 256;

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, name: &str) -> Result<CudaView<'a, T>> {
    let sl = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(sl.slice(a..b)),
        None => candle_core::bail!("ms_deform_attn (cuda): {name} must be contiguous"),
    }
}

/// `[H_0, W_0, ..., H_{L-1}, W_{L-1}, start_0, ..., start_{L-1}]` as i32 on the device.
fn level_table(
    g: &Geometry,
    dev: &CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>> {
    let mut t: Vec<i32> = Vec::with_capacity(3 * g.levels());
    for &(h, w) in &g.shapes {
        t.push(i32::try_from(h).map_err(|_| candle_core::Error::Msg("level too large".into()))?);
        t.push(i32::try_from(w).map_err(|_| candle_core::Error::Msg("level too large".into()))?);
    }
    for &s in &g.starts {
        t.push(i32::try_from(s).map_err(|_| candle_core::Error::Msg("value too long".into()))?);
    }
    dev.clone_htod(&t)
}

fn dims_i32(g: &Geometry) -> Result<[i32; 7]> {
    let c = |v: usize| {
        i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("ms_deform_attn (cuda): size {v} exceeds i32"))
        })
    };
    Ok([
        c(g.batch)?,
        c(g.value_len)?,
        c(g.heads)?,
        c(g.head_dim)?,
        c(g.queries)?,
        c(g.levels())?,
        c(g.points)?,
    ])
}

fn suffix(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        other => candle_core::bail!("ms_deform_attn (cuda): unsupported dtype {other:?}"),
    }
}

/// Forward kernel: one thread per output element.
pub(crate) fn forward(
    g: &Geometry,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        g: &Geometry,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &s1.device;
        let value = view::<T>(s1, l1, "value")?;
        let loc = view::<T>(s2, l2, "sampling_locations")?;
        let attn = view::<T>(s3, l3, "attention_weights")?;
        let level = level_table(g, dev)?;
        let total = g.batch * g.queries * g.heads * g.head_dim;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(total)? };
        let func =
            dev.get_or_load_custom_func(&format!("msda_fwd_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let blocks = total
            .div_ceil(FWD_THREADS as usize)
            .clamp(1, i32::MAX as usize) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let d = dims_i32(g)?;
        let mut b = func.builder();
        b.arg(&value);
        b.arg(&level);
        b.arg(&loc);
        b.arg(&attn);
        b.arg(&out);
        for v in &d {
            b.arg(v);
        }
        // SAFETY: argument list matches `msda_fwd_*` in kernels/msda.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let st = match s1.dtype() {
        DType::F32 => run::<f32>(g, s1, l1, s2, l2, s3, l3)?,
        DType::F64 => run::<f64>(g, s1, l1, s2, l2, s3, l3)?,
        other => candle_core::bail!("ms_deform_attn (cuda): unsupported dtype {other:?}"),
    };
    Ok((st, Shape::from((g.batch, g.queries, g.heads, g.head_dim))))
}

/// Backward kernel: gradients packed as `[grad_value | grad_locations | grad_weights]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    g: &Geometry,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    go: &CudaStorage,
    lgo: &Layout,
) -> Result<(CudaStorage, Shape)> {
    #[allow(clippy::too_many_arguments)]
    fn run<
        T: CudaDType
            + DeviceRepr
            + WithDType
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    >(
        g: &Geometry,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        go: &CudaStorage,
        lgo: &Layout,
    ) -> Result<(CudaStorage, usize)> {
        let dev = &s1.device;
        let value = view::<T>(s1, l1, "value")?;
        let loc = view::<T>(s2, l2, "sampling_locations")?;
        let attn = view::<T>(s3, l3, "attention_weights")?;
        let grad_out = view::<T>(go, lgo, "grad_output")?;
        let level = level_table(g, dev)?;
        let nv = g.batch * g.value_len * g.heads * g.head_dim;
        let nw = g.batch * g.queries * g.heads * g.levels() * g.points;
        let total = nv + 3 * nw;
        let dh = g.head_dim;
        if dh == 0 || dh > 1024 {
            candle_core::bail!("ms_deform_attn (cuda): head dim {dh} must be in 1..=1024");
        }
        // Value gradients are accumulated with atomicAdd: start from zero.
        let mut buf = dev.alloc_zeros::<T>(total)?;
        {
            let mut all = buf.slice_mut(0..total);
            let (mut gv, mut rest) = all.split_at_mut(nv);
            let (mut gl, mut ga) = rest.split_at_mut(2 * nw);
            let func = dev.get_or_load_custom_func(
                &format!("msda_bwd_{}", suffix(T::DTYPE)?),
                MODULE,
                PTX,
            )?;
            let groups_per_block = (256 / dh).max(1);
            let groups = g.batch * g.queries * g.heads;
            let blocks = groups
                .div_ceil(groups_per_block)
                .clamp(1, i32::MAX as usize) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (dh as u32, groups_per_block as u32, 1),
                shared_mem_bytes: (3 * dh * groups_per_block * std::mem::size_of::<T>()) as u32,
            };
            let d = dims_i32(g)?;
            let pow2 = dh.next_power_of_two() as i32;
            let mut b = func.builder();
            b.arg(&value);
            b.arg(&level);
            b.arg(&loc);
            b.arg(&attn);
            b.arg(&grad_out);
            b.arg(&mut gv);
            b.arg(&mut gl);
            b.arg(&mut ga);
            for v in &d {
                b.arg(v);
            }
            b.arg(&pow2);
            // SAFETY: argument list matches `msda_bwd_*` in kernels/msda.cu; shared memory
            // holds three arrays of blockDim.x * blockDim.y elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(buf, dev.clone()), total))
    }
    let (st, total) = match s1.dtype() {
        DType::F32 => run::<f32>(g, s1, l1, s2, l2, s3, l3, go, lgo)?,
        DType::F64 => run::<f64>(g, s1, l1, s2, l2, s3, l3, go, lgo)?,
        other => candle_core::bail!("ms_deform_attn (cuda): unsupported dtype {other:?}"),
    };
    Ok((st, Shape::from(total)))
}
