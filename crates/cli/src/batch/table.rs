//! CSV batch input, as Excel and `Export-Csv` write it: one `--command` per row, the header naming the
//! parameters. Line endings `\n` or `\r\n`; cells quoted or not (`""` is a quote inside a quoted cell,
//! which may span lines); `--delimiter` for `;` or tab files; a `#TYPE` first line (Windows PowerShell's
//! Export-Csv) is skipped. Empty cells pass nothing.
//!
//! A header cell `Name:type` types its column: `string` (the default), `int` (a whole number), `bool`
//! (`true`/`false`, also `yes`/`no`, `1`/`0`, `$true`/`$false`), `switch` (the same values: `true`
//! passes `-Name`, `false` passes `-Name:$false`), `array` (split on `;`, each part trimmed) and
//! `securestring` (reaches the command as a SecureString and is shown as `********`).
//!
//! A row psbridge cannot use (a value that is not of its column's type, a quote never closed, a wrong
//! number of cells) is an invalid entry naming its line; the other rows still run.

use std::collections::VecDeque;

use psbridge::{Command, SecretString};
use serde_json::{Number, Value, json};

use super::input::{Entry, Format, Identities, Item, REDACTED, RedactedParams, checked};
use super::source::{Line, LineError, Lines, SourceError};

/// Separator of the parts of an `array` cell.
pub const ARRAY_SEPARATOR: char = ';';

/// A CSV input that cannot be read at all (as opposed to one bad row).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the CSV input has no header row; its first row must name the parameters, such as Identity,Department")]
    NoHeader,
    #[error("CSV column {column} has no name; every column of the header row must name a parameter")]
    UnnamedColumn { column: usize },
    #[error("CSV column `{name}` appears twice in the header row (parameter names ignore case)")]
    DuplicateColumn { name: String },
    #[error("CSV column `{name}` is not a valid parameter name (letters, digits and _ only, then an optional :type)")]
    BadColumn { name: String },
    #[error("CSV column `{column}`: unknown type `{kind}`; the types are string, int, bool, switch, array, securestring")]
    UnknownType { column: String, kind: String },
    #[error("--key-column {name}: no such column; columns: {columns}")]
    UnknownKeyColumn { name: String, columns: String },
    #[error("the CSV header (line {line}): {problem}")]
    BadHeader { line: usize, problem: String },
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// How a column's cells become values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Int,
    Bool,
    Switch,
    Array,
    SecureString,
}

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        Some(match name.to_ascii_lowercase().as_str() {
            "string" => Kind::String,
            "int" => Kind::Int,
            "bool" => Kind::Bool,
            "switch" => Kind::Switch,
            "array" => Kind::Array,
            "securestring" => Kind::SecureString,
            _ => return None,
        })
    }

    /// What a cell of this kind must look like, for messages.
    fn expected(self) -> &'static str {
        match self {
            Kind::Int => "an int (a whole number such as 10)",
            Kind::Bool | Kind::Switch => "a bool (true or false)",
            Kind::String | Kind::Array | Kind::SecureString => "text",
        }
    }
}

#[derive(Debug)]
struct Column {
    name: String,
    kind: Kind,
}

/// Options of CSV input.
pub struct TableOptions {
    /// The command every row runs.
    pub command: String,
    /// The column whose value is the item's key (it is still passed as a parameter).
    pub key_column: Option<String>,
    pub delimiter: char,
    /// The longest row, in bytes (a row may span lines when a quoted cell does).
    pub max_bytes: usize,
}

/// Reads CSV entries.
pub struct Table {
    options: TableOptions,
    columns: Vec<Column>,
    key_index: Option<usize>,
    identities: Identities,
    /// Lines read ahead for a quoted cell that was never closed, to be read again as rows of their own.
    again: VecDeque<Line>,
}

/// A row's cells, or why there are none.
enum Row {
    Cells { line: usize, text: String, cells: Vec<String> },
    Bad { line: usize, text: String, problem: String },
}

impl Table {
    /// Reads the header row.
    pub fn new(lines: &mut Lines, options: TableOptions) -> Result<Table, TableError> {
        let mut table = Table { options, columns: Vec::new(), key_index: None, identities: Identities::default(), again: VecDeque::new() };
        let header = loop {
            match table.row(lines)? {
                None => return Err(TableError::NoHeader),
                Some(Row::Bad { line, problem, .. }) => return Err(TableError::BadHeader { line, problem }),
                Some(Row::Cells { line: 1, text, .. }) if text.starts_with("#TYPE ") => {}
                Some(Row::Cells { cells, .. }) if cells.iter().all(|c| c.trim().is_empty()) && cells.len() == 1 => {}
                Some(Row::Cells { cells, .. }) => break cells,
            }
        };
        for (i, cell) in header.iter().enumerate() {
            let (name, kind) = match cell.split_once(':') {
                Some((name, kind)) => (name.trim(), Some(kind.trim())),
                None => (cell.trim(), None),
            };
            if name.is_empty() {
                return Err(TableError::UnnamedColumn { column: i + 1 });
            }
            if !psbridge::valid_parameter_name(name) {
                return Err(TableError::BadColumn { name: cell.trim().to_owned() });
            }
            let kind = match kind {
                None => Kind::String,
                Some(k) => Kind::parse(k).ok_or_else(|| TableError::UnknownType { column: name.to_owned(), kind: k.to_owned() })?,
            };
            if table.columns.iter().any(|c| c.name.eq_ignore_ascii_case(name)) {
                return Err(TableError::DuplicateColumn { name: name.to_owned() });
            }
            table.columns.push(Column { name: name.to_owned(), kind });
        }
        if let Some(key) = &table.options.key_column {
            let found = table.columns.iter().position(|c| c.name.eq_ignore_ascii_case(key.trim()));
            let columns = || table.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
            table.key_index = Some(found.ok_or_else(|| TableError::UnknownKeyColumn { name: key.clone(), columns: columns() })?);
        }
        Ok(table)
    }

    fn next_line(&mut self, lines: &mut Lines) -> Result<Option<Line>, SourceError> {
        match self.again.pop_front() {
            Some(line) => Ok(Some(line)),
            None => lines.next_line(),
        }
    }

    /// The next row: a line, and the lines after it while a quoted cell stays open.
    fn row(&mut self, lines: &mut Lines) -> Result<Option<Row>, SourceError> {
        let Some(first) = self.next_line(lines)? else { return Ok(None) };
        let line = first.number;
        let mut text = match first.text {
            Ok(text) => text,
            Err(error) => return Ok(Some(Row::Bad { line, text: String::new(), problem: error.to_string() })),
        };
        let mut more: Vec<Line> = Vec::new();
        loop {
            if let Some(cells) = split(&text, self.options.delimiter) {
                return Ok(Some(Row::Cells { line, text, cells }));
            }
            let next = self.next_line(lines)?;
            let fits = |t: &String| text.len() + 1 + t.len() <= self.options.max_bytes;
            match next {
                Some(Line { number, text: Ok(part) }) if fits(&part) => {
                    text.push('\n');
                    text.push_str(&part);
                    more.push(Line { number, text: Ok(part) });
                }
                next => {
                    // Never closed (or closed only beyond the size limit): this line is bad, and the
                    // lines after it are read again as rows of their own.
                    let long = matches!(&next, Some(Line { text: Ok(_), .. }) | Some(Line { text: Err(LineError::TooLong { .. }), .. }));
                    self.again.extend(more.into_iter().chain(next));
                    let first_line = text.split('\n').next().unwrap_or_default().to_owned();
                    let problem = if long {
                        format!(
                            "a quoted cell opened here is not closed within {} bytes; close the quote (a quote inside a quoted cell is written \"\"), or raise --max-line-bytes if the cell really is that long",
                            self.options.max_bytes
                        )
                    } else {
                        "a quoted cell opened here is never closed; close the quote (a quote inside a quoted cell is written \"\")".to_owned()
                    };
                    return Ok(Some(Row::Bad { line, text: first_line, problem }));
                }
            }
        }
    }

    fn entry(&mut self, line: usize, text: String, cells: Vec<String>) -> Entry {
        let secret = self.columns.iter().zip(&cells).any(|(c, cell)| c.kind == Kind::SecureString && !cell.is_empty());
        let input = if secret { self.redacted_row(&cells) } else { text };
        let name = self.options.command.clone();
        if cells.len() != self.columns.len() {
            let missing = self.columns.get(cells.len()..).map(|m| m.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "));
            let message = match missing.filter(|m| !m.is_empty()) {
                Some(missing) => format!("{} fields for {} columns; missing {missing}", cells.len(), self.columns.len()),
                None => format!(
                    "{} fields for {} columns; check for an unquoted `{}` in a cell",
                    cells.len(),
                    self.columns.len(),
                    self.options.delimiter
                ),
            };
            return Entry::invalid(line, input, Some(name), message);
        }
        let key = self.key_index.map(|i| cells[i].trim().to_owned());
        if key.as_deref() == Some("") {
            let column = &self.columns[self.key_index.unwrap_or_default()].name;
            return Entry::invalid(line, input, Some(name), format!("the key column {column} is empty"));
        }
        let mut command = Command::new(name.as_str());
        let mut shown: Vec<(String, Value)> = Vec::new();
        for (column, cell) in self.columns.iter().zip(cells) {
            if cell.is_empty() {
                continue;
            }
            if column.kind == Kind::SecureString {
                shown.push((column.name.clone(), json!({ "$psbridge": "securestring", "value": REDACTED })));
                command = command.secure_param(column.name.as_str(), SecretString::from(cell));
                continue;
            }
            match typed(column.kind, cell) {
                Ok(value) => {
                    shown.push((column.name.clone(), value.clone()));
                    command = command.param(column.name.as_str(), value);
                }
                Err(cell) => {
                    let message = format!("column {}: `{cell}` is not {}", column.name, column.kind.expected());
                    return Entry::invalid(line, input, Some(name), message);
                }
            }
        }
        let identity = self.identities.next(&json!({
            "command": name, "parameters": serde_json::to_value(RedactedParams(&shown)).unwrap_or_default(), "key": key,
        }));
        if let Some(key) = &key {
            command = command.key(key.as_str());
        }
        checked(Item { line, input, name, command, key, id: None, identity, parameters: shown })
    }

    /// The row written again with its secure cells replaced.
    fn redacted_row(&self, cells: &[String]) -> String {
        let delimiter = self.options.delimiter;
        let shown: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| match self.columns.get(i) {
                Some(c) if c.kind == Kind::SecureString && !cell.is_empty() => REDACTED.to_owned(),
                _ if cell.contains([delimiter, '"', '\n', '\r']) => format!("\"{}\"", cell.replace('"', "\"\"")),
                _ => cell.clone(),
            })
            .collect();
        shown.join(&delimiter.to_string())
    }
}

impl Format for Table {
    fn next_entry(&mut self, lines: &mut Lines) -> Result<Option<Entry>, SourceError> {
        loop {
            match self.row(lines)? {
                None => return Ok(None),
                Some(Row::Bad { line, text, problem }) => {
                    // A bad row may hold a secure cell: show none of it when the file has such columns.
                    let text = if self.columns.iter().any(|c| c.kind == Kind::SecureString) { String::new() } else { text };
                    return Ok(Some(Entry::invalid(line, text, Some(self.options.command.clone()), problem)));
                }
                Some(Row::Cells { cells, .. }) if cells.iter().all(|c| c.trim().is_empty()) => {}
                Some(Row::Cells { line, text, cells }) => return Ok(Some(self.entry(line, text, cells))),
            }
        }
    }
}

/// A cell as a value of its column's kind; the trimmed cell when it is not one.
fn typed(kind: Kind, cell: String) -> Result<Value, String> {
    let trimmed = cell.trim();
    let truth = || match trimmed.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "$true" => Ok(Value::Bool(true)),
        "false" | "no" | "0" | "$false" => Ok(Value::Bool(false)),
        _ => Err(trimmed.to_owned()),
    };
    match kind {
        Kind::String | Kind::SecureString => Ok(Value::String(cell)),
        Kind::Bool | Kind::Switch => truth(),
        Kind::Int => {
            let digits = trimmed.strip_prefix(['-', '+']).unwrap_or(trimmed);
            let number = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| trimmed.trim_start_matches('+').parse::<Number>().ok())
                .flatten();
            number.map(Value::Number).ok_or_else(|| trimmed.to_owned())
        }
        Kind::Array => Ok(Value::Array(cell.split(ARRAY_SEPARATOR).map(|p| Value::String(p.trim().to_owned())).collect())),
    }
}

/// The cells of one row; `None` while a quoted cell is still open at the end of `text`.
fn split(text: &str, delimiter: char) -> Option<Vec<String>> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut at_start = true;
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cell.push('"');
                } else {
                    quoted = false;
                }
            } else {
                cell.push(c);
            }
        } else if c == delimiter {
            cells.push(std::mem::take(&mut cell));
            at_start = true;
            continue;
        } else if c == '"' && at_start {
            quoted = true;
        } else {
            cell.push(c);
        }
        at_start = false;
    }
    if quoted {
        return None;
    }
    cells.push(cell);
    Some(cells)
}

#[cfg(test)]
mod tests {
    use super::super::input::Invalid;
    use super::super::source::Source;
    use super::*;

    fn read_with(bytes: &[u8], delimiter: char, key: Option<&str>) -> Result<Vec<Entry>, TableError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        std::fs::write(&path, bytes).unwrap();
        let mut source = Source::open(&path).unwrap();
        let mut lines = source.lines(200).unwrap();
        let options = TableOptions { command: "Set-Mailbox".into(), key_column: key.map(str::to_owned), delimiter, max_bytes: 200 };
        let mut table = Table::new(&mut lines, options)?;
        Ok(std::iter::from_fn(|| table.next_entry(&mut lines).unwrap()).collect())
    }

    fn read(text: &str) -> Vec<Entry> {
        read_with(text.as_bytes(), ',', None).unwrap()
    }

    fn invalid(entries: &[Entry]) -> Vec<&Invalid> {
        entries.iter().filter_map(|e| if let Entry::Invalid(i) = e { Some(i) } else { None }).collect()
    }

    fn items(entries: &[Entry]) -> Vec<&Item> {
        entries.iter().filter_map(|e| if let Entry::Item(i) = e { Some(&**i) } else { None }).collect()
    }

    /// The parameters as the library would send them (Debug shows names and values, secrets masked).
    fn sent(item: &Item) -> String {
        format!("{:?}", item.command)
    }

    #[test]
    fn rows_become_items_and_short_rows_are_reported() {
        let text = "Identity,Department\nu1,Sales\nu2\n\"u3\",\"R&D, Labs\"\nu4,\n";
        let entries = read_with(text.as_bytes(), ',', Some("identity")).unwrap();
        let bad = invalid(&entries);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].line == 3 && bad[0].message.contains("missing Department"), "{bad:?}");
        let items = items(&entries);
        assert_eq!(items.len(), 3);
        assert!(sent(items[1]).contains("R&D, Labs"));
        assert_eq!(items[1].input, "\"u3\",\"R&D, Labs\"");
        assert_eq!(items[1].line, 4);
        assert_eq!(items[2].key.as_deref(), Some("u4"));
        assert!(!sent(items[2]).contains("Department"), "an empty cell passes nothing");
        assert!(matches!(read_with(text.as_bytes(), ',', Some("Office")), Err(TableError::UnknownKeyColumn { .. })));
        assert!(matches!(read_with(b"Identity,,X\n", ',', None), Err(TableError::UnnamedColumn { column: 2 })));
        assert!(matches!(read_with(b"Identity,identity\n", ',', None), Err(TableError::DuplicateColumn { .. })));
        assert!(matches!(read_with(b"Identity:date\n", ',', None), Err(TableError::UnknownType { .. })));
    }

    #[test]
    fn crlf_bom_and_utf16_files_keep_their_line_numbers() {
        let text = "Identity,Office\r\nu1,A\r\n\"u2\",\"B\r\nC\"\r\nu3,D\r\n";
        let mut bom = vec![0xEF, 0xBB, 0xBF];
        bom.extend(text.as_bytes());
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        for bytes in [text.as_bytes().to_vec(), bom, utf16] {
            let entries = read_with(&bytes, ',', None).unwrap();
            let items = items(&entries);
            assert_eq!(items.iter().map(|i| i.line).collect::<Vec<_>>(), [2, 3, 5]);
            assert_eq!(items[0].input, "u1,A", "no line ending in the input");
            assert!(sent(items[1]).contains("B\\nC"), "{}", sent(items[1]));
        }
    }

    #[test]
    fn an_unclosed_quote_is_one_bad_row_and_bad_bytes_are_reported() {
        let entries = read("Identity,Office\nu1,\"A\nu2,B\nu3,C\n");
        let bad = invalid(&entries);
        assert_eq!((bad.len(), bad[0].line), (1, 2), "{bad:?}");
        assert!(bad[0].message.contains("never closed"), "{}", bad[0].message);
        assert_eq!(items(&entries).iter().map(|i| i.line).collect::<Vec<_>>(), [3, 4]);
        let entries = read_with(b"Identity,Office\nu1,\xffA\nu2,B\n", ',', None).unwrap();
        let bad = invalid(&entries);
        assert!(bad[0].line == 2 && bad[0].message.contains("invalid text"), "{bad:?}");
        assert_eq!(items(&entries)[0].line, 3);
        let long = format!("Identity,Office\nu1,\"{}\nu2,B\n", "x\n".repeat(150));
        let entries = read(&long);
        assert!(invalid(&entries)[0].message.contains("--max-line-bytes"));
        assert!(items(&entries).iter().any(|i| i.line == 153));
    }

    #[test]
    fn delimiters_and_windows_powershell_type_lines() {
        let entries = read_with(b"#TYPE System.Management.Automation.PSCustomObject\n\"Identity\";\"Office\"\n\"u1\";\"A, B\"\n", ';', None).unwrap();
        let first = items(&entries);
        assert_eq!(first[0].line, 3);
        assert!(sent(first[0]).contains("A, B"));
        let entries = read_with(b"Identity\tOffice\nu1\tA,B\n", '\t', None).unwrap();
        assert!(sent(items(&entries)[0]).contains("A,B"));
    }

    #[test]
    fn typed_columns_convert_and_bad_values_name_line_column_and_type() {
        let text = "Name,HiddenFromAddressListsEnabled:bool,ResultSize:int,Force:switch,EmailAddresses:array,Password:securestring\n\
                    Ann,True,10,true,a@x; b@x,hunter2\n\
                    Bob,no,abc,,,\n\
                    Cy,maybe,1,,,\n\
                    Di,,99999999999999999999999,false,,\n";
        let entries = read(text);
        let bad = invalid(&entries);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].message, "line 3: column ResultSize: `abc` is not an int (a whole number such as 10)");
        assert!(bad[1].message.starts_with("line 4: column HiddenFromAddressListsEnabled: `maybe` is not a bool"), "{}", bad[1].message);
        let items = items(&entries);
        let ann = sent(items[0]);
        assert!(ann.contains("Bool(true)") && ann.contains("Number(10)") && ann.contains("Array [String(\"a@x\"), String(\"b@x\")]"), "{ann}");
        assert!(!ann.contains("hunter2"), "{ann}");
        assert_eq!(items[0].input, "Ann,True,10,true,a@x; b@x,********");
        assert!(sent(items[1]).contains("Number(99999999999999999999999)") && sent(items[1]).contains("Bool(false)"));
        assert_eq!(items[1].input, "Di,,99999999999999999999999,false,,", "no secret, the row as written");
    }
}
