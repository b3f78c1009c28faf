//! The two float types the host kernels run on, and raw views of CPU tensors.

use std::ops::{Add, Div, Mul, Sub};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Send
    + Sync
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const KIND: Kind;
    fn from_f64(v: f64) -> Self;
    fn from_i64(v: i64) -> Self;
    fn to_f64(self) -> f64;
    /// The largest value `t` with `(x as f64 > threshold) == (x > t)` for every x of this type,
    /// so comparisons against a double threshold (as torchvision makes them) stay in this type.
    fn below(threshold: f64) -> Self;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const KIND: Kind = Kind::Float;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn from_i64(v: i64) -> f32 {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn below(threshold: f64) -> f32 {
        let t = threshold as f32;
        if (t as f64) > threshold {
            t.next_down()
        } else {
            t
        }
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const KIND: Kind = Kind::Double;
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn from_i64(v: i64) -> f64 {
        v as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn below(threshold: f64) -> f64 {
        threshold
    }
}

/// `max` as C++'s `std::max` computes it (the first argument unless the second is larger).
#[inline(always)]
pub fn max<T: Real>(a: T, b: T) -> T {
    if a < b {
        b
    } else {
        a
    }
}

/// `min` as C++'s `std::min` computes it.
#[inline(always)]
pub fn min<T: Real>(a: T, b: T) -> T {
    if b < a {
        b
    } else {
        a
    }
}

/// The length of `t` if it can be viewed as a slice of `T`: contiguous, on the CPU, of `T::KIND`.
fn host_len<T: Real>(t: &Tensor) -> Result<usize> {
    if !t.is_contiguous() || t.device() != tch::Device::Cpu || t.kind() != T::KIND {
        return Err(Error::Argument(format!(
            "internal: expected a contiguous CPU {:?} tensor",
            T::KIND
        )));
    }
    Ok(t.numel())
}

/// The elements of a contiguous CPU tensor of kind `T::KIND`.
pub fn slice<T: Real>(t: &Tensor) -> Result<&[T]> {
    let n = host_len::<T>(t)?;
    if n == 0 {
        return Ok(&[]);
    }
    // SAFETY: the tensor is contiguous, on the CPU, of element type T and holds n elements; the
    // slice borrows `t`, which keeps the storage alive.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) })
}

/// The elements of a contiguous CPU tensor of kind `T::KIND`, for writing.
pub fn slice_mut<T: Real>(t: &mut Tensor) -> Result<&mut [T]> {
    let n = host_len::<T>(t)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `slice`; the exclusive borrow of `t` makes this the only view.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) })
}

/// The first row of a 2-D tensor that holds a NaN, if any (reads one bool, and one index if found).
pub fn first_nan_row(t: &Tensor) -> Result<Option<i64>> {
    let nan = t.f_isnan()?;
    if !bool::try_from(nan.f_any()?)? {
        return Ok(None);
    }
    Ok(Some(i64::try_from(
        nan.f_any_dim(1, false)?.f_nonzero()?.f_get(0)?.f_get(0)?,
    )?))
}

/// Threads for the host kernels: torch's intra-op setting, so `torch.set_num_threads` applies.
pub fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}
