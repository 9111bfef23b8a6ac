//! Scalars as kubectl reads them.
//!
//! kubectl turns YAML into JSON with sigs.k8s.io/yaml, which resolves scalars with
//! go-yaml v2's YAML 1.1 rules: `y`, `yes`, `on` (and their capitalised forms) are
//! booleans; integers follow Go's syntax, so `0755` and `0o17` are octal, `0x1F` hex,
//! `0b101` binary, and `_` separates digits anywhere; floats are what Go's `ParseFloat`
//! reads; timestamps and everything else stay strings. The JSON it produces is then read
//! the Kubernetes way, where a number is an int64 or else a float64. [`resolve`] and
//! [`Scalar::to_json`] reproduce these steps; `tests/tests/render_kubectl_parity.rs`
//! checks them against kubectl.

use base64::Engine;
use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
use serde_json::Value;

/// A scalar as go-yaml v2 resolves it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    /// Integers above `i64::MAX`: go-yaml keeps them, JSON readers make them floats.
    Uint(u64),
    Float(f64),
    Str(String),
    /// A plain `<<` (or `!!merge <<`): merges a mapping in key position, `"<<"` elsewhere.
    MergeKey,
}

/// Why a scalar has no JSON form that kubectl would give it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScalarError {
    #[error("cannot decode !!{found} `{text}` as a !!{expected}")]
    WrongTag { text: String, found: &'static str, expected: &'static str },
    #[error("!!binary value is not base64 of UTF-8 text")]
    Binary,
    #[error("the !!timestamp tag is not supported: quote the value instead")]
    Timestamp,
    #[error("{0} is not a number JSON can hold")]
    NotFinite(f64),
    #[error("{0} cannot be a mapping key")]
    Key(&'static str),
}

const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

/// Resolves a scalar's text (after YAML escape processing) like go-yaml v2: `plain` is
/// whether it was written without quotes or block indicators, `tag` its full tag if any
/// (`tag:yaml.org,2002:int` for `!!int`).
pub(super) fn resolve(text: &str, plain: bool, tag: Option<&str>) -> Result<Scalar, ScalarError> {
    let Some(tag) = tag else {
        return Ok(if !plain {
            Scalar::Str(text.to_owned())
        } else if text == "<<" {
            Scalar::MergeKey
        } else {
            resolve_plain(text)
        });
    };
    let expected = match tag.strip_prefix(CORE_TAG_PREFIX) {
        Some("str") => return Ok(Scalar::Str(text.to_owned())),
        Some("binary") => return binary(text).map(Scalar::Str),
        Some("merge") if text == "<<" => return Ok(Scalar::MergeKey),
        // Needs Go's time.Parse layouts to tell a timestamp from a mistake; nobody writes it.
        Some("timestamp") => return Err(ScalarError::Timestamp),
        Some("bool") => "bool",
        Some("int") => "int",
        Some("float") => "float",
        Some("null") => "null",
        // go-yaml keeps the text of a scalar with any other tag.
        _ => return Ok(Scalar::Str(text.to_owned())),
    };
    // An explicit tag resolves the text as if it were plain, whatever its style, and the
    // result must be of the tagged type; an int is accepted as a float.
    match resolve_plain(text) {
        Scalar::Int(i) if expected == "float" => Ok(Scalar::Float(i as f64)),
        resolved if resolved.tag() == expected => Ok(resolved),
        resolved => Err(ScalarError::WrongTag { text: text.to_owned(), found: resolved.tag(), expected }),
    }
}

/// go-yaml v2's `resolve` for an untagged plain scalar.
fn resolve_plain(text: &str) -> Scalar {
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Scalar::Bool(true),
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Scalar::Bool(false),
        "" | "~" | "null" | "Null" | "NULL" => Scalar::Null,
        ".nan" | ".NaN" | ".NAN" => Scalar::Float(f64::NAN),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Scalar::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Scalar::Float(f64::NEG_INFINITY),
        // go-yaml looks at the first character to decide what else the text may be.
        _ => match text.as_bytes()[0] {
            b'.' => go_float_with_underscores(text).map_or_else(|| Scalar::Str(text.to_owned()), Scalar::Float),
            b'0'..=b'9' | b'+' | b'-' => number(text).unwrap_or_else(|| Scalar::Str(text.to_owned())),
            _ => Scalar::Str(text.to_owned()),
        },
    }
}

/// A plain scalar starting with a digit or sign, in go-yaml's order of attempts.
/// (go-yaml tries timestamps first, but a timestamp stays a string anyway.)
fn number(text: &str) -> Option<Scalar> {
    let plain = text.replace('_', "");
    if let Some(i) = go_parse_int(&plain) {
        return Some(Scalar::Int(i));
    }
    if let Some(u) = go_parse_uint(&plain) {
        return Some(Scalar::Uint(u));
    }
    if let Some(f) = go_float(&plain) {
        return Some(Scalar::Float(f));
    }
    // go-yaml's own binary fallback, which also takes a sign after the prefix (`0b-101`).
    let digits = plain.strip_prefix("0b")?;
    let (negative, magnitude) = split_sign(digits);
    let value = parse_digits(magnitude, 2)?;
    match (negative, i64::try_from(value)) {
        (false, Ok(i)) => Some(Scalar::Int(i)),
        (false, Err(_)) => Some(Scalar::Uint(value)),
        (true, _) => i64::try_from(-i128::from(value)).ok().map(Scalar::Int),
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: a sign, then [`go_parse_uint`]'s syntax.
fn go_parse_int(s: &str) -> Option<i64> {
    let (negative, magnitude) = split_sign(s);
    let magnitude = i128::from(go_parse_uint(magnitude)?);
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Go's `strconv.ParseUint(s, 0, 64)`: no sign; `0x`, `0o`, `0b` (any case) or a bare
/// leading `0` (octal) pick the base.
fn go_parse_uint(s: &str) -> Option<u64> {
    let (radix, digits) = match s.as_bytes() {
        [b'0'] => return Some(0),
        [b'0', prefix, _, ..] if prefix.eq_ignore_ascii_case(&b'x') => (16, &s[2..]),
        [b'0', prefix, _, ..] if prefix.eq_ignore_ascii_case(&b'o') => (8, &s[2..]),
        [b'0', prefix, _, ..] if prefix.eq_ignore_ascii_case(&b'b') => (2, &s[2..]),
        [b'0', ..] => (8, &s[1..]),
        _ => (10, s),
    };
    parse_digits(digits, radix)
}

fn split_sign(s: &str) -> (bool, &str) {
    match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    }
}

/// Digits only (no sign, prefix or separator); `None` if empty, invalid or above u64.
fn parse_digits(digits: &str, radix: u32) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0u64, |n, c| n.checked_mul(radix.into())?.checked_add(c.to_digit(radix)?.into()))
}

/// A float in go-yaml's syntax, `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`,
/// that Go's `ParseFloat` reads without overflowing (go-yaml keeps `1e400` a string).
fn go_float(s: &str) -> Option<f64> {
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let unsigned = split_sign(s).1;
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty()),
        None => !mantissa.is_empty() && digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = split_sign(e).1;
        !e.is_empty() && digits(e)
    });
    if !(mantissa_ok && exponent_ok) {
        return None;
    }
    // Rust's parser reads this syntax as Go's does, both rounding correctly.
    let value: f64 = s.parse().ok()?;
    value.is_finite().then_some(value)
}

/// Go's `ParseFloat` on text go-yaml left its `_` in: they may stand between digits only.
fn go_float_with_underscores(s: &str) -> Option<f64> {
    let bytes = s.as_bytes();
    let between_digits =
        |i: usize| i > 0 && i + 1 < bytes.len() && bytes[i - 1].is_ascii_digit() && bytes[i + 1].is_ascii_digit();
    (0..bytes.len()).filter(|&i| bytes[i] == b'_').all(between_digits).then(|| go_float(&s.replace('_', "")))?
}

/// `!!binary`: base64 as Go's decoder takes it (line breaks ignored, lax trailing bits).
fn binary(text: &str) -> Result<String, ScalarError> {
    const GO_STD_ENCODING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let compact: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
    let bytes = GO_STD_ENCODING.decode(compact).map_err(|_| ScalarError::Binary)?;
    // Go would replace invalid UTF-8 with U+FFFD; the agent only carries text.
    String::from_utf8(bytes).map_err(|_| ScalarError::Binary)
}

impl Scalar {
    /// The go-yaml tag name of a resolved value, for error messages.
    fn tag(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "bool",
            Scalar::Int(_) | Scalar::Uint(_) => "int",
            Scalar::Float(_) => "float",
            Scalar::Str(_) | Scalar::MergeKey => "str",
        }
    }

    /// The value as kubectl sends it: JSON (so no infinities), and numbers as Kubernetes
    /// reads them, an int64 when the JSON spelling is an integer that fits, else a float64.
    pub(super) fn to_json(&self) -> Result<Value, ScalarError> {
        Ok(match *self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Int(i) => Value::from(i),
            Scalar::Uint(u) => Value::from(u as f64),
            Scalar::Float(f) if !f.is_finite() => return Err(ScalarError::NotFinite(f)),
            // Go writes an integral float64 below 1e21 without a fraction ("3" for 3.0,
            // shortest digits padded with zeros above 2^53); Rust's Display does the same.
            Scalar::Float(f) => f.to_string().parse::<i64>().map_or_else(|_| Value::from(f), Value::from),
            Scalar::Str(ref s) => Value::String(s.clone()),
            Scalar::MergeKey => Value::String("<<".to_owned()),
        })
    }

    /// The scalar as a JSON object key, as sigs.k8s.io/yaml converts go-yaml's keys.
    pub(super) fn to_key(&self) -> Result<String, ScalarError> {
        match *self {
            Scalar::Str(ref s) => Ok(s.clone()),
            Scalar::Int(i) => Ok(i.to_string()),
            Scalar::Bool(b) => Ok(b.to_string()),
            Scalar::Float(f) => Ok(go_format_float32(f)),
            Scalar::MergeKey => Ok("<<".to_owned()),
            Scalar::Null => Err(ScalarError::Key("null")),
            Scalar::Uint(_) => Err(ScalarError::Key("an integer above 2^63-1")),
        }
    }
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 32)`, with go-yaml's names for the non-finite
/// values: the shortest digits of the float32, in exponent form below 1e-4 or from 1e6.
fn go_format_float32(f: f64) -> String {
    let f = f as f32;
    if f.is_nan() {
        return ".nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf" } else { "-.inf" }.to_owned();
    }
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').expect("`{:e}` writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    if (-4..6).contains(&exponent) {
        f.to_string()
    } else {
        format!("{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(text: &str) -> Scalar {
        resolve(text, true, None).unwrap()
    }

    #[test]
    fn plain_scalars_resolve_like_go_yaml_v2() {
        use Scalar::*;
        let cases = [
            ("yes", Bool(true)),
            ("Y", Bool(true)),
            ("off", Bool(false)),
            ("yES", Str("yES".into())),
            ("~", Null),
            ("", Null),
            ("0755", Int(0o755)),
            ("0o17", Int(15)),
            ("0x_1F", Int(31)),
            ("-0x1F", Int(-31)),
            ("0b101", Int(5)),
            ("0b-101", Int(-5)),
            ("08", Float(8.0)),
            ("0o8", Str("0o8".into())),
            ("0x", Str("0x".into())),
            ("1_000", Int(1000)),
            ("1e3", Float(1000.0)),
            ("3.", Float(3.0)),
            (".5", Float(0.5)),
            (".5_0", Float(0.5)),
            ("._5", Str("._5".into())),
            ("1e400", Str("1e400".into())),
            ("9223372036854775808", Uint(1 << 63)),
            ("-9223372036854775808", Int(i64::MIN)),
            ("-9223372036854775809", Float(-9223372036854775809.0)),
            ("0xFFFFFFFFFFFFFFFFF", Str("0xFFFFFFFFFFFFFFFFF".into())),
            ("2001-12-14", Str("2001-12-14".into())),
            ("1:30", Str("1:30".into())),
            ("<<", MergeKey),
        ];
        for (text, expected) in cases {
            assert_eq!(plain(text), expected, "{text:?}");
        }
        assert_eq!(resolve("yes", false, None).unwrap(), Str("yes".into()), "quoted scalars are strings");
    }

    #[test]
    fn explicit_tags() {
        let tagged = |tag: &str, text: &str| resolve(text, false, Some(&format!("{CORE_TAG_PREFIX}{tag}")));
        assert_eq!(tagged("int", "12"), Ok(Scalar::Int(12)));
        assert_eq!(tagged("float", "1"), Ok(Scalar::Float(1.0)));
        assert_eq!(tagged("str", "12"), Ok(Scalar::Str("12".into())));
        assert_eq!(tagged("binary", "aGVs\nbG8="), Ok(Scalar::Str("hello".into())));
        assert_eq!(tagged("int", "x").unwrap_err().to_string(), "cannot decode !!str `x` as a !!int");
        assert_eq!(resolve("3", true, Some("!custom")), Ok(Scalar::Str("3".into())));
    }

    #[test]
    fn numbers_become_int64_or_float64() {
        let json = |s: Scalar| s.to_json().unwrap().to_string();
        assert_eq!(json(Scalar::Float(3.0)), "3");
        assert_eq!(json(Scalar::Float(-0.0)), "0");
        assert_eq!(json(Scalar::Float(1.5)), "1.5");
        assert_eq!(json(Scalar::Float(1.2345678901234567e18)), "1234567890123456800");
        assert_eq!(json(Scalar::Float(1e20)), "1e+20");
        assert_eq!(json(Scalar::Uint(u64::MAX)), "1.8446744073709552e+19");
        assert!(Scalar::Float(f64::INFINITY).to_json().is_err());
    }

    #[test]
    fn keys_are_strings_as_sigs_yaml_makes_them() {
        let key = |s: Scalar| s.to_key().unwrap();
        assert_eq!(key(Scalar::Bool(true)), "true");
        assert_eq!(key(Scalar::Int(16)), "16");
        assert_eq!(key(Scalar::Float(1000.0)), "1000");
        assert_eq!(key(Scalar::Float(1e6)), "1e+06");
        assert_eq!(key(Scalar::Float(123456789.0)), "1.2345679e+08");
        assert_eq!(key(Scalar::Float(0.0001)), "0.0001");
        assert_eq!(key(Scalar::Float(0.00001)), "1e-05");
        assert_eq!(key(Scalar::Float(f64::INFINITY)), ".inf");
        assert!(Scalar::Null.to_key().is_err());
        assert!(Scalar::Uint(u64::MAX).to_key().is_err());
    }
}
