//! Batch input: JSONL (one `{"command", "parameters", "key"?, "id"?}` per line) or CSV (one row per item,
//! the columns as parameters of one `--command`). A bad line becomes an [`Invalid`] entry with its line
//! number; it never stops the other items.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// One item to run.
#[derive(Debug, Clone)]
pub struct Item {
    /// Line of the input where it starts (1-based).
    pub line: usize,
    /// The text of that line (for CSV, the row as written).
    pub raw: String,
    pub command: String,
    pub parameters: Map<String, Value>,
    /// Items with the same key never run at once and keep their input order.
    pub key: Option<String>,
    /// The caller's name for the item, copied into its result.
    pub id: Option<Value>,
    /// What the journal knows the item by: a hash of what it runs, and which occurrence of it this is, so
    /// that lines may move or be fixed between runs without a finished item running again.
    pub identity: String,
}

/// A line that cannot become an item.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub line: usize,
    pub raw: String,
    pub message: String,
}

/// One entry of the input, in input order.
#[derive(Debug, Clone)]
pub enum Entry {
    Item(Item),
    Invalid(Invalid),
}

/// An input that cannot be read at all (as opposed to one bad line).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("the CSV input has no header row; its first row must name the parameters, such as Identity,Department")]
    NoHeader,
    #[error("CSV column {column} has no name; every column of the header row must name a parameter")]
    UnnamedColumn { column: usize },
    #[error("CSV column `{name}` appears twice in the header row")]
    DuplicateColumn { name: String },
    #[error("CSV column `{name}` is not a valid parameter name (letters, digits and _ only)")]
    BadColumn { name: String },
    #[error("--key-column {name}: no such column; columns: {columns}")]
    UnknownKeyColumn { name: String, columns: String },
    #[error("cannot read the CSV header: {0}")]
    Header(#[source] csv::Error),
}

const FIELDS: &str = "command, parameters, key, id";

/// Reads JSONL input. Blank lines are skipped.
pub fn read_jsonl(text: &str) -> Vec<Entry> {
    let mut identities = Identities::default();
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let entry = match jsonl_item(raw) {
            Ok((command, parameters, key, id)) => {
                let identity = identities.next(&command, &parameters, key.as_deref(), id.as_ref());
                Entry::Item(Item { line, raw: raw.to_owned(), command, parameters, key, id, identity })
            }
            Err(message) => Entry::Invalid(Invalid { line, raw: raw.to_owned(), message: format!("line {line}: {message}") }),
        };
        entries.push(entry);
    }
    entries
}

type Parts = (String, Map<String, Value>, Option<String>, Option<Value>);

fn jsonl_item(raw: &str) -> Result<Parts, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(mut object) = value else {
        return Err(format!("expected a JSON object with {FIELDS}, found {}", kind(&value)));
    };
    if let Some(unknown) = object.keys().find(|k| !["command", "parameters", "key", "id"].contains(&k.as_str())) {
        return Err(format!("unknown field `{unknown}`; an item has {FIELDS}"));
    }
    let command = match object.remove("command") {
        Some(Value::String(c)) => valid_command(c)?,
        Some(other) => return Err(format!("`command` must be a string such as \"Set-Mailbox\", not {}", kind(&other))),
        None => return Err("`command` is missing".to_owned()),
    };
    let parameters = match object.remove("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(format!("`parameters` must be an object of name → value such as {{\"Identity\": \"x\"}}, not {}", kind(&other)));
        }
    };
    if let Some(name) = parameters.keys().find(|n| !valid_name(n)) {
        return Err(format!("parameter name `{name}` is not valid (letters, digits and _ only)"));
    }
    let key = match object.remove("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => return Err(format!("`key` must be a string or a number, not {}", kind(&other))),
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
        Some(other) => return Err(format!("`id` must be a string or a number, not {}", kind(&other))),
    };
    Ok((command, parameters, key, id))
}

/// Reads CSV input: the header row names the parameters; each row runs `command` once. Empty cells are
/// left out (the parameter is not passed); values are strings, which PowerShell converts to the
/// parameter's type.
pub fn read_csv(text: &str, command: &str, key_column: Option<&str>) -> Result<Vec<Entry>, InputError> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().map_err(InputError::Header)?.iter().map(|h| h.trim().to_owned()).collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(InputError::NoHeader);
    }
    for (i, name) in header.iter().enumerate() {
        if name.is_empty() {
            return Err(InputError::UnnamedColumn { column: i + 1 });
        }
        if !valid_name(name) {
            return Err(InputError::BadColumn { name: name.clone() });
        }
        if header[..i].iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(InputError::DuplicateColumn { name: name.clone() });
        }
    }
    let key_index = match key_column {
        None => None,
        Some(name) => Some(
            header
                .iter()
                .position(|h| h.eq_ignore_ascii_case(name))
                .ok_or_else(|| InputError::UnknownKeyColumn { name: name.to_owned(), columns: header.join(", ") })?,
        ),
    };
    let mut identities = Identities::default();
    let mut entries = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let start = reader.position().clone();
        let read = reader.read_record(&mut record);
        let end = reader.position().byte() as usize;
        let line = start.line() as usize;
        let raw = text.get(start.byte() as usize..end).unwrap_or_default().trim_end_matches(['\r', '\n']).to_owned();
        match read {
            Ok(false) => break,
            Err(error) => {
                let line = error.position().map_or(line, |p| p.line() as usize);
                entries.push(Entry::Invalid(Invalid { line, raw, message: format!("line {line}: not valid CSV ({error})") }));
            }
            Ok(true) if record.iter().all(|cell| cell.trim().is_empty()) => {}
            Ok(true) if record.len() != header.len() => {
                let missing = header.get(record.len()..).map(|m| m.join(", ")).filter(|m| !m.is_empty());
                let message = match missing {
                    Some(missing) => format!("line {line}: {} fields for {} columns; missing {missing}", record.len(), header.len()),
                    None => format!("line {line}: {} fields for {} columns; check for an unquoted comma", record.len(), header.len()),
                };
                entries.push(Entry::Invalid(Invalid { line, raw, message }));
            }
            Ok(true) => {
                let key = key_index.map(|i| record[i].trim().to_owned());
                if key.as_deref() == Some("") {
                    let message = format!("line {line}: the key column {} is empty", header[key_index.unwrap_or_default()]);
                    entries.push(Entry::Invalid(Invalid { line, raw, message }));
                    continue;
                }
                let parameters: Map<String, Value> = header
                    .iter()
                    .zip(record.iter())
                    .filter(|(_, cell)| !cell.is_empty())
                    .map(|(name, cell)| (name.clone(), Value::String(cell.to_owned())))
                    .collect();
                let identity = identities.next(command, &parameters, key.as_deref(), None);
                entries.push(Entry::Item(Item { line, raw, command: command.to_owned(), parameters, key, id: None, identity }));
            }
        }
    }
    Ok(entries)
}

fn valid_command(command: String) -> Result<String, String> {
    let trimmed = command.trim();
    if trimmed.is_empty() {
        return Err("`command` is empty".to_owned());
    }
    if trimmed.chars().any(char::is_control) {
        return Err("`command` holds a control character; give one command name".to_owned());
    }
    Ok(trimmed.to_owned())
}

/// A PowerShell parameter name: letters, digits and `_`, not starting with a digit.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_')
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Hands out identities: the same content seen again is the next occurrence of it.
#[derive(Default)]
struct Identities {
    seen: HashMap<String, usize>,
}

impl Identities {
    fn next(&mut self, command: &str, parameters: &Map<String, Value>, key: Option<&str>, id: Option<&Value>) -> String {
        let content = json!({ "command": command, "parameters": parameters, "key": key, "id": id }).to_string();
        let digest = Sha256::digest(content.as_bytes());
        let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let occurrence = self.seen.entry(hash.clone()).or_default();
        *occurrence += 1;
        format!("{hash}#{occurrence}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(entries: &[Entry]) -> Vec<(usize, &str)> {
        entries
            .iter()
            .filter_map(|e| match e {
                Entry::Invalid(i) => Some((i.line, i.message.as_str())),
                Entry::Item(_) => None,
            })
            .collect()
    }

    #[test]
    fn jsonl_items_and_bad_lines_keep_their_line_numbers() {
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
        let entries = read_jsonl(text);
        assert_eq!(entries.len(), 7);
        let bad = invalid(&entries);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [3, 4, 5, 6, 7]);
        assert!(bad[0].1.starts_with("line 3: not valid JSON"), "{}", bad[0].1);
        assert!(bad[1].1.contains("`command` is missing"));
        assert!(bad[2].1.contains("`parameters` must be an object") && bad[2].1.contains("an array"));
        assert!(bad[3].1.contains("unknown field `parameter`"));
        let (Entry::Item(first), Entry::Item(again)) = (&entries[0], &entries[6]) else { panic!("items") };
        assert_eq!((first.line, first.key.as_deref()), (1, Some("a")));
        assert_ne!(first.identity, again.identity, "the same line twice is two items");
        assert_eq!(first.identity.split('#').next(), again.identity.split('#').next());
    }

    #[test]
    fn csv_rows_become_items_and_short_rows_are_reported() {
        let text = "Identity,Department\nu1,Sales\nu2\n\"u3\",\"R&D, Labs\"\nu4,\n";
        let entries = read_csv(text, "Set-Mailbox", Some("identity")).unwrap();
        let bad = invalid(&entries);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].0 == 3 && bad[0].1.contains("missing Department"), "{bad:?}");
        let items: Vec<&Item> = entries.iter().filter_map(|e| if let Entry::Item(i) = e { Some(i) } else { None }).collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[1].parameters["Department"], "R&D, Labs");
        assert_eq!(items[1].raw, "\"u3\",\"R&D, Labs\"");
        assert_eq!(items[1].line, 4);
        assert_eq!(items[2].key.as_deref(), Some("u4"));
        assert!(!items[2].parameters.contains_key("Department"), "an empty cell passes nothing");
        assert!(matches!(read_csv(text, "Set-Mailbox", Some("Office")), Err(InputError::UnknownKeyColumn { .. })));
        assert!(matches!(read_csv("Identity,,X\n", "Set-Mailbox", None), Err(InputError::UnnamedColumn { column: 2 })));
    }
}
