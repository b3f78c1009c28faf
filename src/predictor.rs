//! The four tensors of a torchvision `FastRCNNPredictor` (`cls_score`, `bbox_pred`), checked:
//! what `surgery` widens and `init` starts new rows from.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::layout::Layout;

/// `cls_score`: one row per class; `bbox_pred`: a block of 4 per class.
pub const CLS_LAYOUT: Layout = Layout {
    anchors: 1,
    per_class: 1,
};
pub const BOX_LAYOUT: Layout = Layout {
    anchors: 1,
    per_class: 4,
};

/// The four tensors of a `FastRCNNPredictor`, as in its state dict.
#[derive(Debug)]
pub struct Predictor {
    /// `cls_score.weight`: Tensor[C, D], C counting background at row 0.
    pub cls_weight: Tensor,
    /// `cls_score.bias`: Tensor[C].
    pub cls_bias: Tensor,
    /// `bbox_pred.weight`: Tensor[4 * C, D], rows 4c..4c+4 belong to class c.
    pub bbox_weight: Tensor,
    /// `bbox_pred.bias`: Tensor[4 * C].
    pub bbox_bias: Tensor,
}

impl Predictor {
    /// Number of outputs, background included (torchvision's `num_classes`).
    pub fn num_classes(&self) -> i64 {
        self.cls_weight.size()[0]
    }

    /// Width of the box-head features the predictor reads.
    pub fn in_features(&self) -> i64 {
        self.cls_weight.size()[1]
    }

    /// Checks the layout of a class-specific `FastRCNNPredictor`; the message names every shape.
    pub fn check(&self) -> Result<()> {
        let shapes = format!(
            "cls_score.weight {:?}, cls_score.bias {:?}, bbox_pred.weight {:?}, bbox_pred.bias {:?}",
            self.cls_weight.size(),
            self.cls_bias.size(),
            self.bbox_weight.size(),
            self.bbox_bias.size()
        );
        let cls = self.cls_weight.size();
        if cls.len() != 2 {
            return Err(Error::Shape(format!(
                "cls_score.weight must be 2-D [C, D]; got {shapes}"
            )));
        }
        let (c, d) = (cls[0], cls[1]);
        if c < 2 {
            return Err(Error::Shape(format!(
                "cls_score needs background plus at least one class (C >= 2); got {shapes}"
            )));
        }
        let expected = [vec![c], vec![4 * c, d], vec![4 * c]];
        let actual = [
            self.cls_bias.size(),
            self.bbox_weight.size(),
            self.bbox_bias.size(),
        ];
        if expected != actual {
            return Err(Error::Shape(format!(
                "expected cls_score.bias [{c}], bbox_pred.weight [{}, {d}], bbox_pred.bias [{}] \
                 (class-specific boxes, 4 per class); got {shapes}",
                4 * c,
                4 * c
            )));
        }
        let tensors = [
            &self.cls_weight,
            &self.cls_bias,
            &self.bbox_weight,
            &self.bbox_bias,
        ];
        let (kind, device) = (self.cls_weight.kind(), self.cls_weight.device());
        if !matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(Error::Argument(format!(
                "predictor tensors must be floating point; got {kind:?}"
            )));
        }
        if tensors
            .iter()
            .any(|t| t.kind() != kind || t.device() != device)
        {
            let got: Vec<_> = tensors.iter().map(|t| (t.kind(), t.device())).collect();
            return Err(Error::Argument(format!(
                "predictor tensors must share one dtype and device; got {got:?}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::Device;

    /// A random predictor with `c` outputs over `d` features (CPU, float32).
    pub(crate) fn predictor(c: i64, d: i64) -> Predictor {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        Predictor {
            cls_weight: Tensor::randn([c, d], opts),
            cls_bias: Tensor::randn([c], opts),
            bbox_weight: Tensor::randn([4 * c, d], opts),
            bbox_bias: Tensor::randn([4 * c], opts),
        }
    }
}
