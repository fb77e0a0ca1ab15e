//! Training-time augmentation of image batches: random crops of a reflect-padded image and
//! horizontal flips, drawn per sample from `(seed, epoch, sample index)`, so a run is
//! reproducible and a resumed run draws exactly what the uninterrupted one would have.

use std::fmt;
use std::str::FromStr;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::DataError;
use super::dataset::mix;

/// Which augmentations a run applies to its training batches (never to evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Augment {
    /// Random crop: the image is shifted by up to `crop_pad` pixels in each direction,
    /// the uncovered border filled by reflection (as a crop of the image padded by
    /// reflection, the same size as the original). 0 is off.
    pub crop_pad: usize,
    /// Mirror each image left-right with probability 1/2 (natural images such as
    /// CIFAR-10; not digits or clothes, whose orientation carries meaning).
    pub flip: bool,
}

impl Augment {
    /// No augmentation.
    pub const NONE: Augment = Augment {
        crop_pad: 0,
        flip: false,
    };

    /// Whether it changes nothing.
    pub fn is_off(&self) -> bool {
        self.crop_pad == 0 && !self.flip
    }

    /// Checks it against images of shape `[channels, height, width]`: a crop shift must be
    /// smaller than each side (reflection needs a pixel to mirror).
    pub fn check(&self, shape: [usize; 3]) -> Result<(), DataError> {
        let [_, h, w] = shape;
        if self.crop_pad > 0 && (self.crop_pad >= h || self.crop_pad >= w) {
            return Err(DataError::InvalidOption(format!(
                "crop padding {} needs images larger than it; these are {h}x{w}",
                self.crop_pad
            )));
        }
        Ok(())
    }

    /// Augments `images` (one row of `shape` per entry of `indices`, row-major) in place:
    /// sample `indices[k]` of epoch `epoch` draws its shift and flip from
    /// `(seed, epoch, indices[k])`. `scratch` holds one image (reused, no allocation once
    /// it is large enough).
    pub fn apply(
        &self,
        images: &mut [f32],
        indices: &[usize],
        shape: [usize; 3],
        seed: u64,
        epoch: usize,
        scratch: &mut Vec<f32>,
    ) {
        if self.is_off() {
            return;
        }
        let [c, h, w] = shape;
        let dim = c * h * w;
        scratch.resize(dim, 0.0);
        let pad = self.crop_pad as i64;
        let epoch_seed = mix(seed, 0xA06_0000 + epoch as u64);
        for (image, &index) in images.chunks_exact_mut(dim).zip(indices) {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(epoch_seed, index as u64));
            let (dy, dx) = if pad > 0 {
                (
                    rng.random_range(-pad..=pad) as isize,
                    rng.random_range(-pad..=pad) as isize,
                )
            } else {
                (0, 0)
            };
            let flip = self.flip && rng.random_bool(0.5);
            if dy == 0 && dx == 0 && !flip {
                continue;
            }
            scratch.copy_from_slice(image);
            for ch in 0..c {
                let src = &scratch[ch * h * w..(ch + 1) * h * w];
                let dst = &mut image[ch * h * w..(ch + 1) * h * w];
                for y in 0..h {
                    let sy = reflect(y as isize + dy, h);
                    let row = &src[sy * w..(sy + 1) * w];
                    let out = &mut dst[y * w..(y + 1) * w];
                    for (x, o) in out.iter_mut().enumerate() {
                        let xx = if flip { w - 1 - x } else { x };
                        *o = row[reflect(xx as isize + dx, w)];
                    }
                }
            }
        }
    }
}

/// Index `i` reflected into `0..n` without repeating the edge (`-1 -> 1`, `n -> n - 2`);
/// `|shift| < n` keeps one reflection enough.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let r = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    r.clamp(0, n - 1) as usize
}

impl FromStr for Augment {
    type Err = String;

    /// `none`, or a comma-separated list of `crop:PAD` and `flip`, e.g. `crop:4,flip`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut a = Augment::NONE;
        let s = s.trim();
        if s == "none" {
            return Ok(a);
        }
        for part in s.split(',').map(str::trim) {
            match part.split_once(':') {
                None if part == "flip" => a.flip = true,
                Some(("crop", pad)) => {
                    a.crop_pad = pad
                        .parse()
                        .map_err(|_| format!("`{part}`: crop padding must be a whole number"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown augmentation `{part}` (expected none, crop:PAD, flip or a list such as crop:4,flip)"
                    ));
                }
            }
        }
        Ok(a)
    }
}

impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.crop_pad, self.flip) {
            (0, false) => f.write_str("none"),
            (0, true) => f.write_str("flip"),
            (p, false) => write!(f, "crop:{p}"),
            (p, true) => write!(f, "crop:{p},flip"),
        }
    }
}

impl TryFrom<String> for Augment {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Augment> for String {
    fn from(a: Augment) -> String {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_mirrors_without_repeating_the_edge() {
        assert_eq!(
            (-3..8).map(|i| reflect(i, 5)).collect::<Vec<_>>(),
            [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
        );
    }

    #[test]
    fn spellings_round_trip_and_bad_ones_are_refused() {
        for s in ["none", "flip", "crop:4", "crop:2,flip"] {
            assert_eq!(s.parse::<Augment>().unwrap().to_string(), s);
        }
        assert!("crop:x".parse::<Augment>().is_err());
        assert!("rotate".parse::<Augment>().is_err());
    }
}
