//! detgraft's Rust core, imported in Python as `detgraft._core`. It works on the very tensors of
//! the user's torch model (CPU or CUDA) through tch and pyo3-tch; Python swaps the results in.

pub mod error;
pub mod init;
pub mod layout;
pub mod nms;
pub mod predictor;
pub mod real;
pub mod roi_align;
pub mod surgery;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::init::Init;
use crate::layout::{Fill, Layout};
use crate::nms::Kernel;
use crate::predictor::Predictor;
use crate::roi_align::Params;

/// Widens a FastRCNNPredictor's tensors by `num_new` classes.
///
/// Takes `cls_score.weight` [C, D], `cls_score.bias` [C], `bbox_pred.weight` [4C, D] and
/// `bbox_pred.bias` [4C] (any device, one floating dtype) and returns the four widened tensors
/// ([C+n, D], [C+n], [4(C+n), D], [4(C+n)]) on the same device, old rows copied exactly.
/// `init` is one of preserve, mean (uses `seed`), background, imprint (uses `features`
/// [N, D] and `feature_labels` [N], the new-class index of each feature row).
#[pyfunction]
#[pyo3(signature = (cls_weight, cls_bias, bbox_weight, bbox_bias, num_new, init="preserve", seed=0, features=None, feature_labels=None))]
#[allow(clippy::too_many_arguments)]
fn widen_predictor(
    py: Python<'_>,
    cls_weight: PyTensor,
    cls_bias: PyTensor,
    bbox_weight: PyTensor,
    bbox_bias: PyTensor,
    num_new: i64,
    init: &str,
    seed: u64,
    features: Option<PyTensor>,
    feature_labels: Option<PyTensor>,
) -> PyResult<(PyTensor, PyTensor, PyTensor, PyTensor)> {
    let init = Init::parse(
        init,
        seed,
        features.map(|t| t.0),
        feature_labels.map(|t| t.0),
    )?;
    let old = Predictor {
        cls_weight: cls_weight.0,
        cls_bias: cls_bias.0,
        bbox_weight: bbox_weight.0,
        bbox_bias: bbox_bias.0,
    };
    let new = py.allow_threads(move || surgery::widen(&old, num_new, &init))?;
    Ok((
        PyTensor(new.cls_weight),
        PyTensor(new.cls_bias),
        PyTensor(new.bbox_weight),
        PyTensor(new.bbox_bias),
    ))
}

/// Widens one class-dependent tensor, and its bias, by `num_new` classes.
///
/// Dimension 0 of `weight` (any shape: a Linear's [R, D], a conv's [R, D, kh, kw]) and of `bias`
/// [R] is laid out as `anchors x classes x per_class` (see `layout`); the new classes' rows go
/// after the old ones within each anchor. `fill`: "copy" (class `fill_class`'s rows, bias +
/// `bias_shift`), "mean" (the mean of classes `fill_class`.., bias + `bias_shift`) or "constant"
/// (zero weights, bias `bias_shift`). Returns new tensors on the input's device and dtype.
#[pyfunction]
#[pyo3(signature = (weight, bias, num_new, anchors=1, per_class=1, fill="copy", fill_class=0, bias_shift=0.0))]
#[allow(clippy::too_many_arguments)]
fn widen_classes(
    py: Python<'_>,
    weight: PyTensor,
    bias: Option<PyTensor>,
    num_new: i64,
    anchors: i64,
    per_class: i64,
    fill: &str,
    fill_class: i64,
    bias_shift: f64,
) -> PyResult<(PyTensor, Option<PyTensor>)> {
    let fill = match fill {
        "copy" => Fill::Copy {
            class: fill_class,
            bias_shift,
        },
        "mean" => Fill::Mean {
            from: fill_class,
            bias_shift,
        },
        "constant" => Fill::Constant { bias: bias_shift },
        other => {
            return Err(error::Error::Argument(format!(
                "fill {other:?} is unknown: choose one of copy, mean, constant"
            ))
            .into())
        }
    };
    let layout = Layout { anchors, per_class };
    let (w, b) = py.allow_threads(move || {
        layout::widen(
            &weight.0,
            bias.as_ref().map(|b| &b.0),
            layout,
            num_new,
            fill,
        )
    })?;
    Ok((PyTensor(w), b.map(PyTensor)))
}

/// Indices of the boxes NMS keeps, by descending score (torchvision semantics; equal scores
/// keep input order). `kernel="tensor"` forces the device path on CPU tensors.
#[pyfunction(name = "nms")]
#[pyo3(signature = (boxes, scores, iou_threshold, kernel="auto"))]
fn py_nms(
    py: Python<'_>,
    boxes: PyTensor,
    scores: PyTensor,
    iou_threshold: f64,
    kernel: &str,
) -> PyResult<PyTensor> {
    let kernel = Kernel::parse(kernel)?;
    Ok(PyTensor(py.allow_threads(move || {
        nms::nms(&boxes.0, &scores.0, iou_threshold, kernel)
    })?))
}

/// NMS independently per value of `idxs`; indices by descending score.
#[pyfunction(name = "batched_nms")]
#[pyo3(signature = (boxes, scores, idxs, iou_threshold, kernel="auto"))]
fn py_batched_nms(
    py: Python<'_>,
    boxes: PyTensor,
    scores: PyTensor,
    idxs: PyTensor,
    iou_threshold: f64,
    kernel: &str,
) -> PyResult<PyTensor> {
    let kernel = Kernel::parse(kernel)?;
    Ok(PyTensor(py.allow_threads(move || {
        nms::batched_nms(&boxes.0, &scores.0, &idxs.0, iou_threshold, kernel)
    })?))
}

/// RoIAlign forward: input [N, C, H, W], rois [K, 5] -> [K, C, pooled_h, pooled_w].
#[pyfunction]
#[pyo3(signature = (input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn roi_align_forward(
    py: Python<'_>,
    input: PyTensor,
    rois: PyTensor,
    spatial_scale: f64,
    pooled_h: i64,
    pooled_w: i64,
    sampling_ratio: i64,
    aligned: bool,
    kernel: &str,
) -> PyResult<PyTensor> {
    let kernel = Kernel::parse(kernel)?;
    let p = Params {
        spatial_scale,
        pooled_h,
        pooled_w,
        sampling_ratio,
        aligned,
    };
    Ok(PyTensor(py.allow_threads(move || {
        roi_align::forward(&input.0, &rois.0, p, kernel)
    })?))
}

/// RoIAlign backward: the input's gradient [N, C, H, W] from the output's gradient.
#[pyfunction]
#[pyo3(signature = (grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, input_size, kernel="auto"))]
#[allow(clippy::too_many_arguments)]
fn roi_align_backward(
    py: Python<'_>,
    grad: PyTensor,
    rois: PyTensor,
    spatial_scale: f64,
    pooled_h: i64,
    pooled_w: i64,
    sampling_ratio: i64,
    aligned: bool,
    input_size: [i64; 4],
    kernel: &str,
) -> PyResult<PyTensor> {
    let kernel = Kernel::parse(kernel)?;
    let p = Params {
        spatial_scale,
        pooled_h,
        pooled_w,
        sampling_ratio,
        aligned,
    };
    Ok(PyTensor(py.allow_threads(move || {
        roi_align::backward(&grad.0, &rois.0, p, input_size, kernel)
    })?))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(widen_predictor, m)?)?;
    m.add_function(wrap_pyfunction!(widen_classes, m)?)?;
    m.add_function(wrap_pyfunction!(py_nms, m)?)?;
    m.add_function(wrap_pyfunction!(py_batched_nms, m)?)?;
    m.add_function(wrap_pyfunction!(roi_align_forward, m)?)?;
    m.add_function(wrap_pyfunction!(roi_align_backward, m)?)?;
    m.add("PRESERVE_GAP", init::PRESERVE_GAP)?;
    Ok(())
}
