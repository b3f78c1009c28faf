//! Class-dependent tensors described by their layout, whatever the detector family.
//!
//! Every class-dependent tensor a torchvision detector holds (a weight, or its bias) indexes its
//! first dimension as `anchors x classes x per_class`, class outside `per_class`, anchor outermost:
//!
//! | tensor                                          | anchors | per_class |
//! |-------------------------------------------------|---------|-----------|
//! | Faster/Mask R-CNN `cls_score`, `mask_fcn_logits`| 1       | 1         |
//! | Faster/Mask R-CNN `bbox_pred` (class-specific)  | 1       | 4         |
//! | RetinaNet `cls_logits` (A anchors per location) | A       | 1         |
//! | FCOS `cls_logits`                               | 1       | 1         |
//! | SSD / SSDlite classification conv of a level    | A       | 1         |
//!
//! [`widen`] grows the class axis of such a tensor: every old row keeps its anchor, class and
//! position within the class, copied exactly, and the new classes' rows follow the old ones within
//! each anchor, filled by a [`Fill`]. The result is a new tensor on the input's device and dtype.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// How dimension 0 of a class-dependent tensor is laid out (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub anchors: i64,
    pub per_class: i64,
}

/// How the new classes' rows start. Weight rows and bias entries are filled alike, except that
/// `bias_shift` moves the bias only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// A copy of class `class`'s rows (per anchor), bias + `bias_shift`: with the background
    /// class and a negative shift, a softmax head's new classes stay below background.
    Copy { class: i64, bias_shift: f64 },
    /// The mean of classes `from..C` (per anchor and position), bias + `bias_shift`: a typical
    /// old class (a mask or a box regression for any object).
    Mean { from: i64, bias_shift: f64 },
    /// Zero weights and the bias `bias`: a sigmoid head's new classes score sigmoid(bias) for
    /// every input.
    Constant { bias: f64 },
}

impl Layout {
    /// The number of classes a tensor with this layout holds; an error names the shapes.
    pub fn num_classes(&self, tensor: &Tensor, name: &str) -> Result<i64> {
        if self.anchors < 1 || self.per_class < 1 {
            return Err(Error::Argument(format!(
                "a layout needs anchors >= 1 and per_class >= 1; got {self:?}"
            )));
        }
        let size = tensor.size();
        let rows = *size
            .first()
            .ok_or_else(|| Error::Shape(format!("{name} must have a class axis; got a scalar")))?;
        let group = self.anchors * self.per_class;
        if rows % group != 0 || rows / group < 1 {
            return Err(Error::Shape(format!(
                "{name} {size:?}: dimension 0 ({rows}) is not anchors x classes x per_class \
                 with anchors={} and per_class={}",
                self.anchors, self.per_class
            )));
        }
        Ok(rows / group)
    }

    /// `tensor` as [anchors, classes, per_class, rest...].
    fn split(&self, tensor: &Tensor, classes: i64) -> Result<Tensor> {
        let mut shape = vec![self.anchors, classes, self.per_class];
        shape.extend_from_slice(&tensor.size()[1..]);
        Ok(tensor.f_reshape(shape.as_slice())?)
    }
}

/// `weight` (and `bias`, laid out alike) grown by `num_new` classes; see the module doc.
pub fn widen(
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: Layout,
    num_new: i64,
    fill: Fill,
) -> Result<(Tensor, Option<Tensor>)> {
    if num_new < 1 {
        return Err(Error::Argument(format!(
            "num_new must be at least 1; got {num_new}"
        )));
    }
    let classes = layout.num_classes(weight, "weight")?;
    if let Some(bias) = bias {
        let expected = weight.size()[0];
        if bias.size() != [expected] {
            return Err(Error::Shape(format!(
                "bias must be [{expected}], one entry per row of weight {:?}; got {:?}",
                weight.size(),
                bias.size()
            )));
        }
        if bias.kind() != weight.kind() || bias.device() != weight.device() {
            return Err(Error::Argument(format!(
                "weight and bias must share one dtype and device; got {:?}/{:?} and {:?}/{:?}",
                weight.kind(),
                weight.device(),
                bias.kind(),
                bias.device()
            )));
        }
    }
    if !matches!(
        weight.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(Error::Argument(format!(
            "class-dependent tensors must be floating point; got {:?}",
            weight.kind()
        )));
    }
    match fill {
        Fill::Copy { class, .. } if !(0..classes).contains(&class) => {
            return Err(Error::Argument(format!(
                "fill copies class {class}, but the tensor holds classes 0..{classes}"
            )))
        }
        Fill::Mean { from, .. } if !(0..classes).contains(&from) => {
            return Err(Error::Argument(format!(
                "fill averages classes {from}..{classes}: needs 0 <= from < {classes}"
            )))
        }
        _ => {}
    }
    let _no_grad = tch::no_grad_guard();
    let grown_weight = grow(weight, layout, classes, num_new, fill, false)?;
    let grown_bias = bias
        .map(|b| grow(b, layout, classes, num_new, fill, true))
        .transpose()?;
    // the surgery must not be able to misalign silently: every old row is where the layout says
    let old = layout.split(weight, classes)?;
    let new = layout.split(&grown_weight, classes + num_new)?;
    assert!(new.narrow(1, 0, classes).equal(&old));
    Ok((grown_weight, grown_bias))
}

fn grow(
    tensor: &Tensor,
    layout: Layout,
    classes: i64,
    num_new: i64,
    fill: Fill,
    is_bias: bool,
) -> Result<Tensor> {
    let split = layout.split(tensor, classes)?;
    let shift = |rows: Tensor, by: f64| -> Result<Tensor> {
        Ok(if is_bias {
            rows.f_add_scalar(by)?
        } else {
            rows
        })
    };
    let one = match fill {
        Fill::Copy { class, bias_shift } => shift(split.f_narrow(1, class, 1)?, bias_shift)?,
        Fill::Mean { from, bias_shift } => shift(
            split
                .f_narrow(1, from, classes - from)?
                .f_mean_dim(1, true, None)?,
            bias_shift,
        )?,
        Fill::Constant { bias } => {
            let zeros = split.f_narrow(1, 0, 1)?.f_zeros_like()?;
            shift(zeros, bias)?
        }
    };
    let mut repeat = vec![1; split.dim()];
    repeat[1] = num_new;
    let new = one.f_repeat(repeat.as_slice())?;
    append(tensor, layout, &new.f_flatten(0, 2)?)
}

/// `tensor` with the rows `new` of further classes appended within each anchor: `new` holds
/// `anchors x num_new x per_class` rows in the same layout (for one anchor, a plain
/// concatenation).
pub fn append(tensor: &Tensor, layout: Layout, new: &Tensor) -> Result<Tensor> {
    let classes = layout.num_classes(tensor, "tensor")?;
    let num_new = layout.num_classes(new, "new rows")?;
    if tensor.size()[1..] != new.size()[1..] {
        return Err(Error::Shape(format!(
            "new rows {:?} must match the tensor {:?} beyond dimension 0",
            new.size(),
            tensor.size()
        )));
    }
    let both = Tensor::f_cat(
        &[layout.split(tensor, classes)?, layout.split(new, num_new)?],
        1,
    )?;
    let mut shape = tensor.size();
    shape[0] = layout.anchors * (classes + num_new) * layout.per_class;
    Ok(both.f_reshape(shape.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// RetinaNet's cls_logits read as torchvision reads them: view(N, A, K, H, W).
    #[test]
    fn anchor_major_conv_keeps_every_old_channel_by_anchor_and_class() {
        let (a, c, n, d) = (9, 5, 2, 3);
        let weight = Tensor::randn([a * c, d, 3, 3], CPU);
        let bias = Tensor::randn([a * c], CPU);
        let layout = Layout {
            anchors: a,
            per_class: 1,
        };
        let fill = Fill::Constant { bias: -16.0 };
        let (w, b) = widen(&weight, Some(&bias), layout, n, fill).unwrap();
        let b = b.unwrap();
        assert_eq!(w.size(), [a * (c + n), d, 3, 3]);
        assert_eq!(b.size(), [a * (c + n)]);
        for anchor in 0..a {
            for class in 0..c + n {
                let channel = anchor * (c + n) + class;
                if class < c {
                    let old = anchor * c + class;
                    assert!(
                        w.get(channel).equal(&weight.get(old)),
                        "anchor {anchor} class {class}"
                    );
                    assert!(b.get(channel).equal(&bias.get(old)));
                } else {
                    assert_eq!(w.get(channel).abs().max().double_value(&[]), 0.0);
                    assert_eq!(b.get(channel).double_value(&[]), -16.0);
                }
            }
        }
    }

    #[test]
    fn blocks_per_class_stay_together() {
        // bbox_pred: 4 rows per class; the new class's block is the mean of classes 1..C
        let (c, d) = (3, 2);
        let weight = Tensor::arange(4 * c * d, CPU).view([4 * c, d]);
        let layout = Layout {
            anchors: 1,
            per_class: 4,
        };
        let fill = Fill::Mean {
            from: 1,
            bias_shift: 0.0,
        };
        let (w, _) = widen(&weight, None, layout, 1, fill).unwrap();
        assert!(w.narrow(0, 0, 4 * c).equal(&weight));
        let expected = (weight.narrow(0, 4, 4) + weight.narrow(0, 8, 4)) / 2.0;
        assert!(w.narrow(0, 4 * c, 4).equal(&expected));
    }

    #[test]
    fn copy_shifts_the_bias_only() {
        let (a, c) = (2, 3);
        let weight = Tensor::randn([a * c, 4], CPU);
        let bias = Tensor::randn([a * c], CPU);
        let layout = Layout {
            anchors: a,
            per_class: 1,
        };
        let fill = Fill::Copy {
            class: 0,
            bias_shift: -16.0,
        };
        let (w, b) = widen(&weight, Some(&bias), layout, 1, fill).unwrap();
        let b = b.unwrap();
        for anchor in 0..a {
            let new = anchor * (c + 1) + c;
            assert!(w.get(new).equal(&weight.get(anchor * c)));
            let gap = bias.get(anchor * c).double_value(&[]) - b.get(new).double_value(&[]);
            assert!((gap - 16.0).abs() < 1e-5, "{gap}");
        }
    }

    #[test]
    fn errors_name_the_shapes() {
        let layout = Layout {
            anchors: 9,
            per_class: 1,
        };
        let fill = Fill::Constant { bias: -16.0 };
        let err = widen(&Tensor::zeros([10, 4], CPU), None, layout, 1, fill).unwrap_err();
        assert!(
            err.to_string().contains("[10, 4]") && err.to_string().contains("anchors=9"),
            "{err}"
        );
        let weight = Tensor::zeros([18, 4], CPU);
        let err = widen(&weight, Some(&Tensor::zeros([9], CPU)), layout, 1, fill).unwrap_err();
        assert!(err.to_string().contains("bias must be [18]"), "{err}");
        let fill = Fill::Copy {
            class: 5,
            bias_shift: 0.0,
        };
        let err = widen(&weight, None, layout, 1, fill).unwrap_err();
        assert!(err.to_string().contains("classes 0..2"), "{err}");
        let err = widen(&weight, None, layout, 0, fill).unwrap_err();
        assert!(err.to_string().contains("num_new"), "{err}");
        let ints = Tensor::zeros([18, 4], (Kind::Int64, Device::Cpu));
        let fill = Fill::Constant { bias: -16.0 };
        let err = widen(&ints, None, layout, 1, fill).unwrap_err();
        assert!(err.to_string().contains("floating point"), "{err}");
    }
}
