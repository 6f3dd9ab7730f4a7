//! The sampling core `ms_deform_attn`: a fused custom op (CPU kernel, CUDA kernel behind
//! the `cuda` feature) and a composite implementation from plain candle ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{cpu, Error, Result};

/// Which implementation of the sampling core to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MsdaImpl {
    /// Fused kernel where one exists for the device (CPU; CUDA with the `cuda` feature),
    /// composite otherwise (e.g. Metal).
    #[default]
    Auto,
    /// The fused custom op; an error on devices without a kernel.
    Fused,
    /// The composite implementation from `floor`, `index_select` and elementwise ops.
    Composite,
}

/// Sizes of one `ms_deform_attn` call, checked against the tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Batch size `N`.
    pub batch: usize,
    /// Total value length `S = sum_l H_l * W_l`.
    pub value_len: usize,
    /// Number of heads `M`.
    pub heads: usize,
    /// Channels per head `Dh`.
    pub head_dim: usize,
    /// Number of queries `Lq`.
    pub queries: usize,
    /// Sampling points per level and head `P`.
    pub points: usize,
    /// `(H_l, W_l)` per level.
    pub shapes: Vec<(usize, usize)>,
    /// Start of each level in the value sequence (exclusive prefix sum of `H_l * W_l`).
    pub starts: Vec<usize>,
}

impl Geometry {
    /// Number of levels `L`.
    pub fn levels(&self) -> usize {
        self.shapes.len()
    }

    /// Checks the shapes of the three inputs and derives the geometry.
    pub fn from_tensors(
        value: &Tensor,
        spatial_shapes: &[(usize, usize)],
        sampling_locations: &Tensor,
        attention_weights: &Tensor,
    ) -> Result<Self> {
        let (n, s, m, dh) = value.dims4().map_err(|_| {
            Error::Shape(format!(
                "value must be N x S x M x Dh, got {:?}",
                value.dims()
            ))
        })?;
        if spatial_shapes.is_empty() {
            return Err(Error::Shape("spatial_shapes is empty".into()));
        }
        let mut starts = Vec::with_capacity(spatial_shapes.len());
        let mut total = 0usize;
        for &(h, w) in spatial_shapes {
            if h == 0 || w == 0 {
                return Err(Error::Shape(format!(
                    "empty level in spatial_shapes {spatial_shapes:?}"
                )));
            }
            starts.push(total);
            total += h * w;
        }
        if total != s {
            return Err(Error::Shape(format!(
                "value has S = {s} but spatial_shapes {spatial_shapes:?} sum to {total}"
            )));
        }
        let l = spatial_shapes.len();
        let ld = sampling_locations.dims();
        if ld.len() != 6 || ld[0] != n || ld[2] != m || ld[3] != l || ld[5] != 2 {
            return Err(Error::Shape(format!(
                "sampling_locations must be N x Lq x M x L x P x 2 = {n} x Lq x {m} x {l} x P x 2, got {ld:?}"
            )));
        }
        let (lq, p) = (ld[1], ld[4]);
        if attention_weights.dims() != [n, lq, m, l, p] {
            return Err(Error::Shape(format!(
                "attention_weights must be N x Lq x M x L x P = {:?}, got {:?}",
                [n, lq, m, l, p],
                attention_weights.dims()
            )));
        }
        let dt = value.dtype();
        if !matches!(dt, DType::F32 | DType::F64)
            || sampling_locations.dtype() != dt
            || attention_weights.dtype() != dt
        {
            return Err(Error::DType(format!(
                "value, sampling_locations and attention_weights must share dtype f32 or f64, got {:?}, {:?}, {:?}",
                dt,
                sampling_locations.dtype(),
                attention_weights.dtype()
            )));
        }
        Ok(Self {
            batch: n,
            value_len: s,
            heads: m,
            head_dim: dh,
            queries: lq,
            points: p,
            shapes: spatial_shapes.to_vec(),
            starts,
        })
    }

    fn value_elems(&self) -> usize {
        self.batch * self.value_len * self.heads * self.head_dim
    }

    fn weight_elems(&self) -> usize {
        self.batch * self.queries * self.heads * self.levels() * self.points
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.queries, self.heads, self.head_dim))
    }
}

/// Multi-scale deformable attention sampling core (Deformable DETR's
/// `ms_deform_attn_core_pytorch` semantics).
///
/// - `value`: `N x S x M x Dh`, the levels flattened row-major and concatenated along `S`,
/// - `spatial_shapes`: `(H_l, W_l)` for each level, `sum H_l W_l = S`,
/// - `sampling_locations`: `N x Lq x M x L x P x 2`, `(x, y)` normalised to `[0, 1]`;
///   sampling is bilinear at pixel coordinates `(x W - 0.5, y H - 0.5)` with zeros
///   outside the level (`grid_sample(align_corners=False, padding_mode="zeros")`),
/// - `attention_weights`: `N x Lq x M x L x P`.
///
/// Returns `N x Lq x (M Dh)`. f32 or f64. Differentiable with respect to the three
/// tensors. `imp` selects the implementation ([`MsdaImpl::Auto`]: fused where possible).
pub fn ms_deform_attn(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
    imp: MsdaImpl,
) -> Result<Tensor> {
    let geom =
        Geometry::from_tensors(value, spatial_shapes, sampling_locations, attention_weights)?;
    let fused = match imp {
        MsdaImpl::Composite => false,
        MsdaImpl::Fused => true,
        MsdaImpl::Auto => has_fused_kernel(value.device()),
    };
    let out = if fused {
        if !has_fused_kernel(value.device()) {
            return Err(Error::Unsupported(format!(
                "no fused ms_deform_attn kernel for device {:?} (build with feature `cuda` for CUDA, or use MsdaImpl::Composite)",
                value.device().location()
            )));
        }
        value.contiguous()?.apply_op3_arc(
            &sampling_locations.contiguous()?,
            &attention_weights.contiguous()?,
            std::sync::Arc::new(Box::new(MsDeformAttnOp { geom: geom.clone() })),
        )?
    } else {
        composite(value, &geom, sampling_locations, attention_weights)?
    };
    Ok(out.reshape((geom.batch, geom.queries, geom.heads * geom.head_dim))?)
}

/// Gradients of [`ms_deform_attn`] (fused kernel) for a given output gradient, without
/// autograd: what the op's backward computes when `backward()` reaches it, for callers
/// that drive the gradient themselves (PyTorch's `out.backward(grad_out)`).
///
/// Shapes as in [`ms_deform_attn`]; `grad_output`: `N x Lq x (M Dh)`. Returns the
/// gradients of `(value, sampling_locations, attention_weights)` in their shapes.
pub fn ms_deform_attn_backward(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
    grad_output: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let geom =
        Geometry::from_tensors(value, spatial_shapes, sampling_locations, attention_weights)?;
    if !has_fused_kernel(value.device()) {
        return Err(Error::Unsupported(format!(
            "no fused ms_deform_attn kernel for device {:?}",
            value.device().location()
        )));
    }
    let want = [geom.batch, geom.queries, geom.heads * geom.head_dim];
    if grad_output.dims() != want {
        return Err(Error::Shape(format!(
            "grad_output must be N x Lq x (M Dh) = {want:?}, got {:?}",
            grad_output.dims()
        )));
    }
    let op = MsDeformAttnOp { geom };
    let (gv, gl, ga) = candle_core::CustomOp3::bwd(
        &op,
        &value.contiguous()?,
        &sampling_locations.contiguous()?,
        &attention_weights.contiguous()?,
        grad_output,
        &grad_output.reshape(op.geom.out_shape())?,
    )?;
    let missing = || Error::Unsupported("fused backward returned no gradient".into());
    Ok((
        gv.ok_or_else(missing)?,
        gl.ok_or_else(missing)?,
        ga.ok_or_else(missing)?,
    ))
}

/// Whether [`MsdaImpl::Auto`] picks the fused kernel on this device.
pub fn has_fused_kernel(dev: &candle_core::Device) -> bool {
    match dev {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda"),
        _ => false,
    }
}

/// Composite implementation: per level and corner, `floor` + `index_select` + weights.
/// Differentiable through candle's own backward passes (the floor is detached; the
/// fractional parts carry the location gradient).
fn composite(value: &Tensor, g: &Geometry, loc: &Tensor, attn: &Tensor) -> Result<Tensor> {
    let (n, m, dh, lq, p) = (g.batch, g.heads, g.head_dim, g.queries, g.points);
    let dt = value.dtype();
    let dev = value.device();
    // (N M) x Lq x L x P x 2 and (N M) x Lq x L x P.
    let loc = loc
        .permute((0, 2, 1, 3, 4, 5))?
        .reshape((n * m, lq, g.levels(), p, 2))?;
    let attn = attn
        .permute((0, 2, 1, 3, 4))?
        .reshape((n * m, lq, g.levels(), p))?;
    // Offset of each (n, m) image-head block in the flattened per-level value.
    let mut acc: Option<Tensor> = None;
    for (l, &(h, w)) in g.shapes.iter().enumerate() {
        let hw = h * w;
        // (N M HW) x Dh
        let v_l = value
            .narrow(1, g.starts[l], hw)?
            .permute((0, 2, 1, 3))?
            .reshape((n * m * hw, dh))?;
        let block = Tensor::arange(0u32, (n * m) as u32, dev)?
            .to_dtype(DType::F64)?
            .affine(hw as f64, 0.0)?
            .reshape((n * m, 1, 1))?;
        let loc_l = loc.narrow(2, l, 1)?.squeeze(2)?; // (N M) x Lq x P x 2
        let x = loc_l
            .narrow(D::Minus1, 0, 1)?
            .squeeze(D::Minus1)?
            .affine(w as f64, -0.5)?;
        let y = loc_l
            .narrow(D::Minus1, 1, 1)?
            .squeeze(D::Minus1)?
            .affine(h as f64, -0.5)?;
        let x0 = x.detach().floor()?;
        let y0 = y.detach().floor()?;
        let fx = (&x - &x0)?;
        let fy = (&y - &y0)?;
        let x0d = x0.to_dtype(DType::F64)?;
        let y0d = y0.to_dtype(DType::F64)?;
        let a_l = attn.narrow(2, l, 1)?.squeeze(2)?; // (N M) x Lq x P
        for (dy, dx) in [(0u8, 0u8), (0, 1), (1, 0), (1, 1)] {
            let xi = x0d.affine(1.0, dx as f64)?;
            let yi = y0d.affine(1.0, dy as f64)?;
            let valid = xi
                .ge(0.0)?
                .mul(&xi.lt(w as f64)?)?
                .mul(&yi.ge(0.0)?)?
                .mul(&yi.lt(h as f64)?)?
                .to_dtype(DType::F64)?;
            let idx = (yi.clamp(0.0, (h - 1) as f64)?.affine(w as f64, 0.0)?
                + xi.clamp(0.0, (w - 1) as f64)?)?
            .broadcast_add(&block)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
            let wx = if dx == 1 {
                fx.clone()
            } else {
                fx.affine(-1.0, 1.0)?
            };
            let wy = if dy == 1 {
                fy.clone()
            } else {
                fy.affine(-1.0, 1.0)?
            };
            let wt = (wx * wy)?.mul(&valid.to_dtype(dt)?)?.mul(&a_l)?; // (N M) x Lq x P
            let sampled = v_l.index_select(&idx, 0)?.reshape((n * m, lq, p, dh))?;
            let contrib = sampled.broadcast_mul(&wt.unsqueeze(D::Minus1)?)?.sum(2)?; // (N M) x Lq x Dh
            acc = Some(match acc {
                None => contrib,
                Some(a) => (a + contrib)?,
            });
        }
    }
    let acc = acc.ok_or_else(|| Error::Shape("no levels".into()))?;
    Ok(acc
        .reshape((n, m, lq, dh))?
        .permute((0, 2, 1, 3))?
        .contiguous()?)
}

/// Slice of a contiguous CPU tensor's storage.
fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("ms_deform_attn: {name} must be contiguous"),
    }
}

/// The dtype of CPU storages that all hold f32 or all f64; None otherwise.
fn same_float_dtype(storages: &[&CpuStorage]) -> Option<DType> {
    use candle_core::backend::BackendStorage;
    let d = storages.first()?.dtype();
    let same = storages.iter().all(|s| s.dtype() == d);
    (same && matches!(d, DType::F32 | DType::F64)).then_some(d)
}

/// A CPU input of the op: storage, layout and its name in errors.
type Input<'a> = (&'a CpuStorage, &'a Layout, &'a str);

/// [`cpu::forward`] on storages of element type `T` (checked by the caller).
fn forward_cpu<T: cpu::Real + candle_core::WithDType>(
    g: &Geometry,
    out_len: usize,
    [(s1, l1, n1), (s2, l2, n2), (s3, l3, n3)]: [Input; 3],
) -> candle_core::Result<Vec<T>> {
    let mut out = vec![T::ZERO; out_len];
    cpu::forward(
        g,
        cpu_slice::<T>(s1, l1, n1)?,
        cpu_slice::<T>(s2, l2, n2)?,
        cpu_slice::<T>(s3, l3, n3)?,
        &mut out,
    );
    Ok(out)
}

/// [`cpu::backward`] on storages of element type `T`: `[grad_value | grad_locations |
/// grad_weights]` in one buffer.
fn backward_cpu<T: cpu::Real + candle_core::WithDType>(
    g: &Geometry,
    [(s1, l1, n1), (s2, l2, n2), (s3, l3, n3), (go, lo, no)]: [Input; 4],
) -> candle_core::Result<Vec<T>> {
    let (nv, nw) = (g.value_elems(), g.weight_elems());
    let mut buf = vec![T::ZERO; nv + 3 * nw];
    let (gv, rest) = buf.split_at_mut(nv);
    let (gl, ga) = rest.split_at_mut(2 * nw);
    cpu::backward(
        g,
        cpu_slice::<T>(s1, l1, n1)?,
        cpu_slice::<T>(s2, l2, n2)?,
        cpu_slice::<T>(s3, l3, n3)?,
        cpu_slice::<T>(go, lo, no)?,
        gv,
        gl,
        ga,
    );
    Ok(buf)
}

/// The fused forward op; inputs are (value, sampling_locations, attention_weights).
struct MsDeformAttnOp {
    geom: Geometry,
}

impl CustomOp3 for MsDeformAttnOp {
    fn name(&self) -> &'static str {
        "ms-deform-attn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let out_len = g.out_shape().elem_count();
        let inputs = [
            (s1, l1, "value"),
            (s2, l2, "sampling_locations"),
            (s3, l3, "attention_weights"),
        ];
        let storage = match same_float_dtype(&[s1, s2, s3]) {
            Some(DType::F32) => CpuStorage::F32(forward_cpu::<f32>(g, out_len, inputs)?),
            Some(DType::F64) => CpuStorage::F64(forward_cpu::<f64>(g, out_len, inputs)?),
            _ => candle_core::bail!("ms_deform_attn: inputs must all be f32 or all f64"),
        };
        Ok((storage, g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::forward(&self.geom, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        value: &Tensor,
        loc: &Tensor,
        attn: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.geom;
        let grad_out = grad_res.contiguous()?;
        let packed = value.apply_op3_no_bwd(
            loc,
            attn,
            &MsDeformAttnBackwardOp {
                geom: g.clone(),
                grad_out,
            },
        )?;
        let nv = g.value_elems();
        let nw = g.weight_elems();
        let gv = packed.narrow(0, 0, nv)?.reshape(value.shape())?;
        let gl = packed.narrow(0, nv, 2 * nw)?.reshape(loc.shape())?;
        let ga = packed.narrow(0, nv + 2 * nw, nw)?.reshape(attn.shape())?;
        Ok((Some(gv), Some(gl), Some(ga)))
    }
}

/// The fused backward op: computes the three gradients packed in one flat buffer
/// `[grad_value | grad_locations | grad_weights]`; the output gradient rides in the op.
struct MsDeformAttnBackwardOp {
    geom: Geometry,
    grad_out: Tensor,
}

impl CustomOp3 for MsDeformAttnBackwardOp {
    fn name(&self) -> &'static str {
        "ms-deform-attn-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let nv = g.value_elems();
        let nw = g.weight_elems();
        let total = nv + 3 * nw;
        let (go_storage, go_layout) = self.grad_out.storage_and_layout();
        let go = match &*go_storage {
            Storage::Cpu(s) => s,
            _ => candle_core::bail!("ms_deform_attn backward: output gradient is not on the CPU"),
        };
        let inputs = [
            (s1, l1, "value"),
            (s2, l2, "sampling_locations"),
            (s3, l3, "attention_weights"),
            (go, go_layout, "grad_output"),
        ];
        let storage = match same_float_dtype(&[s1, s2, s3, go]) {
            Some(DType::F32) => CpuStorage::F32(backward_cpu::<f32>(g, inputs)?),
            Some(DType::F64) => CpuStorage::F64(backward_cpu::<f64>(g, inputs)?),
            _ => candle_core::bail!("ms_deform_attn backward: inputs must all be f32 or all f64"),
        };
        Ok((storage, Shape::from(total)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (go_storage, go_layout) = self.grad_out.storage_and_layout();
        let go = match &*go_storage {
            Storage::Cuda(s) => s,
            _ => candle_core::bail!("ms_deform_attn backward: output gradient is not on the GPU"),
        };
        crate::cuda::backward(&self.geom, s1, l1, s2, l2, s3, l3, go, go_layout)
    }
}
