//! JSON objects that refuse duplicate keys. serde_json keeps the last of
//! two equal keys, so `{"n": 1, "n": 2}` would silently mean `n = 2`; in
//! parameters and inputs that hides a mistake (or a smuggled value), so
//! they are read with these functions (`#[serde(deserialize_with = …)]`)
//! and a duplicate is an error naming the key.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A JSON value in which no object, at any depth, repeats a key.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(v) = map.next_value_seed(UniqueSeed)?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key '{key}'")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

struct UniqueSeed;

impl<'de> DeserializeSeed<'de> for UniqueSeed {
    type Value = Unique;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Unique, D::Error> {
        Unique::deserialize(d)
    }
}

/// Any JSON value (a workflow definition given as an object).
pub fn value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Unique::deserialize(d).map(|u| u.0)
}

/// A JSON object of values (job and task parameters).
pub fn object<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Value>, D::Error> {
    match value(d)? {
        Value::Object(map) => Ok(map.into_iter().collect()),
        other => Err(de::Error::invalid_type(unexpected(&other), &"an object")),
    }
}

/// A JSON object of strings (workflow run inputs).
pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    object(d)?
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(de::Error::custom(format!(
                "'{k}': invalid type: {}, expected a string",
                unexpected(&other)
            ))),
        })
        .collect()
}

fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Req {
        #[serde(default, deserialize_with = "object")]
        params: BTreeMap<String, Value>,
        #[serde(default, deserialize_with = "strings")]
        inputs: BTreeMap<String, String>,
    }

    #[test]
    fn duplicates_are_refused_naming_the_key() {
        let cases = [
            (r#"{"params": {"a": 1, "b": 2}}"#, None),
            (r#"{"params": {"a": 1, "a": 2}}"#, Some("duplicate key 'a'")),
            (
                r#"{"params": {"a": {"x": 1, "x": 1}}}"#,
                Some("duplicate key 'x'"),
            ),
            (
                r#"{"params": {"a": [{"y": 1, "y": 2}]}}"#,
                Some("duplicate key 'y'"),
            ),
            (
                r#"{"inputs": {"i": "1", "i": "2"}}"#,
                Some("duplicate key 'i'"),
            ),
            (r#"{"inputs": {"i": 1}}"#, Some("'i': invalid type")),
            (r#"{"params": [1]}"#, Some("expected an object")),
        ];
        for (input, want) in cases {
            let got = serde_json::from_str::<Req>(input);
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "{input}: {e}"),
                (w, g) => panic!("{input}: wanted {w:?}, got {g:?}"),
            }
        }
        let ok: Req =
            serde_json::from_str(r#"{"params": {"n": 1}, "inputs": {"i": "v"}}"#).expect("valid");
        assert_eq!(ok.params["n"], Value::from(1));
        assert_eq!(ok.inputs["i"], "v");
    }
}
