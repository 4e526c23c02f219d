//! Scores with Pacemaker's arithmetic: bounded by ±INFINITY (1,000,000), saturating, and
//! -INFINITY wins over +INFINITY so that a ban can never be outvoted by a preference.

use std::fmt;
use std::ops::{Add, AddAssign};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The magnitude Pacemaker calls INFINITY.
pub const INFINITY: i64 = 1_000_000;

/// A placement score in `[-INFINITY, +INFINITY]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score(i64);

/// Why a text is not a score.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    #[error("`{0}` is not a score: expected an integer, INFINITY, +INFINITY or -INFINITY")]
    NotAScore(String),
}

impl Score {
    pub const ZERO: Score = Score(0);
    pub const INFINITY: Score = Score(INFINITY);
    pub const NEG_INFINITY: Score = Score(-INFINITY);

    /// A score from an integer, clamped to ±INFINITY.
    pub const fn new(v: i64) -> Score {
        // `Ord::clamp` is not const; constants such as the scheduler's weights need this.
        if v > INFINITY {
            Score(INFINITY)
        } else if v < -INFINITY {
            Score(-INFINITY)
        } else {
            Score(v)
        }
    }

    pub fn value(self) -> i64 {
        self.0
    }

    pub fn is_pos_inf(self) -> bool {
        self.0 >= INFINITY
    }

    pub fn is_neg_inf(self) -> bool {
        self.0 <= -INFINITY
    }

    /// Multiply by `num / INFINITY` (how colocation scores scale the preferences they
    /// carry along a chain), keeping ±INFINITY only when both sides are infinite.
    pub fn scale(self, factor: Score) -> Score {
        if self.0 == 0 || factor.0 == 0 {
            return Score::ZERO;
        }
        if self.is_neg_inf() || self.is_pos_inf() {
            if factor.is_pos_inf() {
                return self;
            }
            if factor.is_neg_inf() {
                return Score(-self.0);
            }
        }
        let v = (self.0 as i128 * factor.0 as i128) / INFINITY as i128;
        Score::new(v as i64)
    }
}

impl Add for Score {
    type Output = Score;
    fn add(self, rhs: Score) -> Score {
        if self.is_neg_inf() || rhs.is_neg_inf() {
            return Score::NEG_INFINITY;
        }
        if self.is_pos_inf() || rhs.is_pos_inf() {
            return Score::INFINITY;
        }
        Score::new(self.0 + rhs.0)
    }
}

impl AddAssign for Score {
    fn add_assign(&mut self, rhs: Score) {
        *self = *self + rhs;
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_pos_inf() {
            f.write_str("INFINITY")
        } else if self.is_neg_inf() {
            f.write_str("-INFINITY")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl FromStr for Score {
    type Err = ScoreError;
    fn from_str(s: &str) -> Result<Score, ScoreError> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "infinity" | "+infinity" | "inf" | "+inf" => return Ok(Score::INFINITY),
            "-infinity" | "-inf" => return Ok(Score::NEG_INFINITY),
            _ => {}
        }
        t.parse::<i64>()
            .map(Score::new)
            .map_err(|_| ScoreError::NotAScore(s.to_string()))
    }
}

impl Serialize for Score {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_pos_inf() || self.is_neg_inf() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Score, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Score;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer score or \"INFINITY\" / \"-INFINITY\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Score, E> {
                Ok(Score::new(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Score, E> {
                Ok(Score::new(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Score, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinities_saturate_and_minus_wins() {
        assert_eq!(Score::INFINITY + Score::NEG_INFINITY, Score::NEG_INFINITY);
        assert_eq!(Score::NEG_INFINITY + Score::INFINITY, Score::NEG_INFINITY);
        assert_eq!(Score::INFINITY + Score::new(5), Score::INFINITY);
        assert_eq!(Score::new(999_999) + Score::new(10), Score::INFINITY);
        assert_eq!(Score::new(-999_999) + Score::new(-10), Score::NEG_INFINITY);
        assert_eq!(Score::new(3) + Score::new(-5), Score::new(-2));
        assert_eq!(Score::new(i64::MAX), Score::INFINITY);
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!("INFINITY".parse::<Score>(), Ok(Score::INFINITY));
        assert_eq!("+INFINITY".parse::<Score>(), Ok(Score::INFINITY));
        assert_eq!("-infinity".parse::<Score>(), Ok(Score::NEG_INFINITY));
        assert_eq!(" 42 ".parse::<Score>(), Ok(Score::new(42)));
        assert!("lots".parse::<Score>().is_err());
        assert_eq!(Score::NEG_INFINITY.to_string(), "-INFINITY");
        assert_eq!(Score::new(-7).to_string(), "-7");
    }

    #[test]
    fn scaling_keeps_infinity_only_for_infinite_factors() {
        assert_eq!(
            Score::NEG_INFINITY.scale(Score::INFINITY),
            Score::NEG_INFINITY
        );
        assert_eq!(Score::new(100).scale(Score::new(500_000)), Score::new(50));
        assert_eq!(
            Score::INFINITY.scale(Score::new(500_000)),
            Score::new(500_000)
        );
        assert_eq!(
            Score::INFINITY.scale(Score::NEG_INFINITY),
            Score::NEG_INFINITY
        );
    }
}
