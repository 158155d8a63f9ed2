//! Printing results: output objects on stdout in the chosen format, everything else readable on stderr.

use std::io::{self, Write};

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use psbridge::{Completion, ErrorRecord, InformationRecord, ProgressRecord, PsObject, StreamItem};
use serde_json::{Value, json};

use crate::run::Format;

/// Most columns a table shows; the rest are named on stderr.
const TABLE_COLUMNS: usize = 8;

/// Writes output objects as they arrive (json and jsonl stream; a table needs them all first).
pub struct OutputWriter<W: Write> {
    out: W,
    format: Format,
    written: usize,
    table_rows: Vec<Value>,
}

impl<W: Write> OutputWriter<W> {
    pub fn new(out: W, format: Format) -> Self {
        OutputWriter { out, format, written: 0, table_rows: Vec::new() }
    }

    pub fn write(&mut self, object: PsObject) -> io::Result<()> {
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
        }
        self.written += 1;
        Ok(())
    }

    /// Closes the JSON array or prints the table.
    pub fn finish(&mut self) -> io::Result<()> {
        match self.format {
            Format::Json if self.written == 0 => writeln!(self.out, "[]"),
            Format::Json => writeln!(self.out, "\n]"),
            Format::Jsonl => Ok(()),
            Format::Table => print_table(&mut self.out, &std::mem::take(&mut self.table_rows)),
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

fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("{{{}}}", items.iter().map(cell).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// Collects every stream for `--envelope`.
#[derive(Default)]
pub struct Envelope {
    result: psbridge::InvocationResult,
}

impl Envelope {
    pub fn push(&mut self, item: StreamItem) {
        self.result.push(item);
    }

    pub fn print(&mut self, completion: Completion) -> io::Result<()> {
        let r = &mut self.result;
        r.complete(completion);
        let envelope = json!({
            "output": r.output.iter().map(|o| &o.value).collect::<Vec<_>>(),
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
