//! Storable JSON: what a store can keep exactly as it was given.
//!
//! Two things that serde_json accepts do not survive the trip to a store:
//!
//! - a **NUL** character (`\u0000`) in a string or an object key, which
//!   PostgreSQL's `jsonb` and `text` refuse (SQLSTATE 22P05);
//! - a **non-finite number** (`NaN`, `inf`, `-inf`), which serde_json
//!   writes as `null`, so that the value read back is not the one written
//!   (and usually no longer deserializes as its type).
//!
//! [`check`] walks any [`Serialize`] value (a typed state, a
//! [`serde_json::Value`]) with a serializer that only looks, and returns
//! the first [`Unstorable`] part with its path. The client checks a start's
//! input with it, the executor the state a step leaves,
//! [`Message::json`](crate::Message::json) and [`Message::new`](crate::Message::new)
//! a payload, and the stores what they are handed: such data is refused
//! before anything is written, never retried.

use std::fmt::{self, Display, Write as _};

use serde::Serialize;
use serde::ser::{self, Impossible};

/// A part of a value that no store keeps as given, and where it is.
///
/// The path is JSONPath-like (`$.items[2].name`; a key that is not a plain
/// identifier is quoted, its control characters escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unstorable {
    /// A string or an object key holds a NUL character (`\u0000`), which
    /// PostgreSQL cannot store in text or `jsonb`.
    #[error("a NUL character (\\u0000) in {} at {path}, which PostgreSQL cannot store", if *.in_key { "an object key" } else { "a string" })]
    Nul {
        /// Where.
        path: String,
        /// Whether it is in an object key (rather than in a string value).
        in_key: bool,
    },
    /// A number is not finite (`NaN`, `inf` or `-inf`), which JSON cannot
    /// represent (serde_json would write `null`).
    #[error("a non-finite number ({value}) at {path}, which JSON cannot represent")]
    NonFinite {
        /// Where.
        path: String,
        /// `NaN`, `inf` or `-inf`.
        value: &'static str,
    },
}

/// Checks that `value` is storable JSON: no NUL in any string or key, no
/// non-finite number. Pure; serializes nothing. An error the value's own
/// `Serialize` raises (a map with keys JSON cannot have, say) is not this
/// check's to report: the value passes, and serde_json reports it when the
/// value is serialized.
pub fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), Unstorable> {
    let mut checker = Checker { path: Vec::new() };
    match value.serialize(&mut checker) {
        Ok(()) | Err(Found::Other) => Ok(()),
        Err(Found::Unstorable(u)) => Err(u),
    }
}

/// [`check`], as the crate's [`Error::Unstorable`](crate::Error::Unstorable)
/// for `what`.
pub(crate) fn refuse_unstorable<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<(), crate::Error> {
    check(value).map_err(|problem| crate::Error::Unstorable { what, problem })
}

/// One step of a path.
#[derive(Debug, Clone)]
enum Segment {
    Index(usize),
    Key(String),
}

fn render(path: &[Segment]) -> String {
    let mut out = String::from("$");
    for s in path {
        match s {
            Segment::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Segment::Key(k)
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                let _ = write!(out, ".{k}");
            }
            // Debug escapes quotes and control characters, NUL included:
            // the path itself is storable.
            Segment::Key(k) => {
                let _ = write!(out, "[{k:?}]");
            }
        }
    }
    out
}

/// Why the walk stopped.
#[derive(Debug)]
enum Found {
    Unstorable(Unstorable),
    /// The value's own `Serialize` failed: not ours to report.
    Other,
}

impl Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Unstorable(u) => u.fmt(f),
            Found::Other => f.write_str("the value failed to serialize"),
        }
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<M: Display>(_: M) -> Self {
        Found::Other
    }
}

struct Checker {
    path: Vec<Segment>,
}

impl Checker {
    fn string(&self, s: &str, in_key: bool) -> Result<(), Found> {
        if s.contains('\0') {
            return Err(Found::Unstorable(Unstorable::Nul {
                path: render(&self.path),
                in_key,
            }));
        }
        Ok(())
    }

    fn float(&self, v: f64) -> Result<(), Found> {
        if v.is_finite() {
            return Ok(());
        }
        let value = if v.is_nan() {
            "NaN"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        };
        Err(Found::Unstorable(Unstorable::NonFinite {
            path: render(&self.path),
            value,
        }))
    }

    fn within<T: Serialize + ?Sized>(&mut self, at: Segment, value: &T) -> Result<(), Found> {
        self.path.push(at);
        let r = value.serialize(&mut *self);
        self.path.pop();
        r
    }
}

/// A sequence, tuple or map being walked: its elements' index, or the key
/// awaiting its value.
struct Compound<'a> {
    checker: &'a mut Checker,
    index: usize,
    key: Option<String>,
}

impl<'a> Compound<'a> {
    fn new(checker: &'a mut Checker) -> Self {
        Compound {
            checker,
            index: 0,
            key: None,
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let at = Segment::Index(self.index);
        self.index += 1;
        self.checker.within(at, value)
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), Found> {
        self.checker.within(Segment::Key(name.to_owned()), value)
    }
}

impl<'a> ser::Serializer for &'a mut Checker {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, _: bool) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<(), Found> {
        self.string(v.encode_utf8(&mut [0; 4]), false)
    }
    fn serialize_str(self, v: &str) -> Result<(), Found> {
        self.string(v, false)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Found> {
        // serde_json writes bytes as an array of numbers.
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Found> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.within(Segment::Key(variant.to_owned()), value)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, Found> {
        Ok(Compound::new(self))
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'a>, Found> {
        Ok(Compound::new(self))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, Found> {
        Ok(Compound::new(self))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, Found> {
        self.path.push(Segment::Key(variant.to_owned()));
        Ok(Compound::new(self))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a>, Found> {
        Ok(Compound::new(self))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, Found> {
        Ok(Compound::new(self))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, Found> {
        self.path.push(Segment::Key(variant.to_owned()));
        Ok(Compound::new(self))
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        self.checker.path.pop();
        Ok(())
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Found> {
        let key = key.serialize(KeyText)?;
        self.checker.string(&key, true)?;
        self.key = Some(key);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let key = self.key.take().unwrap_or_default();
        self.checker.within(Segment::Key(key), value)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.field(name, value)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.field(name, value)
    }
    fn end(self) -> Result<(), Found> {
        self.checker.path.pop();
        Ok(())
    }
}

/// A map key as the text serde_json would write for it: strings and
/// characters as they are, numbers and booleans as their digits. Any other
/// key is not JSON's (serde_json refuses it); not ours to report.
struct KeyText;

macro_rules! key_as_text {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<String, Found> {
            Ok(v.to_string())
        })*
    };
}

impl ser::Serializer for KeyText {
    type Ok = String;
    type Error = Found;
    type SerializeSeq = Impossible<String, Found>;
    type SerializeTuple = Impossible<String, Found>;
    type SerializeTupleStruct = Impossible<String, Found>;
    type SerializeTupleVariant = Impossible<String, Found>;
    type SerializeMap = Impossible<String, Found>;
    type SerializeStruct = Impossible<String, Found>;
    type SerializeStructVariant = Impossible<String, Found>;

    key_as_text! {
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_f32: f32,
        serialize_f64: f64, serialize_char: char, serialize_str: &str,
    }

    fn serialize_bytes(self, _: &[u8]) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_none(self) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_unit(self) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String, Found> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, Found> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Found> {
        Err(Found::Other)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Found> {
        Err(Found::Other)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Found> {
        Err(Found::Other)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Found> {
        Err(Found::Other)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[derive(Serialize)]
    struct Order {
        id: u32,
        total: f64,
        lines: Vec<Line>,
        tags: BTreeMap<String, String>,
        note: Option<String>,
        kind: Kind,
    }

    #[derive(Serialize)]
    struct Line {
        sku: String,
        price: f32,
    }

    #[derive(Serialize)]
    enum Kind {
        Plain,
        Gift { from: String },
        Split(f64, f64),
    }

    fn order() -> Order {
        Order {
            id: 7,
            total: 12.5,
            lines: vec![
                Line {
                    sku: "a".into(),
                    price: 1.0,
                },
                Line {
                    sku: "b".into(),
                    price: 2.0,
                },
            ],
            tags: BTreeMap::from([("colour".into(), "red".into())]),
            note: None,
            kind: Kind::Plain,
        }
    }

    fn nul(path: &str, in_key: bool) -> Result<(), Unstorable> {
        Err(Unstorable::Nul {
            path: path.into(),
            in_key,
        })
    }

    fn non_finite(path: &str, value: &'static str) -> Result<(), Unstorable> {
        Err(Unstorable::NonFinite {
            path: path.into(),
            value,
        })
    }

    #[test]
    fn each_unstorable_part_is_found_with_its_path() {
        type Change = fn(&mut Order);
        let table: Vec<(&str, Change, Result<(), Unstorable>)> = vec![
            ("as is", |_| {}, Ok(())),
            (
                "NaN total",
                |o| o.total = f64::NAN,
                non_finite("$.total", "NaN"),
            ),
            (
                "inf price",
                |o| o.lines[1].price = f32::INFINITY,
                non_finite("$.lines[1].price", "inf"),
            ),
            (
                "-inf in a tuple variant",
                |o| o.kind = Kind::Split(1.0, f64::NEG_INFINITY),
                non_finite("$.kind.Split[1]", "-inf"),
            ),
            (
                "NUL in a nested string",
                |o| o.lines[0].sku = "a\0b".into(),
                nul("$.lines[0].sku", false),
            ),
            (
                "NUL in an option",
                |o| o.note = Some("\0".into()),
                nul("$.note", false),
            ),
            (
                "NUL in a map value",
                |o| {
                    o.tags.insert("colour".into(), "re\0d".into());
                },
                nul("$.tags.colour", false),
            ),
            (
                "NUL in a map key",
                |o| {
                    o.tags.insert("col\0our".into(), "red".into());
                },
                nul("$.tags", true),
            ),
            (
                "NUL in a struct variant",
                |o| o.kind = Kind::Gift { from: "\0".into() },
                nul("$.kind.Gift.from", false),
            ),
            (
                "other control characters are fine",
                |o| o.lines[0].sku = "tab\tnew\nline\u{1}".into(),
                Ok(()),
            ),
            ("finite extremes are fine", |o| o.total = f64::MAX, Ok(())),
        ];
        for (name, change, expected) in table {
            let mut o = order();
            change(&mut o);
            assert_eq!(check(&o), expected, "{name}");
        }
    }

    #[test]
    fn json_values_are_checked_too_and_keys_in_paths_are_escaped() {
        assert_eq!(check(&json!({"a": [1, "x", {"b": null}]})), Ok(()));
        assert_eq!(check(&json!({"a": [1, "x\u{0}"]})), nul("$.a[1]", false));
        assert_eq!(
            check(&json!({"odd key\u{0}": {"v": "\u{0}"}})),
            nul("$", true)
        );
        // A NUL inside a path is escaped, so the reason is storable itself.
        assert_eq!(
            check(&json!({"k\"ey": {"v": "\u{0}"}})),
            nul(r#"$["k\"ey"].v"#, false)
        );
        let reason = check(&json!({"a b": "\u{0}"})).unwrap_err().to_string();
        assert_eq!(
            reason,
            r#"a NUL character (\u0000) in a string at $["a b"], which PostgreSQL cannot store"#
        );
        assert!(!reason.contains('\0'));
    }

    #[test]
    fn a_non_finite_number_is_what_serde_json_would_silently_turn_into_null() {
        let v = serde_json::to_value(f64::NAN).unwrap();
        assert_eq!(v, serde_json::Value::Null, "the loss this check prevents");
        assert_eq!(check(&f64::NAN), non_finite("$", "NaN"));
        assert_eq!(check(&vec![1.0_f64, 2.0]), Ok(()));
    }

    #[test]
    fn map_keys_of_other_types_are_read_as_json_writes_them() {
        let by_number = BTreeMap::from([(3_u32, f64::NAN)]);
        assert_eq!(check(&by_number), non_finite("$.3", "NaN"));
        // A key serde_json refuses is not this check's to report.
        let by_pair = BTreeMap::from([((1, 2), 0.5)]);
        assert_eq!(check(&by_pair), Ok(()));
        assert!(serde_json::to_value(&by_pair).is_err());
    }
}
