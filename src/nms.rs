//! Non-maximum suppression with `torchvision.ops.nms` / `batched_nms` semantics.
//!
//! Boxes are visited in descending score order; **equal scores keep their input order** (a stable
//! sort, as torchvision's), so of two identical boxes with equal scores the lower index is kept.
//! A box is suppressed by a kept box when their IoU is strictly greater than the threshold, the
//! IoU computed in the boxes' dtype with torchvision's operations (a zero-area pair has IoU NaN
//! and suppresses nothing). `batched_nms` runs this independently per class index (exactly,
//! without torchvision's coordinate-offset trick) and returns the kept indices by descending score.
//!
//! CPU tensors run the host kernel below; other devices run [`nms_tensor`]: the suppression matrix
//! built by tensor operations on the device and brought to the host once, packed into 64-bit
//! words, for the greedy scan (torchvision's CUDA formulation).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::real::{self, Real};

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// host kernel for CPU tensors, tensor operations elsewhere
    Auto,
    /// tensor operations on any device (the CUDA path; tests run it on the CPU)
    Tensor,
}

impl Kernel {
    pub fn parse(name: &str) -> Result<Kernel> {
        match name {
            "auto" => Ok(Kernel::Auto),
            "tensor" => Ok(Kernel::Tensor),
            other => Err(Error::Argument(format!(
                "kernel must be 'auto' or 'tensor'; got {other:?}"
            ))),
        }
    }
}

/// Indices (Int64Tensor) of the boxes kept, by descending score.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64, kernel: Kernel) -> Result<Tensor> {
    check(boxes, scores, None)?;
    run(boxes, scores, None, iou_threshold, kernel)
}

/// As [`nms`], independently for each value of `idxs` (Int64Tensor[N], e.g. class labels).
///
/// Kept boxes of equal score come in torchvision's order too: past 1000 boxes on the CPU (5000 on
/// other devices) torchvision sorts the per-class results with torch's default, unstable sort, and
/// so does this function, with the same libtorch kernel on the same values.
pub fn batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    check(boxes, scores, Some(idxs))?;
    let keep = run(boxes, scores, Some(idxs), iou_threshold, kernel)?;
    let per_class_limit = if boxes.device() == Device::Cpu {
        1000
    } else {
        5000
    };
    if boxes.size()[0] <= per_class_limit {
        return Ok(keep);
    }
    let _no_grad = tch::no_grad_guard();
    let (ascending, _) = keep.f_sort(0, false)?;
    let (_, order) = scores.f_index_select(0, &ascending)?.f_sort(0, true)?;
    Ok(ascending.f_index_select(0, &order)?)
}

fn run(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    thr: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let _no_grad = tch::no_grad_guard();
    if boxes.size()[0] == 0 {
        return Ok(Tensor::f_empty([0], (Kind::Int64, boxes.device()))?);
    }
    if kernel == Kernel::Tensor || boxes.device() != Device::Cpu {
        return nms_tensor(boxes, scores, idxs, thr);
    }
    let boxes = boxes.f_contiguous()?;
    let scores = scores.f_contiguous()?;
    let classes = match idxs {
        Some(i) => Some(Vec::<i64>::try_from(i.f_to_kind(Kind::Int64)?)?),
        None => None,
    };
    let keep = match boxes.kind() {
        Kind::Float => nms_host::<f32>(
            real::slice(&boxes)?,
            real::slice(&scores)?,
            classes.as_deref(),
            thr,
        ),
        Kind::Double => nms_host::<f64>(
            real::slice(&boxes)?,
            real::slice(&scores)?,
            classes.as_deref(),
            thr,
        ),
        // half precision on the CPU: the tensor path computes in that dtype like torchvision
        _ => return nms_tensor(&boxes, &scores, idxs, thr),
    };
    Ok(Tensor::from_slice(&keep))
}

fn check(boxes: &Tensor, scores: &Tensor, idxs: Option<&Tensor>) -> Result<()> {
    let n = boxes.size().first().copied().unwrap_or(0);
    if boxes.size() != [n, 4] {
        return Err(Error::Shape(format!(
            "boxes must be Tensor[N, 4] (x1, y1, x2, y2); got {:?}",
            boxes.size()
        )));
    }
    if scores.size() != [n] {
        return Err(Error::Shape(format!(
            "scores must be Tensor[{n}], one per box; got {:?}",
            scores.size()
        )));
    }
    if !matches!(
        boxes.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) || boxes.kind() != scores.kind()
    {
        return Err(Error::Argument(format!(
            "boxes and scores must share one floating dtype; got {:?} and {:?}",
            boxes.kind(),
            scores.kind()
        )));
    }
    if boxes.device() != scores.device() {
        return Err(Error::Argument(format!(
            "boxes and scores must be on one device; got {:?} and {:?}",
            boxes.device(),
            scores.device()
        )));
    }
    if let Some(idxs) = idxs {
        if idxs.size() != [n]
            || !matches!(
                idxs.kind(),
                Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
            )
        {
            return Err(Error::Shape(format!(
                "idxs must be an integer Tensor[{n}], one per box; got {:?} {:?}",
                idxs.kind(),
                idxs.size()
            )));
        }
        if idxs.device() != boxes.device() {
            return Err(Error::Argument(format!(
                "idxs must be on the boxes' device {:?}; got {:?}",
                boxes.device(),
                idxs.device()
            )));
        }
    }
    if n > 0 {
        if let Some(row) = real::first_nan_row(boxes)? {
            return Err(Error::Argument(format!(
                "boxes contain NaN (first at row {row}); remove or fix those boxes"
            )));
        }
        if bool::try_from(scores.f_isnan()?.f_any()?)? {
            return Err(Error::Argument(
                "scores contain NaN; remove those boxes first".into(),
            ));
        }
    }
    Ok(())
}

/// The host kernel: boxes `[x1, y1, x2, y2]*` and scores as slices, optional class per box.
pub fn nms_host<T: Real>(
    boxes: &[T],
    scores: &[T],
    classes: Option<&[i64]>,
    iou_threshold: f64,
) -> Vec<i64> {
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    // stable: equal scores keep input order
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let threshold = T::below(iou_threshold);
    let mut keep = vec![false; n];
    match classes {
        None => greedy(boxes, &order, threshold, &mut keep),
        Some(classes) => {
            // one greedy pass per class, each over its boxes in global score order
            let mut groups: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
            for &i in &order {
                groups.entry(classes[i]).or_default().push(i);
            }
            for members in groups.values() {
                greedy(boxes, members, threshold, &mut keep);
            }
        }
    }
    order
        .into_iter()
        .filter(|&i| keep[i])
        .map(|i| i as i64)
        .collect()
}

/// Greedy suppression over `order` (indices into `boxes`, best first); marks `keep`.
fn greedy<T: Real>(boxes: &[T], order: &[usize], threshold: T, keep: &mut [bool]) {
    // the sorted boxes as contiguous columns, so the inner loop streams through memory
    let column = |k: usize| order.iter().map(|&i| boxes[4 * i + k]).collect::<Vec<T>>();
    let (x1, y1, x2, y2) = (column(0), column(1), column(2), column(3));
    let area: Vec<T> = (0..order.len())
        .map(|j| (x2[j] - x1[j]) * (y2[j] - y1[j]))
        .collect();
    let cols = Columns {
        x1: &x1,
        y1: &y1,
        x2: &x2,
        y2: &y2,
        area: &area,
    };
    let mut suppressed = vec![0u8; order.len()];
    for i in 0..order.len() {
        if suppressed[i] != 0 {
            continue;
        }
        keep[order[i]] = true;
        suppress_after(&cols, i, threshold, &mut suppressed);
    }
}

struct Columns<'a, T> {
    x1: &'a [T],
    y1: &'a [T],
    x2: &'a [T],
    y2: &'a [T],
    area: &'a [T],
}

/// Marks every box after `i` whose IoU with box `i` exceeds `threshold`.
fn suppress_after<T: Real>(c: &Columns<T>, i: usize, threshold: T, suppressed: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { suppress_after_avx2(c, i, threshold, suppressed) };
        }
    }
    suppress_after_portable(c, i, threshold, suppressed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn suppress_after_avx2<T: Real>(
    c: &Columns<T>,
    i: usize,
    threshold: T,
    suppressed: &mut [u8],
) {
    suppress_after_portable(c, i, threshold, suppressed)
}

/// Branch-free over j so the compiler vectorizes it; the operations and their order are
/// torchvision's, so each IoU is bit-identical to the one it computes.
#[inline(always)]
fn suppress_after_portable<T: Real>(c: &Columns<T>, i: usize, threshold: T, suppressed: &mut [u8]) {
    let (ix1, iy1, ix2, iy2, iarea) = (c.x1[i], c.y1[i], c.x2[i], c.y2[i], c.area[i]);
    let n = suppressed.len();
    let (x1, y1, x2, y2, area) = (
        &c.x1[i + 1..n],
        &c.y1[i + 1..n],
        &c.x2[i + 1..n],
        &c.y2[i + 1..n],
        &c.area[i + 1..n],
    );
    for (j, s) in suppressed[i + 1..n].iter_mut().enumerate() {
        let xx1 = real::max(ix1, x1[j]);
        let yy1 = real::max(iy1, y1[j]);
        let xx2 = real::min(ix2, x2[j]);
        let yy2 = real::min(iy2, y2[j]);
        let w = real::max(T::ZERO, xx2 - xx1);
        let h = real::max(T::ZERO, yy2 - yy1);
        let inter = w * h;
        let ovr = inter / (iarea + area[j] - inter);
        *s |= (ovr > threshold) as u8;
    }
}

/// NMS as tensor operations on the boxes' device, with one transfer to the host (torchvision's
/// CUDA formulation): the pairwise suppression matrix `S` (IoU > threshold, same class, later in
/// score order) is built on the device and packed into 64-bit words per row; those words come to
/// the host once, where the greedy scan in score order keeps a box unless a kept box suppresses it.
pub fn nms_tensor(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    iou_threshold: f64,
) -> Result<Tensor> {
    let device = boxes.device();
    let n = boxes.size()[0];
    let order = scores.f_argsort_stable(true, 0, true)?;
    if n == 0 {
        return Ok(order);
    }
    let b = boxes.f_index_select(0, &order)?;
    let col = |k: i64| b.f_select(1, k);
    let (x1, y1, x2, y2) = (col(0)?, col(1)?, col(2)?, col(3)?);
    let area = (&x2 - &x1) * (&y2 - &y1);
    let row = |t: &Tensor| t.f_unsqueeze(1);
    let column = |t: &Tensor| t.f_unsqueeze(0);
    let xx1 = row(&x1)?.f_maximum(&column(&x1)?)?;
    let yy1 = row(&y1)?.f_maximum(&column(&y1)?)?;
    let xx2 = row(&x2)?.f_minimum(&column(&x2)?)?;
    let yy2 = row(&y2)?.f_minimum(&column(&y2)?)?;
    let w = (xx2 - xx1).f_clamp_min(0.0)?;
    let h = (yy2 - yy1).f_clamp_min(0.0)?;
    let inter = w * h;
    let iou = &inter / (row(&area)? + column(&area)? - &inter);
    let threshold = match boxes.kind() {
        Kind::Double => iou_threshold,
        _ => f32::below(iou_threshold) as f64,
    };
    let mut suppresses = iou.f_gt(threshold)?.f_triu(1)?;
    if let Some(idxs) = idxs {
        let c = idxs.f_index_select(0, &order)?;
        suppresses = suppresses.f_logical_and(&row(&c)?.f_eq_tensor(&column(&c)?)?)?;
    }
    let words = (n + 63) / 64;
    let mask = pack_rows(&suppresses, words)?.f_to_device(Device::Cpu)?;
    let mask = Vec::<i64>::try_from(mask.f_flatten(0, -1)?)?;
    let keep = greedy_on_mask(&mask, n as usize, words as usize);
    let keep = Tensor::f_from_slice(&keep)?.f_to_device(device)?;
    Ok(order.f_index_select(0, &keep)?)
}

/// A bool matrix [N, N] as [N, words] of 64-bit words, bit `j % 64` of word `j / 64` for column j
/// (the sum of distinct powers of two: no carries, so bit 63 comes out as the sign bit).
fn pack_rows(bits: &Tensor, words: i64) -> Result<Tensor> {
    let n = bits.size()[0];
    let device = bits.device();
    let padded = bits
        .f_to_kind(Kind::Int64)?
        .f_constant_pad_nd([0, words * 64 - n])?
        .f_view([n, words, 64])?;
    let powers = Tensor::f_ones([64], (Kind::Int64, device))?
        .f_bitwise_left_shift(&Tensor::f_arange(64, (Kind::Int64, device))?)?;
    Ok((padded * powers).f_sum_dim_intlist([2i64].as_slice(), false, Kind::Int64)?)
}

/// The greedy scan over a packed suppression matrix (rows in score order): the positions kept.
fn greedy_on_mask(mask: &[i64], n: usize, words: usize) -> Vec<i64> {
    let mut removed = vec![0u64; words];
    let mut keep = vec![];
    for i in 0..n {
        if removed[i / 64] >> (i % 64) & 1 == 0 {
            keep.push(i as i64);
            for (r, m) in removed.iter_mut().zip(&mask[i * words..(i + 1) * words]) {
                *r |= *m as u64;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], rows: i64) -> Tensor {
        Tensor::from_slice(v).view([rows, 4])
    }

    #[test]
    fn overlapping_boxes_keep_the_best() {
        let boxes = t(&[0., 0., 10., 10., 1., 1., 11., 11., 20., 20., 30., 30.], 3);
        let scores = Tensor::from_slice(&[0.8f32, 0.9, 0.5]);
        for kernel in [Kernel::Auto, Kernel::Tensor] {
            let keep = Vec::<i64>::try_from(nms(&boxes, &scores, 0.5, kernel).unwrap()).unwrap();
            assert_eq!(keep, [1, 2], "{kernel:?}");
        }
    }

    #[test]
    fn equal_scores_keep_the_lower_index() {
        let boxes = t(&[0., 0., 10., 10., 0., 0., 10., 10., 0., 0., 10., 10.], 3);
        let scores = Tensor::from_slice(&[0.5f32, 0.7, 0.7]);
        for kernel in [Kernel::Auto, Kernel::Tensor] {
            assert_eq!(
                Vec::<i64>::try_from(nms(&boxes, &scores, 0.5, kernel).unwrap()).unwrap(),
                [1]
            );
        }
    }

    #[test]
    fn threshold_is_strict_and_zero_area_suppresses_nothing() {
        // IoU exactly 0.5: kept at threshold 0.5, suppressed at 0.49
        let pair = t(&[0., 0., 2., 2., 0., 0., 2., 1.], 2);
        let scores = Tensor::from_slice(&[0.9f32, 0.8]);
        assert_eq!(nms(&pair, &scores, 0.5, Kernel::Auto).unwrap().size(), [2]);
        assert_eq!(nms(&pair, &scores, 0.49, Kernel::Auto).unwrap().size(), [1]);
        let points = t(&[5., 5., 5., 5., 5., 5., 5., 5.], 2);
        assert_eq!(
            nms(&points, &scores, 0.0, Kernel::Auto).unwrap().size(),
            [2]
        );
        assert_eq!(
            nms(&points, &scores, 0.0, Kernel::Tensor).unwrap().size(),
            [2]
        );
    }

    #[test]
    fn batched_keeps_classes_apart_and_sorts_by_score() {
        let boxes = t(&[0., 0., 10., 10., 0., 0., 10., 10., 0., 0., 10., 10.], 3);
        let scores = Tensor::from_slice(&[0.6f32, 0.9, 0.7]);
        let idxs = Tensor::from_slice(&[0i64, 1, 0]);
        for kernel in [Kernel::Auto, Kernel::Tensor] {
            let keep =
                Vec::<i64>::try_from(batched_nms(&boxes, &scores, &idxs, 0.5, kernel).unwrap())
                    .unwrap();
            assert_eq!(keep, [1, 2], "{kernel:?}");
        }
    }

    #[test]
    fn double_threshold_rule_matches_f64_comparison() {
        for thr in [0.7, 0.5, 0.3, 1.0 / 3.0, 0.0, 0.9999999] {
            let t32 = f32::below(thr);
            for x in [t32, t32.next_up(), t32.next_down()] {
                assert_eq!(x as f64 > thr, x > t32, "thr {thr} x {x}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let good = t(&[0., 0., 1., 1.], 1);
        let s = Tensor::from_slice(&[0.5f32]);
        let nan = t(&[0., f32::NAN, 1., 1.], 1);
        let cases = [
            (
                nms(
                    &Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
                    &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                    0.5,
                    Kernel::Auto,
                ),
                "Tensor[N, 4]",
            ),
            (
                nms(
                    &good,
                    &Tensor::from_slice(&[0.5f32, 0.1]),
                    0.5,
                    Kernel::Auto,
                ),
                "Tensor[1]",
            ),
            (
                nms(&good, &Tensor::from_slice(&[0.5f64]), 0.5, Kernel::Auto),
                "one floating dtype",
            ),
            (nms(&nan, &s, 0.5, Kernel::Auto), "NaN (first at row 0)"),
            (
                nms(&good, &Tensor::from_slice(&[f32::NAN]), 0.5, Kernel::Auto),
                "scores contain NaN",
            ),
            (
                batched_nms(&good, &s, &Tensor::from_slice(&[0.5f32]), 0.5, Kernel::Auto),
                "integer",
            ),
        ];
        for (result, needle) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
        let empty = nms(
            &Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            0.5,
            Kernel::Auto,
        )
        .unwrap();
        assert_eq!((empty.size(), empty.kind()), (vec![0], Kind::Int64));
    }
}
