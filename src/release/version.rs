//! Ordering of release versions, for anti-rollback.
//!
//! OTP release versions are free-form strings. beamup orders them the way
//! people write them: dot-separated parts, numeric parts compared as numbers
//! (`1.10.0 > 1.9.0`), missing parts count as zero (`1.2 == 1.2.0`), a
//! `-pre` suffix sorts before the plain version (`1.2.0-rc1 < 1.2.0`, as in
//! SemVer) and `+build` metadata is ignored. This is SemVer's order wherever
//! a version is SemVer, and a sensible one elsewhere.

use std::cmp::Ordering;

/// Compares two release versions; see the module docs for the rules.
pub(crate) fn compare(a: &str, b: &str) -> Ordering {
    let (a_main, a_pre) = split(a);
    let (b_main, b_pre) = split(b);
    match compare_parts(a_main, b_main, true) {
        Ordering::Equal => {}
        o => return o,
    }
    match (a_pre, b_pre) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => compare_parts(x, y, false),
    }
}

/// `true` when `candidate` is strictly newer than `installed`.
pub(crate) fn is_newer(candidate: &str, installed: &str) -> bool {
    compare(candidate, installed) == Ordering::Greater
}

fn split(v: &str) -> (&str, Option<&str>) {
    let v = v.split('+').next().unwrap_or(v);
    match v.split_once('-') {
        Some((main, pre)) => (main, Some(pre)),
        None => (v, None),
    }
}

fn compare_parts(a: &str, b: &str, pad_with_zero: bool) -> Ordering {
    let mut xs = a.split('.');
    let mut ys = b.split('.');
    loop {
        let (x, y) = match (xs.next(), ys.next()) {
            (None, None) => return Ordering::Equal,
            (Some(x), None) if pad_with_zero => (x, "0"),
            (None, Some(y)) if pad_with_zero => ("0", y),
            // In pre-release identifiers a longer list sorts later (SemVer).
            (Some(_), None) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(x), Some(y)) => (x, y),
        };
        let o = compare_part(x, y);
        if o != Ordering::Equal {
            return o;
        }
    }
}

fn compare_part(x: &str, y: &str) -> Ordering {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    match (numeric(x), numeric(y)) {
        (true, true) => {
            // Compare without parsing so that arbitrarily long numbers work.
            let x = x.trim_start_matches('0');
            let y = y.trim_start_matches('0');
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        }
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => x.cmp(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn orders_like_people_write_versions() {
        let cases = [
            ("1.0.0", "1.0.0", Equal),
            ("1.1.0", "1.0.0", Greater),
            ("1.10.0", "1.9.0", Greater),
            ("1.2", "1.2.0", Equal),
            ("2", "1.99.99", Greater),
            ("1.2.0-rc1", "1.2.0", Less),
            ("1.2.0-rc.2", "1.2.0-rc.10", Less),
            ("1.2.0-alpha", "1.2.0-alpha.1", Less),
            ("1.2.0+build5", "1.2.0", Equal),
            ("0.9.0", "0.10.0", Less),
            ("1.0.0a", "1.0.0", Greater),
            ("99999999999999999999999", "9", Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn newer_is_strict() {
        assert!(is_newer("1.1.0", "1.0.0"));
        assert!(!is_newer("1.0.0", "1.0.0"));
        assert!(!is_newer("1.0", "1.0.0"));
    }
}
