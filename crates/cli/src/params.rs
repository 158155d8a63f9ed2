//! `--params`: one JSON object of parameters, given on the command line, in a file (`@FILE`) or on
//! standard input (`-`).
//!
//! The text is parsed once, from a buffer read whole (a 50 MB value costs the buffer plus the value, not
//! a chain of copies), and checked as it is parsed: a key given twice in one object is refused instead
//! of silently keeping the last, as plain serde_json would.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::exit::CliError;

/// Where the parameters come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamsSource {
    /// The JSON text itself.
    Inline(String),
    /// `@FILE`: the file's content.
    File(PathBuf),
    /// `-`: standard input.
    Stdin,
}

impl ParamsSource {
    /// What `--params ARG` means: `-` is standard input, `@FILE` a file, anything else JSON text.
    pub fn from_arg(arg: &str) -> ParamsSource {
        match arg {
            "-" => ParamsSource::Stdin,
            _ => match arg.strip_prefix('@') {
                Some(path) => ParamsSource::File(PathBuf::from(path)),
                None => ParamsSource::Inline(arg.to_owned()),
            },
        }
    }

    /// Whether reading the parameters takes standard input (then no secret may come from it).
    pub fn uses_stdin(&self) -> bool {
        *self == ParamsSource::Stdin
    }

    /// Reads and parses the parameters.
    ///
    /// # Errors
    /// A usage error saying what is wrong and where: unreadable, not JSON, not an object, a key twice,
    /// nested deeper than serde_json reads.
    pub fn read(&self) -> Result<Map<String, Value>, CliError> {
        let what = self.to_string();
        let bytes = match self {
            ParamsSource::Inline(text) => return parse(text.as_bytes(), &what),
            ParamsSource::File(path) => std::fs::read(path).map_err(|e| CliError::usage(format_args!("{what}: cannot read {}: {e}", path.display())))?,
            ParamsSource::Stdin => {
                let mut bytes = Vec::new();
                std::io::stdin().lock().read_to_end(&mut bytes).map_err(|e| CliError::usage(format_args!("{what}: cannot read standard input: {e}")))?;
                bytes
            }
        };
        parse(&bytes, &what)
    }
}

impl fmt::Display for ParamsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamsSource::Inline(_) => f.write_str("--params"),
            ParamsSource::File(path) => write!(f, "--params @{}", path.display()),
            ParamsSource::Stdin => f.write_str("--params - (standard input)"),
        }
    }
}

/// Parses one JSON object, refusing repeated keys at any level.
fn parse(bytes: &[u8], what: &str) -> Result<Map<String, Value>, CliError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = Checked { parameter: None }.deserialize(&mut deserializer).and_then(|value| deserializer.end().map(|()| value));
    match value {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(CliError::usage(format_args!(
            "{what} must be a JSON object such as {{\"Identity\": \"ContosoUser1\"}}, not {}",
            kind(&other)
        ))),
        // serde_json stops at 128 levels; Command::validate refuses more than 64 with a path.
        Err(error) if error.to_string().starts_with("recursion limit exceeded") => Err(CliError::usage(format_args!(
            "{what}: a value is too deep: nested more than {} levels (at line {} column {})",
            psbridge::MAX_VALUE_DEPTH,
            error.line(),
            error.column()
        ))),
        // A key given twice (found by `Checked`): valid JSON, refused all the same.
        Err(error) if error.is_data() => Err(CliError::usage(format_args!("{what}: {error}"))),
        Err(error) => Err(CliError::usage(format_args!("{what} is not valid JSON: {error}"))),
    }
}

/// A JSON value's kind, for messages (never the value itself: it may be huge, or private).
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json (with its `arbitrary_precision` feature) hands a number to a visitor as a one-entry map
/// with this key and the number's text as the value.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Deserializes a [`Value`] as serde_json does, but refuses an object that has a key twice. `parameter`
/// is the top-level key the value sits under, for messages.
#[derive(Clone, Copy)]
pub struct Checked<'a> {
    parameter: Option<&'a str>,
}

impl<'a> Checked<'a> {
    /// For the value of parameter `name`: a key twice in any object inside it is refused, naming `name`
    /// (batch's JSONL items use it, so that run and batch refuse the same values).
    pub fn under(name: &'a str) -> Checked<'a> {
        Checked { parameter: Some(name) }
    }
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("a number that is not finite"))
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

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if key == NUMBER_TOKEN && map.is_empty() {
                let text: String = access.next_value()?;
                return text.parse::<Number>().map(Value::Number).map_err(de::Error::custom);
            }
            let child = Checked { parameter: Some(self.parameter.unwrap_or(&key)) };
            let value = access.next_value_seed(child)?;
            if map.contains_key(&key) {
                return Err(de::Error::custom(match self.parameter {
                    None => format!("parameter {key} is given twice"),
                    Some(parameter) => format!("parameter {parameter}: key {key:?} appears twice in one object"),
                }));
            }
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Map<String, Value>, String> {
        ParamsSource::from_arg(text).read().map_err(|e| e.to_string())
    }

    #[test]
    fn an_object_parses_as_serde_json_would() {
        let text = r#"{"Identity": "x", "N": 12345678901234567890123, "F": 1.50, "L": [1, {"a": null}], "T": true}"#;
        let map = parsed(text).unwrap();
        assert_eq!(Value::Object(map), serde_json::from_str::<Value>(text).unwrap());
        // arbitrary_precision keeps the digits as written
        assert_eq!(parsed(r#"{"F": 1.50}"#).unwrap()["F"].to_string(), "1.50");
    }

    #[test]
    fn a_key_given_twice_is_refused_at_any_level() {
        let error = parsed(r#"{"X": 1, "X": 2}"#).unwrap_err();
        assert!(error.contains("parameter X is given twice") && error.contains("column"), "{error}");
        assert!(!error.contains("not valid JSON"), "{error}");
        let error = parsed(r#"{"V": {"a": 1, "b": [{"c": 1, "c": 2}]}}"#).unwrap_err();
        assert!(error.contains("parameter V: key \"c\" appears twice"), "{error}");
    }

    #[test]
    fn too_deep_and_not_an_object_say_so() {
        let deep = format!("{{\"V\": {}1{}}}", "[".repeat(200), "]".repeat(200));
        let error = parsed(&deep).unwrap_err();
        assert!(error.contains("too deep") && error.contains("line 1 column"), "{error}");
        let error = parsed("[1, 2]").unwrap_err();
        assert!(error.contains("must be a JSON object") && error.contains("an array"), "{error}");
        let error = parsed(r#"{"Identity": }"#).unwrap_err();
        assert!(error.contains("--params is not valid JSON") && error.contains("column 14"), "{error}");
        let error = parsed(r#"{} {}"#).unwrap_err();
        assert!(error.contains("trailing characters"), "{error}");
    }

    #[test]
    fn arguments_name_their_source() {
        assert_eq!(ParamsSource::from_arg("-"), ParamsSource::Stdin);
        assert_eq!(ParamsSource::from_arg("@p.json"), ParamsSource::File("p.json".into()));
        assert!(ParamsSource::from_arg("-").uses_stdin() && !ParamsSource::from_arg("{}").uses_stdin());
        let error = parsed("@/nonexistent/p.json").unwrap_err();
        assert!(error.contains("--params @/nonexistent/p.json: cannot read"), "{error}");
    }
}
