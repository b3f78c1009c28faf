//! detgraft's Rust core, imported in Python as `detgraft._core`. It works on the very tensors of
//! the user's torch model (CPU or CUDA) through tch and pyo3-tch; Python swaps the results in.

pub mod error;
pub mod init;
pub mod surgery;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::init::Init;
use crate::surgery::Predictor;

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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(widen_predictor, m)?)?;
    m.add("PRESERVE_GAP", init::PRESERVE_GAP)?;
    Ok(())
}
