//! How the new rows of a widened predictor start.
//!
//! | strategy     | `cls_score` row of a new class                               | what it is for |
//! |--------------|--------------------------------------------------------------|----------------|
//! | `preserve`   | background row, bias lowered by [`PRESERVE_GAP`]             | the widened model detects exactly what the base did |
//! | `mean`       | mean of the old class rows plus noise with their spread      | the forum recipe: a new class that looks like a typical old one |
//! | `background` | background row, bias lowered by ln(C) (C = old outputs)      | MiB/MMA: the new class starts as a share of background |
//! | `imprint`    | mean direction of the new class's box features, old-row norm | few-shot start (Qi et al., imprinted weights) |
//!
//! Every strategy starts the new `bbox_pred` block as the mean of the old foreground blocks:
//! the regression of an average old class.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::predictor::Predictor;

/// Logit gap below background used by `preserve`: a new class's probability is at most
/// e^-16 ≈ 1.13e-7 times the background's, for every input, so the old classes' scores change by
/// less than 1.13e-7 relative per new class and no new class reaches a score threshold. The gap is small
/// enough that training moves the new rows in a few hundred steps.
pub const PRESERVE_GAP: f64 = 16.0;

/// An initialization strategy for the new rows.
#[derive(Debug)]
pub enum Init {
    Preserve,
    Mean {
        seed: u64,
    },
    Background,
    /// `features`: Tensor[N, D] box-head features of new-class boxes; `labels`: Tensor[N] int64,
    /// the index of each box's class among the new ones (0 for the first new class).
    Imprint {
        features: Tensor,
        labels: Tensor,
    },
}

impl Init {
    /// The strategy called `name`; `mean` uses `seed`, `imprint` needs `features` and `labels`.
    pub fn parse(
        name: &str,
        seed: u64,
        features: Option<Tensor>,
        labels: Option<Tensor>,
    ) -> Result<Init> {
        match (name, features, labels) {
            ("preserve", ..) => Ok(Init::Preserve),
            ("mean", ..) => Ok(Init::Mean { seed }),
            ("background", ..) => Ok(Init::Background),
            ("imprint", Some(features), Some(labels)) => Ok(Init::Imprint { features, labels }),
            ("imprint", ..) => Err(Error::Argument(
                "init 'imprint' needs features (Tensor[N, D]) and feature_labels (Tensor[N]) \
                 of the new classes' boxes"
                    .into(),
            )),
            (other, ..) => Err(Error::UnknownInit(other.into())),
        }
    }
}

/// The rows appended for the new classes, in the predictor's layout.
pub struct NewRows {
    pub cls_weight: Tensor,
    pub cls_bias: Tensor,
    pub bbox_weight: Tensor,
    pub bbox_bias: Tensor,
}

/// Builds the new rows for `num_new` classes on the old tensors' device and dtype.
pub fn new_rows(old: &Predictor, num_new: i64, init: &Init) -> Result<NewRows> {
    let (c, d) = (old.num_classes(), old.in_features());
    let fg_weight = old.cls_weight.f_narrow(0, 1, c - 1)?;
    let fg_bias = old.cls_bias.f_narrow(0, 1, c - 1)?;
    let (cls_weight, cls_bias) = match init {
        Init::Preserve => background_rows(old, num_new, PRESERVE_GAP)?,
        Init::Background => background_rows(old, num_new, (c as f64).ln())?,
        Init::Mean { seed } => {
            let noise = normal_noise(
                *seed,
                num_new,
                d + 1,
                old.cls_weight.kind(),
                old.cls_weight.device(),
            )?;
            let weight = fg_weight.f_mean_dim(0, true, None)?
                + fg_weight.f_std_dim(0, false, true)? * noise.f_narrow(1, 0, d)?;
            let bias = fg_bias.f_mean_dim(0, true, None)?
                + fg_bias.f_std_dim(0, false, true)? * noise.f_select(1, d)?;
            (weight, bias)
        }
        Init::Imprint { features, labels } => {
            imprint_rows(&fg_weight, &fg_bias, features, labels, num_new)?
        }
    };
    // regression of the average old class, repeated for each new class
    let blocks = old.bbox_weight.f_view([c, 4, d])?.f_narrow(0, 1, c - 1)?;
    let bbox_weight = blocks.f_mean_dim(0, false, None)?.f_repeat([num_new, 1])?;
    let bias_blocks = old.bbox_bias.f_view([c, 4])?.f_narrow(0, 1, c - 1)?;
    let bbox_bias = bias_blocks
        .f_mean_dim(0, false, None)?
        .f_repeat([num_new])?;
    Ok(NewRows {
        cls_weight,
        cls_bias,
        bbox_weight,
        bbox_bias,
    })
}

/// Copies of the background row whose bias sits `gap` below the background's: for every input
/// the new logit equals the background logit minus `gap`.
fn background_rows(old: &Predictor, num_new: i64, gap: f64) -> Result<(Tensor, Tensor)> {
    let weight = old.cls_weight.f_narrow(0, 0, 1)?.f_repeat([num_new, 1])?;
    let bias = (old.cls_bias.f_narrow(0, 0, 1)? - gap).f_repeat([num_new])?;
    Ok((weight, bias))
}

/// Imprinted rows: the normalized mean of each new class's normalized features, scaled to the
/// mean norm of the old class rows; the bias is the old classes' mean bias.
fn imprint_rows(
    fg_weight: &Tensor,
    fg_bias: &Tensor,
    features: &Tensor,
    labels: &Tensor,
    num_new: i64,
) -> Result<(Tensor, Tensor)> {
    let d = fg_weight.size()[1];
    let n = features.size().first().copied().unwrap_or(0);
    if features.size() != [n, d] {
        return Err(Error::Shape(format!(
            "imprint features must be [N, {d}] (the box head's output width); got {:?}",
            features.size()
        )));
    }
    if labels.size() != [n] {
        return Err(Error::Shape(format!(
            "imprint feature_labels must be [{n}], one per feature row; got {:?}",
            labels.size()
        )));
    }
    if !matches!(
        labels.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return Err(Error::Argument(format!(
            "imprint feature_labels must be integers; got {:?}",
            labels.kind()
        )));
    }
    // the label check runs on the host: it reads N small integers, never the features
    let host_labels =
        Vec::<i64>::try_from(labels.f_to_kind(Kind::Int64)?.f_to_device(Device::Cpu)?)?;
    if let Some(bad) = host_labels.iter().find(|&&l| l < 0 || l >= num_new) {
        return Err(Error::Argument(format!(
            "imprint feature_labels must index the new classes (0..{num_new}); got {bad}"
        )));
    }
    let missing: Vec<i64> = (0..num_new).filter(|k| !host_labels.contains(k)).collect();
    if !missing.is_empty() {
        return Err(Error::Argument(format!(
            "imprint needs at least one box of every new class; none for new class index {missing:?}"
        )));
    }
    let (kind, device) = (fg_weight.kind(), fg_weight.device());
    let features = features.f_to_device(device)?.f_to_kind(kind)?;
    let index = labels.f_to_device(device)?.f_to_kind(Kind::Int64)?;
    let unit = unit_rows(&features)?;
    let sums = Tensor::f_zeros([num_new, d], (kind, device))?.f_index_add(0, &index, &unit)?;
    let old_norm = fg_weight
        .f_norm_scalaropt_dim(2.0, [1], false)?
        .f_mean(None)?;
    let weight = unit_rows(&sums)? * old_norm;
    let bias = fg_bias.f_mean_dim(0, true, None)?.f_repeat([num_new])?;
    Ok((weight, bias))
}

/// Each row divided by its L2 norm (rows of zeros stay zero).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.f_norm_scalaropt_dim(2.0, [1], true)?.f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm)?)
}

/// Standard normal noise of shape [rows, cols] from a seed, the same on every device: drawn on
/// the host (splitmix64 + Box-Muller) so the user's torch random state is left alone.
fn normal_noise(seed: u64, rows: i64, cols: i64, kind: Kind, device: Device) -> Result<Tensor> {
    let mut state = seed;
    let mut next_unit = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // in (0, 1)
    };
    let values: Vec<f64> = (0..rows * cols)
        .map(|_| {
            let (u, v) = (next_unit(), next_unit());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect();
    Ok(Tensor::from_slice(&values)
        .f_view([rows, cols])?
        .f_to_kind(kind)?
        .f_to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::append;
    use crate::predictor::tests::predictor;
    use crate::predictor::{BOX_LAYOUT, CLS_LAYOUT};

    /// The predictor with the rows of `init` appended, as `surgery::widen` appends them.
    fn widen(old: &Predictor, num_new: i64, init: &Init) -> Result<Predictor> {
        let rows = new_rows(old, num_new, init)?;
        Ok(Predictor {
            cls_weight: append(&old.cls_weight, CLS_LAYOUT, &rows.cls_weight)?,
            cls_bias: append(&old.cls_bias, CLS_LAYOUT, &rows.cls_bias)?,
            bbox_weight: append(&old.bbox_weight, BOX_LAYOUT, &rows.bbox_weight)?,
            bbox_bias: append(&old.bbox_bias, BOX_LAYOUT, &rows.bbox_bias)?,
        })
    }

    /// Class probabilities, computed in float64 (inputs and weights converted before the
    /// product). Float32 products of differently shaped matrices round differently on different
    /// CPUs (AVX-512 and AVX2 GEMM kernels): a few ulp in the logits, 5.7e-6 relative in the
    /// probabilities, far above what `preserve` promises. In float64 that noise is near 1e-15.
    fn softmax_rows(weight: &Tensor, bias: &Tensor, x: &Tensor) -> Tensor {
        let f64 = |t: &Tensor| t.to_kind(Kind::Double);
        f64(x)
            .matmul(&f64(weight).tr())
            .g_add(&f64(bias))
            .softmax(-1, Kind::Double)
    }

    fn probabilities(p: &Predictor, x: &Tensor) -> Tensor {
        softmax_rows(&p.cls_weight, &p.cls_bias, x)
    }

    /// The largest relative change of an old class's probability from `old` to `new`. The old
    /// probabilities are computed twice: from the old [C, D] matrix, and from the first C rows
    /// of the widened [C + n, D] matrix (a differently shaped product of the same rows), so the
    /// check does not lean on one GEMM path rounding like another.
    fn old_probability_change(old: &Predictor, new: &Predictor, x: &Tensor) -> f64 {
        let c = old.num_classes();
        let p_new = probabilities(new, x).narrow(1, 0, c);
        let p_old = probabilities(old, x);
        let p_old_wide = softmax_rows(
            &new.cls_weight.narrow(0, 0, c),
            &new.cls_bias.narrow(0, 0, c),
            x,
        );
        [p_old, p_old_wide]
            .iter()
            .map(|p| ((&p_new - p).abs() / p).max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    /// What `preserve` promises for `n` new classes: every old probability moves by less than
    /// n * e^-gap relative (exact arithmetic), plus room for float64 rounding.
    fn preserve_bound(n: i64) -> f64 {
        n as f64 * (-PRESERVE_GAP).exp() + 1e-12
    }

    #[test]
    fn preserve_keeps_every_old_score() {
        let old = predictor(6, 16);
        let new = widen(&old, 3, &Init::Preserve).unwrap();
        let x = Tensor::randn([200, 16], (Kind::Float, Device::Cpu)) * 3.0;
        let rel = old_probability_change(&old, &new, &x);
        assert!(
            rel < preserve_bound(3),
            "old probabilities moved by {rel} relative"
        );
        let top_new = probabilities(&new, &x)
            .narrow(1, 6, 3)
            .max()
            .double_value(&[]);
        assert!(
            top_new < 1.13e-7,
            "a new class reached probability {top_new}"
        );
        // the gap to background is PRESERVE_GAP for every input (up to the float32 rounding of
        // the stored bias, background bias - 16)
        let logits = x
            .to_kind(Kind::Double)
            .matmul(&new.cls_weight.to_kind(Kind::Double).tr())
            + new.cls_bias.to_kind(Kind::Double);
        let gap = logits.select(1, 0) - logits.select(1, 7);
        assert!((gap - PRESERVE_GAP).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn the_preserve_check_fails_for_a_smaller_gap() {
        // the same rows with a gap of 8 instead of 16 move old probabilities by up to 3 * e^-8
        let old = predictor(6, 16);
        let (weight, bias) = background_rows(&old, 3, 8.0).unwrap();
        let new = Predictor {
            cls_weight: Tensor::cat(&[&old.cls_weight, &weight], 0),
            cls_bias: Tensor::cat(&[&old.cls_bias, &bias], 0),
            bbox_weight: old.bbox_weight.shallow_clone(),
            bbox_bias: old.bbox_bias.shallow_clone(),
        };
        let x = Tensor::randn([200, 16], (Kind::Float, Device::Cpu)) * 3.0;
        let rel = old_probability_change(&old, &new, &x);
        assert!(
            rel > 100.0 * preserve_bound(3),
            "a gap of 8 moved old probabilities by only {rel}"
        );
    }

    #[test]
    fn background_gives_new_classes_a_share_of_background() {
        let old = predictor(5, 8);
        let new = widen(&old, 2, &Init::Background).unwrap();
        let x = Tensor::randn([50, 8], (Kind::Float, Device::Cpu));
        let p = probabilities(&new, &x);
        // p_new = p_bg / C for every input, C = 5 old outputs
        let ratio = p.select(1, 5) / p.select(1, 0);
        assert!((ratio - 0.2).abs().max().double_value(&[]) < 1e-5);
        assert!(new.cls_weight.get(6).equal(&old.cls_weight.get(0)));
    }

    #[test]
    fn mean_matches_the_old_rows_statistics_and_is_seeded() {
        let old = predictor(41, 64);
        let a = widen(&old, 200, &Init::Mean { seed: 7 }).unwrap();
        let b = widen(&old, 200, &Init::Mean { seed: 7 }).unwrap();
        let c = widen(&old, 200, &Init::Mean { seed: 8 }).unwrap();
        assert!(a.cls_weight.equal(&b.cls_weight));
        assert!(!a.cls_weight.equal(&c.cls_weight));
        let fg = old.cls_weight.narrow(0, 1, 40);
        let rows = a.cls_weight.narrow(0, 41, 200);
        // over 200 draws the column means and spreads match the old foreground rows'
        let mean_err = (rows.mean_dim(0, false, None) - fg.mean_dim(0, false, None))
            .abs()
            .max()
            .double_value(&[]);
        let std_ratio = (rows.std_dim(0, false, false) / fg.std_dim(0, false, false))
            .mean(None)
            .double_value(&[]);
        assert!(mean_err < 0.4, "column means differ by {mean_err}");
        assert!((std_ratio - 1.0).abs() < 0.1, "spread ratio {std_ratio}");
    }

    #[test]
    fn new_box_blocks_are_the_mean_old_block() {
        let old = predictor(4, 5);
        let new = widen(&old, 2, &Init::Preserve).unwrap();
        let expected = old
            .bbox_weight
            .view([4, 4, 5])
            .narrow(0, 1, 3)
            .mean_dim(0, false, None);
        assert!(new
            .bbox_weight
            .narrow(0, 16, 4)
            .allclose(&expected, 1e-6, 1e-6, false));
        assert!(new
            .bbox_weight
            .narrow(0, 20, 4)
            .allclose(&expected, 1e-6, 1e-6, false));
        let expected_bias = old
            .bbox_bias
            .view([4, 4])
            .narrow(0, 1, 3)
            .mean_dim(0, false, None);
        assert!(new
            .bbox_bias
            .narrow(0, 20, 4)
            .allclose(&expected_bias, 1e-6, 1e-6, false));
    }

    #[test]
    fn imprint_points_at_the_class_features_with_old_norm() {
        let old = predictor(5, 8);
        let dir0 = Tensor::from_slice(&[1.0f32, 0., 0., 0., 0., 0., 0., 0.]);
        let dir1 = Tensor::from_slice(&[0.0f32, 0., 2., 0., 0., 0., 0., 0.]);
        let features = Tensor::stack(&[&dir0 * 3.0, dir1.shallow_clone(), &dir0 * 0.5], 0);
        let labels = Tensor::from_slice(&[0i64, 1, 0]);
        let init = Init::Imprint { features, labels };
        let new = widen(&old, 2, &init).unwrap();
        let norm = old
            .cls_weight
            .narrow(0, 1, 4)
            .norm_scalaropt_dim(2.0, [1], false)
            .mean(None);
        let row0 = new.cls_weight.get(5);
        let row1 = new.cls_weight.get(6);
        assert!(row0.allclose(&(&dir0 * &norm), 1e-5, 1e-6, false));
        assert!(row1.allclose(&(&dir1 / 2.0 * &norm), 1e-5, 1e-6, false));
    }

    #[test]
    fn imprint_rejects_bad_features() {
        let old = predictor(5, 8);
        let f = |n: i64, d: i64| Tensor::ones([n, d], (Kind::Float, Device::Cpu));
        let l = |v: &[i64]| Tensor::from_slice(v);
        let cases = [
            (f(2, 7), l(&[0, 1]), "[N, 8]"),
            (f(2, 8), l(&[0]), "must be [2]"),
            (f(2, 8), l(&[0, 2]), "got 2"),
            (f(2, 8), l(&[0, 0]), "[1]"),
            (f(2, 8), Tensor::from_slice(&[0.0f32, 1.0]), "integers"),
        ];
        for (features, labels, needle) in cases {
            let err = widen(&old, 2, &Init::Imprint { features, labels }).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn parse_names_the_choices() {
        assert!(matches!(
            Init::parse("preserve", 0, None, None),
            Ok(Init::Preserve)
        ));
        let err = Init::parse("zeros", 0, None, None).unwrap_err();
        assert!(err.to_string().contains("\"zeros\"") && err.to_string().contains("imprint"));
        let err = Init::parse("imprint", 0, None, None).unwrap_err();
        assert!(err.to_string().contains("needs features"));
    }
}
