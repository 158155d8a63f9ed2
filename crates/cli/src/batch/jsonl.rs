//! JSONL batch input: one `{"command", "parameters", "key"?, "id"?}` object per line; blank lines are
//! skipped. Each line is parsed once; a key given twice (in the item or in `parameters`, also as
//! `Identity`/`identity`) makes the line invalid instead of one value silently winning. Numbers keep
//! every digit (a 2^70 stays 1180591620717411303424).

use std::fmt;

use psbridge::Command;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::Value;

use crate::params::Checked;
use super::input::{Entry, Format, Identities, Item, RedactedParams, Redacted, bind, checked, holds_secret, kind, line_text};
use super::source::{Lines, SourceError};

const FIELDS: &str = "command, parameters, key, id";

/// Reads JSONL entries.
#[derive(Default)]
pub struct Jsonl {
    identities: Identities,
}

impl Format for Jsonl {
    fn next_entry(&mut self, lines: &mut Lines) -> Result<Option<Entry>, SourceError> {
        while let Some(line) = lines.next_line()? {
            let (number, text) = match line_text(line) {
                Ok(line) => line,
                Err(invalid) => return Ok(Some(invalid)),
            };
            if text.trim().is_empty() {
                continue;
            }
            return Ok(Some(self.entry(number, text)));
        }
        Ok(None)
    }
}

/// An item line as written: every field once, `parameters` in order with duplicates kept.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    #[serde(default)]
    command: Option<Value>,
    #[serde(default)]
    parameters: Option<Params>,
    #[serde(default)]
    key: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}

/// A `parameters` object, in order, duplicates kept (so that validation can report them).
struct Params(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Params, D::Error> {
        struct ParamsVisitor;
        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`parameters` as an object of name → value such as {\"Identity\": \"x\"}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut params = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    // Nested objects are checked as `--params` checks them; a name given twice at the top
                    // is kept, for validation to report.
                    let value = map.next_value_seed(Checked::under(&name))?;
                    params.push((name, value));
                }
                Ok(Params(params))
            }
        }
        d.deserialize_map(ParamsVisitor)
    }
}

impl Jsonl {
    fn entry(&mut self, line: usize, text: String) -> Entry {
        let raw: RawItem = match serde_json::from_str(&text) {
            Ok(raw) => raw,
            Err(error) => {
                let message = match serde_json::from_str::<Value>(&text) {
                    Err(syntax) => format!("not valid JSON ({syntax})"),
                    Ok(value) if !value.is_object() => format!("expected a JSON object with {FIELDS}, found {}", kind(&value)),
                    Ok(_) => error.to_string(),
                };
                // The line is not an item, but it may still hold a secret: show nothing of it then.
                let input = if text.contains("$psbridge") { super::input::REDACTED.to_owned() } else { text };
                return Entry::invalid(line, input, None, message);
            }
        };
        let params = raw.parameters.map(|p| p.0).unwrap_or_default();
        let secret = params.iter().any(|(_, v)| holds_secret(v));
        let redacted = || {
            serde_json::json!({
                "command": raw.command, "parameters": serde_json::to_value(RedactedParams(&params)).unwrap_or_default(),
                "key": raw.key, "id": raw.id.as_ref().map(Redacted),
            })
        };
        // The line as written, unless it holds a secret: then the same item, rewritten without it.
        let input = if secret { redacted().to_string() } else { text };
        let name = match &raw.command {
            Some(Value::String(c)) if !c.trim().is_empty() => c.trim().to_owned(),
            Some(Value::String(_)) => return Entry::invalid(line, input, None, "`command` is empty"),
            Some(other) => {
                return Entry::invalid(line, input, None, format!("`command` must be a string such as \"Set-Mailbox\", not {}", kind(other)));
            }
            None => return Entry::invalid(line, input, None, "`command` is missing"),
        };
        let key = match &raw.key {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => return Entry::invalid(line, input, Some(name), format!("`key` must be a string or a number, not {}", kind(other))),
        };
        let id = match raw.id {
            None => None,
            Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
            Some(other) => return Entry::invalid(line, input, Some(name), format!("`id` must be a string or a number, not {}", kind(&other))),
        };
        let identity = self.identities.next(&serde_json::json!({
            "command": name, "parameters": serde_json::to_value(RedactedParams(&params)).unwrap_or_default(), "key": key, "id": id,
        }));
        let parameters = params.iter().map(|(name, value)| (name.clone(), serde_json::to_value(Redacted(value)).unwrap_or_default())).collect();
        let mut command = Command::new(name.as_str());
        for (param, value) in params {
            command = bind(command, param, value);
        }
        if let Some(key) = &key {
            command = command.key(key.as_str());
        }
        checked(Item { line, input, name, command, key, id, identity, parameters })
    }
}

#[cfg(test)]
mod tests {
    use super::super::input::Invalid;
    use super::super::source::Source;
    use super::*;

    pub fn read(text: &str) -> Vec<Entry> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, text).unwrap();
        let mut source = Source::open(&path).unwrap();
        let mut lines = source.lines(1024 * 1024).unwrap();
        let mut jsonl = Jsonl::default();
        std::iter::from_fn(|| jsonl.next_entry(&mut lines).unwrap()).collect()
    }

    fn invalid(entries: &[Entry]) -> Vec<&Invalid> {
        entries.iter().filter_map(|e| if let Entry::Invalid(i) = e { Some(i) } else { None }).collect()
    }

    fn items(entries: &[Entry]) -> Vec<&Item> {
        entries.iter().filter_map(|e| if let Entry::Item(i) = e { Some(&**i) } else { None }).collect()
    }

    #[test]
    fn items_and_bad_lines_keep_their_line_numbers() {
        let text = concat!(
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \"a\"}, \"key\": \"a\", \"id\": 7}\n",
            "\n",
            "{not json\n",
            "{\"parameters\": {}}\n",
            "{\"command\": \"Set-Mailbox\", \"parameters\": [1]}\n",
            "{\"command\": \"Set-Mailbox\", \"parameter\": {}}\n",
            "[1, 2]\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \"a\"}, \"key\": \"a\", \"id\": 7}\n",
        );
        let entries = read(text);
        assert_eq!(entries.len(), 7);
        let bad = invalid(&entries);
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), [3, 4, 5, 6, 7]);
        assert!(bad[0].message.starts_with("line 3: not valid JSON"), "{}", bad[0].message);
        assert!(bad[1].message.contains("`command` is missing"));
        assert!(bad[2].message.contains("`parameters` as an object") && bad[2].message.contains("sequence"), "{}", bad[2].message);
        assert!(bad[3].message.contains("unknown field `parameter`"));
        assert!(bad[4].message.contains("expected a JSON object") && bad[4].message.contains("an array"));
        let items = items(&entries);
        assert_eq!((items[0].line, items[0].key.as_deref()), (1, Some("a")));
        assert_ne!(items[0].identity, items[1].identity, "the same line twice is two items");
        assert_eq!(items[0].identity.split('#').next(), items[1].identity.split('#').next());
    }

    #[test]
    fn duplicate_and_case_variant_parameters_and_deep_values_are_invalid() {
        let mut deep = String::from("1");
        for _ in 0..70 {
            deep = format!("[{deep}]");
        }
        let text = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n",
            r#"{"command": "Set-Mailbox", "parameters": {"X": 1, "X": 2}}"#,
            r#"{"command": "Set-Mailbox", "parameters": {"Office": 1, "office": 2}}"#,
            format_args!(r#"{{"command": "Set-Mailbox", "parameters": {{"V": {deep}}}}}"#),
            r#"{"command": "Set-Mailbox", "command": "Get-Mailbox"}"#,
            r#"{"command": "Set-Mailbox", "parameters": {"Identity": "ok"}}"#,
            r#"{"command": "Set-Mailbox", "parameters": {"EmailAddresses": {"Add": "a", "Add": "b"}}}"#,
        );
        let entries = read(&text);
        let bad = invalid(&entries);
        assert_eq!(bad.len(), 5, "{bad:?}");
        // As `run --params` refuses it: a key twice inside a value, not only at the top.
        assert!(bad[4].message.contains("parameter EmailAddresses: key \"Add\" appears twice"), "{}", bad[4].message);
        assert!(bad[0].message.starts_with("line 1: parameter X is given twice"), "{}", bad[0].message);
        assert!(bad[1].message.starts_with("line 2: parameter office is given twice (as Office and office"), "{}", bad[1].message);
        assert!(bad[2].message.contains("too deep") && bad[2].message.contains("at V"), "{}", bad[2].message);
        assert_eq!(bad[2].command.as_deref(), Some("Set-Mailbox"));
        assert!(bad[3].message.contains("duplicate field `command`"), "{}", bad[3].message);
        assert_eq!(items(&entries)[0].line, 5);
    }

    #[test]
    fn secrets_are_redacted_in_the_input_and_kept_out_of_the_identity() {
        let line = |password: &str| {
            format!(r#"{{"command": "New-Mailbox", "parameters": {{"Name": "Ann", "Password": {{"$psbridge": "securestring", "value": "{password}"}}}}}}"#)
        };
        let entries = read(&format!("{}\n{}\n{}\n", line("hunter2"), line("other-pw"), r#"{"command": "X", "parameters": {"A": {"$psbridge": "secret", "value": "hunter2"}}, "oops": 1}"#));
        let items = items(&entries);
        for item in &items {
            assert!(!item.input.contains("hunter2") && !item.input.contains("other-pw"), "{}", item.input);
            assert!(item.input.contains(r#""Password":{"$psbridge":"securestring","value":"********"}"#), "{}", item.input);
            assert!(!format!("{:?}", item.command).contains("hunter2"));
        }
        let (a, b) = (&items[0].identity, &items[1].identity);
        assert_ne!(a, b, "two items that differ only in the secret are still two items");
        assert_eq!(a.split('#').next(), b.split('#').next(), "the secret is not part of the hash");
        let bad = invalid(&entries);
        assert!(!bad[0].input.contains("hunter2"));
    }

    #[test]
    fn big_integers_keep_every_digit() {
        let entries = read("{\"command\": \"X\", \"parameters\": {\"N\": 1180591620717411303424, \"F\": 0.1000000000000000000001}}\n");
        let item = items(&entries)[0];
        assert!(item.input.contains("1180591620717411303424") && item.input.contains("0.1000000000000000000001"));
        assert!(format!("{:?}", item.command).contains("1180591620717411303424"));
    }
}
