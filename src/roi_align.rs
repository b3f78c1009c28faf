//! RoIAlign with `torchvision.ops.roi_align` semantics, forward and backward.
//!
//! `rois` are Tensor[K, 5] rows `(batch_index, x1, y1, x2, y2)` in input coordinates; each is
//! scaled by `spatial_scale` (minus 0.5 with `aligned`), split into `pooled_h x pooled_w` bins, and
//! each bin averages bilinear samples on a `sampling_ratio`² grid (adaptive `ceil(size / pooled)`
//! when `sampling_ratio <= 0`). Samples more than one pixel outside the map count as zero.
//!
//! CPU tensors (float32/float64) run the host kernels, threaded over RoIs (forward) and channels
//! (backward) with torch's thread count; they add in torchvision's order, so results match it to
//! the last bit or nearly. Other devices run separable tensor operations: each RoI's sampling is
//! a [pooled, H] matrix times the map times a [W, pooled] matrix, all on the device; a call reads a
//! few numbers from it (the batch indices' range, the largest sampling grid, the RoIs per image),
//! none per RoI.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::nms::Kernel;
use crate::real::{self, Real};

/// The parameters of one RoIAlign call.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub spatial_scale: f64,
    pub pooled_h: i64,
    pub pooled_w: i64,
    pub sampling_ratio: i64,
    pub aligned: bool,
}

/// Output Tensor[K, C, pooled_h, pooled_w].
pub fn forward(input: &Tensor, rois: &Tensor, p: Params, kernel: Kernel) -> Result<Tensor> {
    let size = input.size();
    if size.len() != 4 {
        return Err(Error::Shape(format!(
            "input must be Tensor[N, C, H, W]; got {size:?}"
        )));
    }
    check(rois, input.kind(), input.device(), size[0], &p)?;
    let _no_grad = tch::no_grad_guard();
    let (k, c) = (rois.size()[0], size[1]);
    if k == 0 || input.numel() == 0 {
        return Ok(Tensor::f_zeros(
            [k, c, p.pooled_h, p.pooled_w],
            (input.kind(), input.device()),
        )?);
    }
    let host = kernel == Kernel::Auto && input.device() == Device::Cpu;
    match input.kind() {
        Kind::Float if host => forward_host::<f32>(input, rois, p),
        Kind::Double if host => forward_host::<f64>(input, rois, p),
        _ => forward_tensor(input, rois, p),
    }
}

/// Gradient Tensor[N, C, H, W] of the input, from the output's gradient Tensor[K, C, ph, pw].
pub fn backward(
    grad: &Tensor,
    rois: &Tensor,
    p: Params,
    input_size: [i64; 4],
    kernel: Kernel,
) -> Result<Tensor> {
    let [n, c, h, w] = input_size;
    let k = rois.size().first().copied().unwrap_or(0);
    if grad.size() != [k, c, p.pooled_h, p.pooled_w] {
        return Err(Error::Shape(format!(
            "grad must be Tensor[{k}, {c}, {}, {}]; got {:?}",
            p.pooled_h,
            p.pooled_w,
            grad.size()
        )));
    }
    check(rois, grad.kind(), grad.device(), n, &p)?;
    let _no_grad = tch::no_grad_guard();
    if k == 0 || n * c * h * w == 0 {
        return Ok(Tensor::f_zeros([n, c, h, w], (grad.kind(), grad.device()))?);
    }
    let host = kernel == Kernel::Auto && grad.device() == Device::Cpu;
    match grad.kind() {
        Kind::Float if host => backward_host::<f32>(grad, rois, p, input_size),
        Kind::Double if host => backward_host::<f64>(grad, rois, p, input_size),
        _ => backward_tensor(grad, rois, p, input_size),
    }
}

fn check(rois: &Tensor, kind: Kind, device: Device, batch: i64, p: &Params) -> Result<()> {
    let k = rois.size().first().copied().unwrap_or(0);
    if rois.size() != [k, 5] {
        return Err(Error::Shape(format!(
            "rois must be Tensor[K, 5] rows (batch_index, x1, y1, x2, y2); got {:?}",
            rois.size()
        )));
    }
    if !matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) || rois.kind() != kind
    {
        return Err(Error::Argument(format!(
            "input and rois must share one floating dtype; got {kind:?} and {:?}",
            rois.kind()
        )));
    }
    if rois.device() != device {
        return Err(Error::Argument(format!(
            "rois must be on the input's device {device:?}; got {:?}",
            rois.device()
        )));
    }
    if p.pooled_h < 1 || p.pooled_w < 1 {
        return Err(Error::Argument(format!(
            "output_size must be positive; got ({}, {})",
            p.pooled_h, p.pooled_w
        )));
    }
    if !(p.spatial_scale.is_finite() && p.spatial_scale > 0.0) {
        return Err(Error::Argument(format!(
            "spatial_scale must be a positive number; got {}",
            p.spatial_scale
        )));
    }
    if k > 0 {
        if let Some(row) = real::first_nan_row(rois)? {
            return Err(Error::Argument(format!(
                "rois contain NaN (first at row {row}); remove or fix those boxes"
            )));
        }
        let b = rois.f_select(1, 0)?;
        let (lo, hi) = (f64::try_from(b.f_min()?)?, f64::try_from(b.f_max()?)?);
        if lo < 0.0 || hi >= batch as f64 {
            return Err(Error::Argument(format!(
                "rois' batch indices must lie in 0..{batch} (the input's batch size); got {lo}..={hi}"
            )));
        }
    }
    Ok(())
}

/// The bilinear samples of one RoI: for each bin, `grid_h * grid_w` entries.
struct Samples<T> {
    grid_h: usize,
    grid_w: usize,
    batch: usize,
    /// per sample: 4 offsets into an H*W plane (`usize::MAX` marks a sample outside the map)
    pos: Vec<[usize; 4]>,
    weight: Vec<[T; 4]>,
}

/// Samples of RoI `roi` (`[b, x1, y1, x2, y2]`), as torchvision's `pre_calc_for_bilinear_interpolate`.
fn samples<T: Real>(roi: &[T], p: &Params, height: usize, width: usize) -> Samples<T> {
    let scale = T::from_f64(p.spatial_scale);
    let offset = if p.aligned { T::from_f64(0.5) } else { T::ZERO };
    let start_w = roi[1] * scale - offset;
    let start_h = roi[2] * scale - offset;
    let end_w = roi[3] * scale - offset;
    let end_h = roi[4] * scale - offset;
    let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
    if !p.aligned {
        // malformed RoIs become 1x1
        roi_w = real::max(roi_w, T::ONE);
        roi_h = real::max(roi_h, T::ONE);
    }
    let (ph, pw) = (T::from_i64(p.pooled_h), T::from_i64(p.pooled_w));
    let bin_h = roi_h / ph;
    let bin_w = roi_w / pw;
    let grid = |size: T, pooled: T| -> usize {
        if p.sampling_ratio > 0 {
            p.sampling_ratio as usize
        } else {
            (size / pooled).to_f64().ceil().max(0.0) as usize
        }
    };
    let (grid_h, grid_w) = (grid(roi_h, ph), grid(roi_w, pw));
    let (gh, gw) = (T::from_i64(grid_h as i64), T::from_i64(grid_w as i64));
    let half = T::from_f64(0.5);
    let total = (p.pooled_h * p.pooled_w) as usize * grid_h * grid_w;
    let (mut pos, mut weight) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let (hf, wf) = (T::from_i64(height as i64), T::from_i64(width as i64));
    let minus_one = T::ZERO - T::ONE;
    for py in 0..p.pooled_h {
        for px in 0..p.pooled_w {
            for iy in 0..grid_h {
                let yy = start_h
                    + T::from_i64(py) * bin_h
                    + (T::from_i64(iy as i64) + half) * bin_h / gh;
                for ix in 0..grid_w {
                    let xx = start_w
                        + T::from_i64(px) * bin_w
                        + (T::from_i64(ix as i64) + half) * bin_w / gw;
                    let (mut y, mut x) = (yy, xx);
                    if !(y >= minus_one && y <= hf && x >= minus_one && x <= wf) {
                        pos.push([usize::MAX; 4]);
                        weight.push([T::ZERO; 4]);
                        continue;
                    }
                    if y <= T::ZERO {
                        y = T::ZERO;
                    }
                    if x <= T::ZERO {
                        x = T::ZERO;
                    }
                    let (y_low, y_high, ly) = neighbours(y, height);
                    let (x_low, x_high, lx) = neighbours(x, width);
                    let (hy, hx) = (T::ONE - ly, T::ONE - lx);
                    pos.push([
                        y_low * width + x_low,
                        y_low * width + x_high,
                        y_high * width + x_low,
                        y_high * width + x_high,
                    ]);
                    weight.push([hy * hx, hy * lx, ly * hx, ly * lx]);
                }
            }
        }
    }
    Samples {
        grid_h,
        grid_w,
        batch: roi[0].to_f64() as usize,
        pos,
        weight,
    }
}

/// The two pixels around coordinate `v` (>= 0) along an axis of `size` pixels and the weight of
/// the upper one, clamped at the last pixel as torchvision does.
fn neighbours<T: Real>(v: T, size: usize) -> (usize, usize, T) {
    let low = v.to_f64() as usize;
    if low >= size - 1 {
        (size - 1, size - 1, T::ZERO)
    } else {
        (low, low + 1, v - T::from_i64(low as i64))
    }
}

/// Splits `0..n` into at most `parts` contiguous ranges.
fn ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let step = n.div_ceil(parts);
    (0..parts)
        .map(|i| (i * step).min(n)..((i + 1) * step).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Whether the forward reads the map channels-last (`[N, H, W, C]`, each sample's channels side by
/// side, so the channel loop vectorises): when it already is, or when the RoIs' samples outnumber
/// the map's pixels, which pays for the copy.
fn channels_last(input: &Tensor, rois: usize, p: &Params) -> bool {
    let size = input.size();
    let stride = input.stride();
    if size[1] > 1 && stride[1] == 1 && stride[3] == size[1] {
        return true;
    }
    let grid = if p.sampling_ratio > 0 {
        (p.sampling_ratio * p.sampling_ratio) as usize
    } else {
        4
    };
    let samples = rois * (p.pooled_h * p.pooled_w) as usize * grid;
    samples > (size[0] * size[2] * size[3]) as usize
}

fn forward_host<T: Real>(input: &Tensor, rois: &Tensor, p: Params) -> Result<Tensor> {
    let rois = rois.f_contiguous()?;
    let [_, c, h, w] =
        <[i64; 4]>::try_from(input.size()).map_err(|_| Error::Shape("input must be 4-D".into()))?;
    let k = rois.size()[0] as usize;
    let (c, h, w) = (c as usize, h as usize, w as usize);
    let last = channels_last(input, k, &p);
    let input = if last {
        input.f_permute([0, 2, 3, 1])?.f_contiguous()?
    } else {
        input.f_contiguous()?
    };
    let bins = (p.pooled_h * p.pooled_w) as usize;
    let mut output = Tensor::f_zeros(
        [k as i64, c as i64, p.pooled_h, p.pooled_w],
        (T::KIND, Device::Cpu),
    )?;
    let data: &[T] = real::slice(&input)?;
    let boxes: &[T] = real::slice(&rois)?;
    let out: &mut [T] = real::slice_mut(&mut output)?;
    // threads take contiguous runs of RoIs; each RoI writes only its own output block
    let per_roi = c * bins;
    let work = ranges(
        k,
        if k * per_roi > 1 << 14 {
            real::threads()
        } else {
            1
        },
    );
    std::thread::scope(|scope| {
        let mut rest = out;
        for range in work {
            let (mine, tail) = rest.split_at_mut(range.len() * per_roi);
            rest = tail;
            scope.spawn(move || {
                let mut acc = vec![T::ZERO; if last { c } else { 0 }];
                for (r, block) in range.zip(mine.chunks_mut(per_roi)) {
                    let s = samples(&boxes[5 * r..5 * r + 5], &p, h, w);
                    if last {
                        pool_channels_last(
                            &s,
                            &data[s.batch * h * w * c..][..h * w * c],
                            block,
                            &mut acc,
                        );
                    } else {
                        pool_planes(&s, &data[s.batch * c * h * w..][..c * h * w], block, bins);
                    }
                }
            });
        }
    });
    Ok(output)
}

/// One RoI's output block `[C, bins]` from its image's map `[C, H*W]`, plane by plane.
fn pool_planes<T: Real>(s: &Samples<T>, map: &[T], block: &mut [T], bins: usize) {
    let per_bin = s.grid_h * s.grid_w;
    let count = T::from_i64(per_bin.max(1) as i64);
    let plane_len = map.len() / (block.len() / bins);
    for (plane, plane_out) in map.chunks(plane_len).zip(block.chunks_mut(bins)) {
        for (bin, o) in plane_out.iter_mut().enumerate() {
            let mut acc = T::ZERO;
            for q in bin * per_bin..(bin + 1) * per_bin {
                let (pp, ww) = (s.pos[q], s.weight[q]);
                if pp[0] == usize::MAX {
                    // outside the map: torchvision adds 0 * input[0]
                    acc = acc + T::ZERO;
                    continue;
                }
                acc = acc
                    + (ww[0] * plane[pp[0]]
                        + ww[1] * plane[pp[1]]
                        + ww[2] * plane[pp[2]]
                        + ww[3] * plane[pp[3]]);
            }
            *o = acc / count;
        }
    }
}

/// The same block from the map `[H*W, C]`: each sample adds its four pixels' channel rows into
/// `acc` (length C) at once, every channel by the very operations of `pool_planes`.
fn pool_channels_last<T: Real>(s: &Samples<T>, map: &[T], block: &mut [T], acc: &mut [T]) {
    let c = acc.len();
    let per_bin = s.grid_h * s.grid_w;
    let count = T::from_i64(per_bin.max(1) as i64);
    let bins = block.len() / c.max(1);
    for bin in 0..bins {
        acc.fill(T::ZERO);
        for q in bin * per_bin..(bin + 1) * per_bin {
            let (pp, ww) = (s.pos[q], s.weight[q]);
            if pp[0] == usize::MAX {
                for a in acc.iter_mut() {
                    *a = *a + T::ZERO;
                }
                continue;
            }
            let row = |k: usize| &map[pp[k] * c..][..c];
            let rows = row(0).iter().zip(row(1)).zip(row(2).iter().zip(row(3)));
            for (a, ((v0, v1), (v2, v3))) in acc.iter_mut().zip(rows) {
                *a = *a + (ww[0] * *v0 + ww[1] * *v1 + ww[2] * *v2 + ww[3] * *v3);
            }
        }
        for (ch, a) in acc.iter().enumerate() {
            block[ch * bins + bin] = *a / count;
        }
    }
}

/// A pointer that threads may share because each writes a disjoint set of channels.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: only used in `backward_host`, where thread t writes channels of its own range alone.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

fn backward_host<T: Real>(
    grad: &Tensor,
    rois: &Tensor,
    p: Params,
    input_size: [i64; 4],
) -> Result<Tensor> {
    let grad = grad.f_contiguous()?;
    let rois = rois.f_contiguous()?;
    let [n, c, h, w] = input_size;
    let k = rois.size()[0] as usize;
    let (c, h, w) = (c as usize, h as usize, w as usize);
    let bins = (p.pooled_h * p.pooled_w) as usize;
    let mut grad_input =
        Tensor::f_zeros([n, c as i64, h as i64, w as i64], (T::KIND, Device::Cpu))?;
    let g: &[T] = real::slice(&grad)?;
    let boxes: &[T] = real::slice(&rois)?;
    let all: Vec<Samples<T>> = (0..k)
        .map(|r| samples(&boxes[5 * r..5 * r + 5], &p, h, w))
        .collect();
    let target = Shared(real::slice_mut(&mut grad_input)?.as_mut_ptr());
    let work = ranges(
        c,
        if k * c * bins > 1 << 14 {
            real::threads()
        } else {
            1
        },
    );
    std::thread::scope(|scope| {
        for range in work {
            let all = &all;
            scope.spawn(move || {
                let target: Shared<T> = target;
                // per channel, RoIs, bins and samples in torchvision's order: the same sums
                for ch in range {
                    for (r, s) in all.iter().enumerate() {
                        let per_bin = s.grid_h * s.grid_w;
                        let count = T::from_i64(per_bin as i64);
                        // SAFETY: plane (s.batch, ch) lies inside grad_input, and channel ch
                        // belongs to this thread's range alone.
                        let plane = unsafe {
                            std::slice::from_raw_parts_mut(
                                target.0.add((s.batch * c + ch) * h * w),
                                h * w,
                            )
                        };
                        for bin in 0..bins {
                            let go = g[(r * c + ch) * bins + bin];
                            for q in bin * per_bin..(bin + 1) * per_bin {
                                let (pp, ww) = (s.pos[q], s.weight[q]);
                                if pp[0] == usize::MAX {
                                    continue;
                                }
                                for corner in 0..4 {
                                    plane[pp[corner]] = plane[pp[corner]] + go * ww[corner] / count;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(grad_input)
}

/// Each RoI's start and extent, (start_h, start_w, roi_h, roi_w), in feature-map coordinates.
fn extents(rois: &Tensor, p: &Params) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let offset = if p.aligned { 0.5 } else { 0.0 };
    let coord = |i: i64| -> Result<Tensor> { Ok(rois.f_select(1, i)? * p.spatial_scale - offset) };
    let (start_w, start_h) = (coord(1)?, coord(2)?);
    let (mut roi_w, mut roi_h) = (coord(3)? - &start_w, coord(4)? - &start_h);
    if !p.aligned {
        roi_w = roi_w.f_clamp_min(1.0)?;
        roi_h = roi_h.f_clamp_min(1.0)?;
    }
    Ok((start_h, start_w, roi_h, roi_w))
}

/// Each RoI's sampling grid along one axis: `sampling_ratio`, or ceil(extent / pooled).
fn grid(extent: &Tensor, pooled: i64, p: &Params) -> Result<Tensor> {
    Ok(if p.sampling_ratio > 0 {
        Tensor::f_full_like(extent, p.sampling_ratio)?
    } else {
        (extent / pooled as f64).f_ceil()?.f_clamp_min(0.0)?
    })
}

/// The largest sampling grid of all RoIs, (rows, columns): one read from the device per call, so
/// that the sample tensors of every chunk have a fixed size.
fn largest_grid(rois: &Tensor, p: &Params) -> Result<(i64, i64)> {
    if p.sampling_ratio > 0 || rois.size()[0] == 0 {
        return Ok((p.sampling_ratio.max(1), p.sampling_ratio.max(1)));
    }
    let (_, _, roi_h, roi_w) = extents(rois, p)?;
    let most = Tensor::f_stack(
        &[
            grid(&roi_h, p.pooled_h, p)?.f_max()?,
            grid(&roi_w, p.pooled_w, p)?.f_max()?,
        ],
        0,
    )?;
    let most = Vec::<f64>::try_from(most.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
    Ok(((most[0] as i64).max(1), (most[1] as i64).max(1)))
}

/// Per RoI, the [pooled_h, H] and [pooled_w, W] sampling matrices and the sample count; `most`:
/// ``largest_grid`` of all the RoIs of the call.
fn sampling_matrices(
    rois: &Tensor,
    p: &Params,
    height: i64,
    width: i64,
    most: (i64, i64),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (kind, device) = (rois.kind(), rois.device());
    let (start_h, start_w, roi_h, roi_w) = extents(rois, p)?;
    let axis = |start: &Tensor,
                extent: &Tensor,
                pooled: i64,
                size: i64,
                most: i64|
     -> Result<(Tensor, Tensor)> {
        let bin = extent / pooled as f64;
        let grid = grid(extent, pooled, p)?;
        let k = start.size()[0];
        let opts = (kind, device);
        let bins = Tensor::f_arange(pooled, opts)?.f_view([1, pooled, 1])?;
        let steps = Tensor::f_arange(most.max(1), opts)?.f_view([1, 1, most.max(1)])?;
        let (start, bin, grid3) = (
            start.f_view([k, 1, 1])?,
            bin.f_view([k, 1, 1])?,
            grid.f_view([k, 1, 1])?,
        );
        let at = (&start + &bins * &bin) + (&steps + 0.5) * &bin / &grid3;
        let valid = at
            .f_ge(-1.0)?
            .f_logical_and(&at.f_le(size as f64)?)?
            .f_logical_and(&steps.f_lt_tensor(&grid3)?)?;
        // samples past a RoI's own grid (or with NaN steps of an empty grid) read pixel 0 at weight 0
        let at = at
            .f_where_self(&valid, &Tensor::f_zeros_like(&at)?)?
            .f_clamp_min(0.0)?;
        let low = at.f_floor()?;
        let edge = low.f_ge((size - 1) as f64)?;
        let last = Tensor::f_full_like(&low, (size - 1) as f64)?;
        let low = low.f_where_self(&edge.f_logical_not()?, &last)?;
        let high = (&low + 1.0).f_where_self(&edge.f_logical_not()?, &last)?;
        let at = at.f_where_self(&edge.f_logical_not()?, &low)?;
        let l = &at - &low;
        let valid = valid.f_to_kind(kind)?;
        let (w_low, w_high) = ((1.0 - &l) * &valid, l * &valid);
        let matrix = Tensor::f_zeros([k, pooled, size], opts)?
            .f_scatter_add(2, &low.f_to_kind(Kind::Int64)?, &w_low)?
            .f_scatter_add(2, &high.f_to_kind(Kind::Int64)?, &w_high)?;
        Ok((matrix, grid))
    };
    let (ay, grid_h) = axis(&start_h, &roi_h, p.pooled_h, height, most.0)?;
    let (ax, grid_w) = axis(&start_w, &roi_w, p.pooled_w, width, most.1)?;
    let count = (grid_h * grid_w).f_clamp_min(1.0)?;
    Ok((ay, ax, count))
}

/// RoI indices per image and chunks of them small enough for the intermediate products. The RoIs
/// are sorted by image on the device and the count per image read once (not a read per image).
fn chunks_per_image(
    rois: &Tensor,
    batch: i64,
    c: i64,
    ph: i64,
    w: i64,
) -> Result<Vec<(i64, Tensor)>> {
    let index = rois.f_select(1, 0)?.f_to_kind(Kind::Int64)?;
    let chunk = ((1i64 << 25) / (ph * c * w).max(1)).max(1);
    let by_image = index.f_argsort_stable(true, 0, false)?;
    let counts = index
        .f_bincount::<Tensor>(None, batch)?
        .f_to_device(Device::Cpu)?;
    let counts = Vec::<i64>::try_from(counts)?;
    let (mut out, mut first) = (vec![], 0);
    for (b, &count) in counts.iter().enumerate() {
        let mut start = 0;
        while start < count {
            let len = chunk.min(count - start);
            out.push((b as i64, by_image.f_narrow(0, first + start, len)?));
            start += len;
        }
        first += count;
    }
    Ok(out)
}

fn forward_tensor(input: &Tensor, rois: &Tensor, p: Params) -> Result<Tensor> {
    let [n, c, h, w] =
        <[i64; 4]>::try_from(input.size()).map_err(|_| Error::Shape("input must be 4-D".into()))?;
    let (ph, pw) = (p.pooled_h, p.pooled_w);
    let mut output = Tensor::f_zeros([rois.size()[0], c, ph, pw], (input.kind(), input.device()))?;
    let most = largest_grid(rois, &p)?;
    for (b, idx) in chunks_per_image(rois, n, c, ph, w)? {
        let k = idx.size()[0];
        let (ay, ax, count) = sampling_matrices(&rois.f_index_select(0, &idx)?, &p, h, w, most)?;
        // [k*ph, H] @ [H, C*W] -> [k, ph*C, W] @ [k, W, pw] -> [k, ph, C, pw]
        let plane = input
            .f_get(b)?
            .f_permute([1, 0, 2])?
            .f_reshape([h, c * w])?;
        let rows = ay
            .f_reshape([k * ph, h])?
            .f_matmul(&plane)?
            .f_reshape([k, ph * c, w])?;
        let pooled = rows
            .f_bmm(&ax.f_transpose(1, 2)?)?
            .f_reshape([k, ph, c, pw])?
            .f_permute([0, 2, 1, 3])?;
        let pooled = pooled / count.f_view([k, 1, 1, 1])?;
        let _ = output.f_index_copy_(0, &idx, &pooled)?;
    }
    Ok(output)
}

fn backward_tensor(
    grad: &Tensor,
    rois: &Tensor,
    p: Params,
    input_size: [i64; 4],
) -> Result<Tensor> {
    let [n, c, h, w] = input_size;
    let (ph, pw) = (p.pooled_h, p.pooled_w);
    let grad_input = Tensor::f_zeros([n, c, h, w], (grad.kind(), grad.device()))?;
    let most = largest_grid(rois, &p)?;
    for (b, idx) in chunks_per_image(rois, n, c, ph, w)? {
        let k = idx.size()[0];
        let (ay, ax, count) = sampling_matrices(&rois.f_index_select(0, &idx)?, &p, h, w, most)?;
        let g = grad.f_index_select(0, &idx)? / count.f_view([k, 1, 1, 1])?;
        // the forward's products transposed: [k, ph*C, pw] @ [k, pw, W] -> [k*ph, C*W]; Ay^T @ it -> [H, C*W]
        let g = g
            .f_permute([0, 2, 1, 3])?
            .f_reshape([k, ph * c, pw])?
            .f_bmm(&ax)?
            .f_reshape([k * ph, c * w])?;
        let plane = ay
            .f_reshape([k * ph, h])?
            .f_transpose(0, 1)?
            .f_matmul(&g)?
            .f_reshape([h, c, w])?
            .f_permute([1, 0, 2])?;
        let mut target = grad_input.f_get(b)?;
        let _ = target.f_add_(&plane)?;
    }
    Ok(grad_input)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sampling_ratio: i64, aligned: bool) -> Params {
        Params {
            spatial_scale: 0.5,
            pooled_h: 3,
            pooled_w: 2,
            sampling_ratio,
            aligned,
        }
    }

    #[test]
    fn constant_map_pools_to_the_constant() {
        let input = Tensor::ones([1, 2, 8, 8], (Kind::Float, Device::Cpu)) * 3.0;
        let rois = Tensor::from_slice(&[0.0f32, 2.0, 2.0, 10.0, 12.0]).view([1, 5]);
        for kernel in [Kernel::Auto, Kernel::Tensor] {
            let out = forward(&input, &rois, params(2, false), kernel).unwrap();
            assert_eq!(out.size(), [1, 2, 3, 2]);
            assert!(
                out.allclose(&(Tensor::ones_like(&out) * 3.0), 1e-6, 1e-6, false),
                "{kernel:?}"
            );
        }
    }

    #[test]
    fn host_and_tensor_paths_agree_forward_and_backward() {
        tch::manual_seed(3);
        let input = Tensor::randn([2, 3, 9, 11], (Kind::Double, Device::Cpu));
        let rois = Tensor::from_slice(&[
            0.0f64, 1.0, 1.0, 15.0, 12.0, //
            1.0, -4.0, 3.0, 6.0, 30.0, // partly outside
            0.0, 5.0, 5.0, 5.0, 5.0, // zero area
            1.0, 0.5, 0.5, 21.5, 17.0,
        ])
        .view([4, 5]);
        for (sr, aligned) in [(0, false), (0, true), (2, false), (3, true)] {
            let p = params(sr, aligned);
            let a = forward(&input, &rois, p, Kernel::Auto).unwrap();
            let b = forward(&input, &rois, p, Kernel::Tensor).unwrap();
            assert!(
                a.allclose(&b, 1e-9, 1e-9, false),
                "forward sr={sr} aligned={aligned}"
            );
            let g = Tensor::randn_like(&a);
            let ga = backward(&g, &rois, p, [2, 3, 9, 11], Kernel::Auto).unwrap();
            let gb = backward(&g, &rois, p, [2, 3, 9, 11], Kernel::Tensor).unwrap();
            assert!(
                ga.allclose(&gb, 1e-9, 1e-9, false),
                "backward sr={sr} aligned={aligned}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let input = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let roi = |v: &[f32]| Tensor::from_slice(v).view([-1, 5]);
        let p = params(2, false);
        let cases = [
            (
                forward(
                    &input,
                    &Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)),
                    p,
                    Kernel::Auto,
                ),
                "Tensor[K, 5]",
            ),
            (
                forward(&input, &roi(&[0., f32::NAN, 0., 1., 1.]), p, Kernel::Auto),
                "NaN (first at row 0)",
            ),
            (
                forward(&input, &roi(&[1., 0., 0., 1., 1.]), p, Kernel::Auto),
                "batch indices must lie in 0..1",
            ),
            (
                forward(
                    &input,
                    &roi(&[0., 0., 0., 1., 1.]).to_kind(Kind::Double),
                    p,
                    Kernel::Auto,
                ),
                "one floating dtype",
            ),
            (
                forward(
                    &input,
                    &roi(&[0., 0., 0., 1., 1.]),
                    Params { pooled_h: 0, ..p },
                    Kernel::Auto,
                ),
                "output_size",
            ),
            (
                forward(
                    &input,
                    &roi(&[0., 0., 0., 1., 1.]),
                    Params {
                        spatial_scale: 0.0,
                        ..p
                    },
                    Kernel::Auto,
                ),
                "spatial_scale",
            ),
            (
                forward(
                    &input.view([1, 4, 4]),
                    &roi(&[0., 0., 0., 1., 1.]),
                    p,
                    Kernel::Auto,
                ),
                "Tensor[N, C, H, W]",
            ),
        ];
        for (result, needle) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
        let empty = forward(
            &input,
            &Tensor::zeros([0, 5], (Kind::Float, Device::Cpu)),
            p,
            Kernel::Auto,
        )
        .unwrap();
        assert_eq!(empty.size(), [0, 1, 3, 2]);
    }
}
