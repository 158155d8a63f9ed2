//! Printing results: output objects on stdout in the chosen format, everything else readable on stderr.

use std::io::{self, Write};

use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use psbridge::{Completion, InformationRecord, PipelineState, ProgressRecord, PsObject, StreamItem};
use serde_json::{Value, json};

use crate::exit::write_error_record;

/// How `run` prints output objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON array.
    Json,
    /// One JSON value per line.
    Jsonl,
    /// A readable table.
    Table,
    /// CSV with a header row (columns from --select, else the first object's properties; nested values
    /// as JSON).
    Csv,
}

/// Most columns a table shows; the rest are named on stderr.
const TABLE_COLUMNS: usize = 8;

/// The properties `--select` keeps, in the order asked.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    properties: Vec<String>,
}

impl Selection {
    /// The properties named, each once: `Alias,alias` is one column (the first spelling asked).
    pub fn new(properties: &[String]) -> Self {
        let mut kept: Vec<String> = Vec::new();
        for property in properties.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if !kept.iter().any(|k| k.eq_ignore_ascii_case(property)) {
                kept.push(property.to_owned());
            }
        }
        Selection { properties: kept }
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
///
/// Whatever happens, the output stays whole: [`finish`](Self::finish) closes the JSON array or prints the
/// table of the objects seen so far, and every JSON line and CSV row is written whole.
pub struct OutputWriter<W: Write> {
    out: W,
    format: Format,
    selection: Selection,
    /// No notes on stderr (columns left out).
    quiet: bool,
    written: usize,
    finished: bool,
    table_rows: Vec<Value>,
    csv_columns: Vec<String>,
    csv_dropped: Vec<String>,
}

impl<W: Write> OutputWriter<W> {
    /// A writer of `format` on `out`, keeping the properties `selection` names.
    pub fn new(out: W, format: Format, selection: Selection, quiet: bool) -> Self {
        OutputWriter {
            out,
            format,
            selection,
            quiet,
            written: 0,
            finished: false,
            table_rows: Vec::new(),
            csv_columns: Vec::new(),
            csv_dropped: Vec::new(),
        }
    }

    /// Writes one output object.
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

    /// Closes the JSON array or prints the table, and flushes; only the first call writes.
    pub fn finish(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        match self.format {
            Format::Json if self.written == 0 => writeln!(self.out, "[]")?,
            Format::Json => writeln!(self.out, "\n]")?,
            Format::Jsonl => {}
            Format::Table => print_table(&mut self.out, &std::mem::take(&mut self.table_rows), self.quiet)?,
            Format::Csv => {
                if !self.csv_dropped.is_empty() && !self.quiet {
                    note(format_args!(
                        "(properties absent from the first object are not in the CSV: {}; use --select to choose the columns)",
                        self.csv_dropped.join(", ")
                    ));
                }
            }
        }
        self.out.flush()
    }
}

/// A note of psbridge's own on stderr; a stderr that cannot be written is ignored.
fn note(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "{text}");
}

fn print_table(out: &mut impl Write, rows: &[Value], quiet: bool) -> io::Result<()> {
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
    if columns.len() > shown.len() && !quiet {
        note(format_args!(
            "({} more properties not shown: {}; use --format json to see them)",
            columns.len() - shown.len(),
            columns[shown.len()..].join(", ")
        ));
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
    /// An empty envelope keeping the output properties `selection` names.
    pub fn new(selection: Selection) -> Self {
        Envelope { result: psbridge::InvocationResult::default(), selection }
    }

    /// Adds an item of any stream.
    pub fn push(&mut self, item: StreamItem) {
        self.result.push(item);
    }

    /// Prints the envelope as one JSON object. `None`: the command did not get to its end (interrupt,
    /// timeout, dead worker): what it produced so far, with state `Stopped`.
    pub fn print(&mut self, out: &mut impl Write, completion: Option<Completion>) -> io::Result<()> {
        let r = &mut self.result;
        r.complete(completion.unwrap_or(Completion { state: PipelineState::Stopped, ..Completion::default() }));
        let envelope = json!({
            "output": r.output.iter().map(|o| self.selection.apply(o.value.clone())).collect::<Vec<_>>(),
            "errors": r.errors,
            "warnings": r.warnings,
            "verbose": r.verbose,
            "debug": r.debug,
            "information": r.information,
            "progress": r.progress,
            "had_errors": r.had_errors,
            "exit_code": r.exit_code,
            "native_exit_code": r.native_exit_code,
            "state": r.state,
            "duration_ms": r.duration.as_secs_f64() * 1000.0,
        });
        serde_json::to_writer_pretty(&mut *out, &envelope).map_err(io::Error::other)?;
        writeln!(out)?;
        out.flush()
    }
}

/// Prints a non-output stream item on stderr the way PowerShell's console shows it. `quiet`: error
/// records only. A stderr that cannot be written is ignored.
pub fn print_stream_item(item: &StreamItem, quiet: bool) {
    let mut err = io::stderr().lock();
    let _ = match item {
        StreamItem::Output(_) => Ok(()),
        StreamItem::Error(record) => write_error_record(&mut err, record),
        _ if quiet => Ok(()),
        StreamItem::Warning(text) => writeln!(err, "WARNING: {text}"),
        StreamItem::Verbose(text) => writeln!(err, "VERBOSE: {text}"),
        StreamItem::Debug(text) => writeln!(err, "DEBUG: {text}"),
        StreamItem::Information(InformationRecord { message, .. }) => writeln!(err, "{}", message.as_deref().unwrap_or("")),
        StreamItem::Progress(ProgressRecord { activity, status_description, percent_complete, .. }) => {
            let percent = if *percent_complete >= 0 { format!(" ({percent_complete}%)") } else { String::new() };
            writeln!(err, "PROGRESS: {}: {}{percent}", activity.as_deref().unwrap_or(""), status_description.as_deref().unwrap_or(""))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_property_selected_twice_is_one_column_with_its_value() {
        let object = json!({"Alias": "a1", "Department": "Sales"});
        for asked in [["Alias", "Alias"], ["Alias", "alias"]] {
            let selection = Selection::new(&asked.map(String::from));
            assert_eq!(selection.apply(object.clone()), json!({"Alias": "a1"}), "{asked:?}");
        }
    }

    #[test]
    fn an_unfinished_json_array_is_closed_once() {
        let mut out = Vec::new();
        let mut writer = OutputWriter::new(&mut out, Format::Json, Selection::default(), true);
        writer.write(PsObject { type_names: vec![], value: json!("start") }).unwrap();
        writer.finish().unwrap();
        writer.finish().unwrap();
        drop(writer);
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), json!(["start"]));
    }
}
