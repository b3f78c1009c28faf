//! Widening a torchvision `FastRCNNPredictor`: `cls_score` gets one row per new class and the
//! class-specific `bbox_pred` one block of 4 rows per new class (class-major, as torchvision's
//! `box_regression.reshape(N, -1, 4)` reads it). Old rows are copied exactly; the new rows come
//! from an [`Init`] strategy. Every tensor stays on the device and dtype it came with.

use crate::error::{Error, Result};
use crate::init::{self, Init};
use crate::layout::append;
pub use crate::predictor::{Predictor, BOX_LAYOUT, CLS_LAYOUT};

/// Returns the predictor widened by `num_new` classes (labels C, C+1, ...). The input is not
/// modified; the result holds new tensors on the input's device, without autograd history.
pub fn widen(old: &Predictor, num_new: i64, init: &Init) -> Result<Predictor> {
    old.check()?;
    if num_new < 1 {
        return Err(Error::Argument(format!(
            "num_new must be at least 1; got {num_new}"
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let rows = init::new_rows(old, num_new, init)?;
    let out = Predictor {
        cls_weight: append(&old.cls_weight, CLS_LAYOUT, &rows.cls_weight)?,
        cls_bias: append(&old.cls_bias, CLS_LAYOUT, &rows.cls_bias)?,
        bbox_weight: append(&old.bbox_weight, BOX_LAYOUT, &rows.bbox_weight)?,
        bbox_bias: append(&old.bbox_bias, BOX_LAYOUT, &rows.bbox_bias)?,
    };
    // the surgery must not be able to misalign silently
    out.check()?;
    assert_eq!(out.num_classes(), old.num_classes() + num_new);
    assert_eq!(out.cls_weight.device(), old.cls_weight.device());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictor::tests::predictor;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn widening_keeps_old_rows_exactly() {
        let old = predictor(5, 8);
        let new = widen(&old, 2, &Init::Preserve).unwrap();
        assert_eq!(new.cls_weight.size(), [7, 8]);
        assert_eq!(new.cls_bias.size(), [7]);
        assert_eq!(new.bbox_weight.size(), [28, 8]);
        assert_eq!(new.bbox_bias.size(), [28]);
        assert!(new.cls_weight.narrow(0, 0, 5).equal(&old.cls_weight));
        assert!(new.cls_bias.narrow(0, 0, 5).equal(&old.cls_bias));
        assert!(new.bbox_weight.narrow(0, 0, 20).equal(&old.bbox_weight));
        assert!(new.bbox_bias.narrow(0, 0, 20).equal(&old.bbox_bias));
    }

    #[test]
    fn widening_does_not_touch_its_input() {
        let old = predictor(4, 3);
        let copy = old.cls_weight.copy();
        widen(&old, 1, &Init::Background).unwrap();
        assert!(old.cls_weight.equal(&copy));
        assert_eq!(old.cls_weight.size(), [4, 3]);
    }

    #[test]
    fn widening_keeps_dtype() {
        let old = predictor(3, 4);
        let old = Predictor {
            cls_weight: old.cls_weight.to_kind(Kind::Double),
            cls_bias: old.cls_bias.to_kind(Kind::Double),
            bbox_weight: old.bbox_weight.to_kind(Kind::Double),
            bbox_bias: old.bbox_bias.to_kind(Kind::Double),
        };
        let new = widen(&old, 2, &Init::Mean { seed: 1 }).unwrap();
        assert_eq!(new.cls_weight.kind(), Kind::Double);
        assert_eq!(new.bbox_bias.kind(), Kind::Double);
    }

    #[test]
    fn rejects_bad_shapes_and_counts() {
        let good = predictor(3, 4);
        let cases = [
            // bbox_pred is class-agnostic (4 rows) instead of 4 per class
            (
                Predictor {
                    bbox_weight: Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
                    ..predictor(3, 4)
                },
                "bbox_pred.weight [12, 4]",
            ),
            // cls_score.bias has the wrong length
            (
                Predictor {
                    cls_bias: Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                    ..predictor(3, 4)
                },
                "cls_score.bias [3]",
            ),
            // only background
            (predictor(1, 4), "C >= 2"),
            // 1-D weight
            (
                Predictor {
                    cls_weight: Tensor::zeros([3], (Kind::Float, Device::Cpu)),
                    ..predictor(3, 4)
                },
                "2-D",
            ),
            // integer tensors
            (
                Predictor {
                    cls_weight: good.cls_weight.to_kind(Kind::Int64),
                    cls_bias: good.cls_bias.to_kind(Kind::Int64),
                    bbox_weight: good.bbox_weight.to_kind(Kind::Int64),
                    bbox_bias: good.bbox_bias.to_kind(Kind::Int64),
                },
                "floating point",
            ),
            // mixed dtypes
            (
                Predictor {
                    cls_bias: good.cls_bias.to_kind(Kind::Double),
                    ..predictor(3, 4)
                },
                "one dtype and device",
            ),
        ];
        for (p, needle) in cases {
            let err = widen(&p, 1, &Init::Preserve).unwrap_err();
            assert!(
                matches!(err, Error::Shape(_) | Error::Argument(_)),
                "{err:?}"
            );
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
        let err = widen(&predictor(3, 4), 0, &Init::Preserve).unwrap_err();
        assert!(
            err.to_string().contains("num_new must be at least 1"),
            "{err}"
        );
    }
}
