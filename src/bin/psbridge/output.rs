//! Printing results: output objects on stdout in the chosen format, everything else readable on stderr.

use std::io::{self, Write};

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use psbridge::{Completion, ErrorRecord, InformationRecord, ProgressRecord, PsObject, StreamItem};
use serde_json::{Value, json};

use crate::run::Format;

/// Most columns a table shows; the rest are named on stderr.
const TABLE_COLUMNS: usize = 8;

/// The properties `--select` keeps, in the order asked.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    properties: Vec<String>,
}

impl Selection {
    pub fn new(properties: &[String]) -> Self {
        Selection { properties: properties.iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect() }
    }

    /// The object with only the selected properties (matched case-insensitively, the object's spelling
    /// kept; missing ones null). Values that are not objects pass unchanged.
    pub fn apply(&self, value: Value) -> Value {
        let Value::Object(mut map) = value else { return value };
        if self.properties.is_empty() {
            return Value::Object(map);
        }
        let mut kept = serde_json::Map::new();
        for wanted in &self.properties {
            let found = map.keys().find(|k| k.eq_ignore_ascii_case(wanted)).cloned();
            match found {
                Some(key) => {
                    let value = map.remove(&key).unwrap_or(Value::Null);
                    kept.insert(key, value);
                }
                None => {
                    kept.insert(wanted.clone(), Value::Null);
                }
            }
        }
        Value::Object(kept)
    }
}

/// Writes output objects as they arrive (json, jsonl and csv stream; a table needs them all first).
pub struct OutputWriter<W: Write> {
    out: W,
    format: Format,
    selection: Selection,
    written: usize,
    table_rows: Vec<Value>,
    csv_columns: Vec<String>,
    csv_dropped: Vec<String>,
}

impl<W: Write> OutputWriter<W> {
    pub fn new(out: W, format: Format, selection: Selection) -> Self {
        OutputWriter { out, format, selection, written: 0, table_rows: Vec::new(), csv_columns: Vec::new(), csv_dropped: Vec::new() }
    }

    pub fn write(&mut self, object: PsObject) -> io::Result<()> {
        let object = PsObject { value: self.selection.apply(object.value), ..object };
        match self.format {
            Format::Json => {
                let separator = if self.written == 0 { "[\n" } else { ",\n" };
                let pretty = serde_json::to_string_pretty(&object.value).map_err(io::Error::other)?;
                write!(self.out, "{separator}  {}", pretty.replace('\n', "\n  "))?;
            }
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, &object.value).map_err(io::Error::other)?;
                self.out.write_all(b"\n")?;
            }
            Format::Table => self.table_rows.push(object.value),
            Format::Csv => self.write_csv(&object.value)?,
        }
        self.written += 1;
        Ok(())
    }

    /// One CSV row; the header comes from the first object, as with Export-Csv.
    fn write_csv(&mut self, value: &Value) -> io::Result<()> {
        let mut csv = csv::WriterBuilder::new().has_headers(false).from_writer(&mut self.out);
        if self.written == 0 {
            self.csv_columns = match value {
                Value::Object(map) => map.keys().cloned().collect(),
                _ => vec!["Value".to_owned()],
            };
            csv.write_record(&self.csv_columns)?;
        }
        let row: Vec<String> = match value {
            Value::Object(map) => {
                for key in map.keys() {
                    if !self.csv_columns.contains(key) && !self.csv_dropped.contains(key) {
                        self.csv_dropped.push(key.clone());
                    }
                }
                self.csv_columns.iter().map(|c| csv_cell(map.get(c).unwrap_or(&Value::Null))).collect()
            }
            other => vec![csv_cell(other)],
        };
        csv.write_record(&row)?;
        csv.flush()
    }

    /// Closes the JSON array or prints the table.
    pub fn finish(&mut self) -> io::Result<()> {
        match self.format {
            Format::Json if self.written == 0 => writeln!(self.out, "[]"),
            Format::Json => writeln!(self.out, "\n]"),
            Format::Jsonl => Ok(()),
            Format::Table => print_table(&mut self.out, &std::mem::take(&mut self.table_rows)),
            Format::Csv => {
                if !self.csv_dropped.is_empty() {
                    eprintln!(
                        "(properties absent from the first object are not in the CSV: {}; use --select to choose the columns)",
                        self.csv_dropped.join(", ")
                    );
                }
                Ok(())
            }
        }
    }
}

fn print_table(out: &mut impl Write, rows: &[Value]) -> io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    // Columns come from the first object, as PowerShell's Format-Table does.
    let columns: Vec<String> = match &rows[0] {
        Value::Object(map) => map.keys().cloned().collect(),
        _ => vec!["Value".to_owned()],
    };
    let shown = &columns[..columns.len().min(TABLE_COLUMNS)];
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic).set_header(shown);
    for row in rows {
        let cells = shown.iter().map(|column| match row {
            Value::Object(map) => cell(map.get(column).unwrap_or(&Value::Null)),
            other => cell(other),
        });
        table.add_row(cells.collect::<Vec<_>>());
    }
    writeln!(out, "{table}")?;
    if columns.len() > shown.len() {
        eprintln!(
            "({} more properties not shown: {}; use --format json to see them)",
            columns.len() - shown.len(),
            columns[shown.len()..].join(", ")
        );
    }
    Ok(())
}

/// A table cell, as PowerShell shows one: arrays in braces.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("{{{}}}", items.iter().map(cell).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// A CSV cell: strings as they are, null empty, arrays and objects as JSON (so nothing is lost).
fn csv_cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Collects every stream for `--envelope`.
pub struct Envelope {
    result: psbridge::InvocationResult,
    selection: Selection,
}

impl Envelope {
    pub fn new(selection: Selection) -> Self {
        Envelope { result: psbridge::InvocationResult::default(), selection }
    }

    pub fn push(&mut self, item: StreamItem) {
        self.result.push(item);
    }

    pub fn print(&mut self, completion: Completion) -> io::Result<()> {
        let r = &mut self.result;
        r.complete(completion);
        let envelope = json!({
            "output": r.output.iter().map(|o| self.selection.apply(o.value.clone())).collect::<Vec<_>>(),
            "errors": r.errors,
            "warnings": r.warnings,
            "verbose": r.verbose,
            "debug": r.debug,
            "information": r.information,
            "progress": r.progress,
            "had_errors": r.had_errors,
            "state": r.state,
            "duration_ms": r.duration.as_secs_f64() * 1000.0,
        });
        let mut out = io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &envelope).map_err(io::Error::other)?;
        writeln!(out)
    }
}

/// Prints a non-output stream item on stderr the way PowerShell's console shows it.
pub fn print_stream_item(item: &StreamItem) {
    match item {
        StreamItem::Output(_) => {}
        StreamItem::Error(record) => print_error_record(record),
        StreamItem::Warning(text) => eprintln!("WARNING: {text}"),
        StreamItem::Verbose(text) => eprintln!("VERBOSE: {text}"),
        StreamItem::Debug(text) => eprintln!("DEBUG: {text}"),
        StreamItem::Information(InformationRecord { message, .. }) => eprintln!("{}", message.as_deref().unwrap_or("")),
        StreamItem::Progress(ProgressRecord { activity, status_description, percent_complete, .. }) => {
            let percent = if *percent_complete >= 0 { format!(" ({percent_complete}%)") } else { String::new() };
            eprintln!(
                "PROGRESS: {}: {}{percent}",
                activity.as_deref().unwrap_or(""),
                status_description.as_deref().unwrap_or("")
            );
        }
    }
}

fn print_error_record(record: &ErrorRecord) {
    match &record.command {
        Some(command) => eprintln!("{command}: {}", record.message),
        None => eprintln!("{}", record.message),
    }
    if let Some(info) = &record.category_info {
        eprintln!("    CategoryInfo          : {info}");
    }
    if let Some(id) = &record.fully_qualified_error_id {
        eprintln!("    FullyQualifiedErrorId : {id}");
    }
}

/// Prints a bridge failure, with the error records when it carries some.
pub fn print_bridge_error(error: &psbridge::Error) {
    eprintln!("psbridge: {error}");
    if let psbridge::Error::Connect { records, .. } | psbridge::Error::ModuleImport { records } = error {
        records.iter().for_each(print_error_record);
    }
}
