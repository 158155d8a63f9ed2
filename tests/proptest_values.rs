//! Generated parameter values through one real worker: what goes in as JSON comes back as JSON, changed
//! only where PowerShell's own types change it (written down in [`expected`]).
//!
//! Each value `V` is bound with `AddParameter` to `param($V) ,$V` (the comma wraps `$V` in a one-item
//! array that the pipeline unrolls, so arrays come back as one object instead of one object per element)
//! and the single output object is compared with `expected(V)`.

mod common;

use std::cell::RefCell;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use psbridge::{Command, Runspace};
use serde_json::{Map, Number, Value, json};

/// `psbridge::MAX_VALUE_DEPTH`: how deeply parameter values may nest. Kept as a local constant so that this
/// file compiles (and shows today's round-trip defects) before the library exports it;
/// tests/command_validate.rs checks the two agree.
const MAX_DEPTH: usize = 64;

/// Integers at and beyond the edges of the .NET integer types, as JSON literals. Beyond 64 bits they only
/// exist as text: serde_json keeps them exactly only with its `arbitrary_precision` feature.
const INTEGER_EDGES: &[&str] = &[
    "0",
    "-1",
    "2147483647",           // Int32.MaxValue
    "2147483648",           // one past: Int64
    "-2147483648",          // Int32.MinValue
    "-2147483649",          // one past: Int64
    "9223372036854775807",  // i64::MAX
    "-9223372036854775808", // i64::MIN
    "9223372036854775808",  // i64::MAX + 1
    "18446744073709551615", // u64::MAX
    "18446744073709551616", // u64::MAX + 1
    "1180591620717411303424", // 2^70
    "-1180591620717411303424",
];

/// Strings that have broken JSON bridges: NUL and other controls, a BOM, line and paragraph separators,
/// emoji (astral plane: surrogate pairs in .NET), right-to-left text, combining marks, text that looks
/// like a date or a number (PowerShell must not convert it), and text that looks like PowerShell.
const AWKWARD_STRINGS: &[&str] = &[
    "",
    "\0",
    "a\0b",
    "\u{1}\u{1f}\u{7f}",
    "\u{feff}bom",
    "line\r\nbreak\n",
    "\u{2028}\u{2029}",
    "🎉👩‍👩‍👧‍👦",
    "مرحبا بالعالم",
    "\u{202e}reversed",
    "e\u{301}\u{20dd}",
    "2026-01-31T12:00:00Z",
    "0x10",
    "1e5",
    "$env:HOME; exit 1",
    "'; Remove-Item -Recurse /",
    "\\\"",
];

/// Object keys. PowerShell hashtables are case-insensitive, so ASCII case variants of one key are
/// included on purpose; the others have no case. (`$psbridge` is left out: the protocol reserves it
/// for tagged values such as dates.)
const KEYS: &[&str] = &["a", "A", "b", "key", "Key", "KEY", "", "with space", "ключ", "🔑", "1"];

// ---------------------------------------------------------------------------------------------------
// What PowerShell makes of a value
// ---------------------------------------------------------------------------------------------------

/// The value the worker is expected to send back for `value`.
///
/// - null, booleans and strings (any Unicode, NUL included) come back unchanged.
/// - Integers arrive as Int32 when they fit, else Int64, else a wider exact type (PowerShell itself
///   types a literal beyond Int64 as Decimal, `ConvertFrom-Json` as BigInteger): either way they come
///   back as the same integer, digit for digit. Rounding one to a double is a defect.
/// - Floats arrive as Double and come back as the same double. A double with no fraction (1.0, 1e20) is
///   written back without one (`1`, `1E+20`), so only the numeric value is compared, not the spelling.
///   NaN and infinities cannot be sent at all: JSON has no literal for them.
/// - Arrays arrive as `object[]` and come back element by element; empty arrays stay empty arrays.
/// - Objects arrive as case-insensitive hashtables: keys that differ only in case become one entry
///   (spelled as the first, holding the last value) and key order is not kept (see [`same`]).
fn expected(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(expected).collect()),
        Value::Object(map) => {
            let mut merged: Vec<(String, Value)> = Vec::new();
            for (key, item) in map {
                match merged.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(key)) {
                    Some(entry) => entry.1 = expected(item),
                    None => merged.push((key.clone(), expected(item))),
                }
            }
            Value::Object(merged.into_iter().collect())
        }
        scalar => scalar.clone(),
    }
}

/// Whether a JSON number is written as an integer (no fraction, no exponent).
fn is_integer(n: &Number) -> bool {
    let text = n.to_string();
    let digits = text.strip_prefix('-').unwrap_or(&text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Compares what came back with what was expected; objects as unordered maps, floats by value.
fn same(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    let mismatch = || Err(format!("at {path}: expected {expected}, got {actual}"));
    match (expected, actual) {
        (Value::Number(e), Value::Number(a)) if is_integer(e) => {
            // digit for digit: an integer that went through a double shows up here
            if is_integer(a) && e.to_string() == a.to_string() { Ok(()) } else { mismatch() }
        }
        (Value::Number(e), Value::Number(a)) => {
            if e.as_f64() == a.as_f64() { Ok(()) } else { mismatch() }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return mismatch();
            }
            e.iter().zip(a).enumerate().try_for_each(|(i, (e, a))| same(e, a, &format!("{path}[{i}]")))
        }
        (Value::Object(e), Value::Object(a)) => {
            if e.len() != a.len() {
                return mismatch();
            }
            e.iter().try_for_each(|(key, e)| match a.get(key) {
                Some(a) => same(e, a, &format!("{path}.{key:?}")),
                None => Err(format!("at {path}: key {key:?} missing from {actual}")),
            })
        }
        _ if expected == actual => Ok(()),
        _ => mismatch(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------------

fn integer_edge() -> impl Strategy<Value = Value> {
    prop::sample::select(INTEGER_EDGES).prop_map(|text| serde_json::from_str(text).expect("an integer literal"))
}

fn float() -> impl Strategy<Value = Value> {
    let special = prop::sample::select(&[0.0, -0.0, 1.0, -1.0, 0.1, 1e20, 1e300, -1e-300, 5e-324, f64::MAX, f64::MIN_POSITIVE][..]);
    // NaN and infinities have no JSON form: from_f64 returns None for them, so they are filtered out
    prop_oneof![special, any::<f64>()].prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number))
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(AWKWARD_STRINGS).prop_map(str::to_owned), any::<String>()]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        integer_edge(),
        float(),
        string().prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(KEYS).prop_map(str::to_owned)
}

/// Wide, shallow trees of arrays and objects.
fn tree() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..5).prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A scalar wrapped in `levels` one-item arrays or one-key objects.
fn wrap(mut value: Value, levels: &[(bool, String)]) -> Value {
    for (as_array, key) in levels {
        value = if *as_array { Value::Array(vec![value]) } else { Value::Object(Map::from_iter([(key.clone(), value)])) };
    }
    value
}

/// Narrow, deep values: up to MAX_DEPTH - 1 containers around a scalar, i.e. at most MAX_DEPTH levels
/// however the scalar is counted.
fn chain() -> impl Strategy<Value = Value> {
    (leaf(), prop::collection::vec((any::<bool>(), key()), 1..MAX_DEPTH)).prop_map(|(leaf, levels)| wrap(leaf, &levels))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![3 => leaf(), 4 => tree(), 1 => chain()]
}

/// `depth` nested one-item arrays around an empty array: `depth` levels whether or not a library counts
/// the innermost value as a level of its own.
fn nested_arrays(depth: usize) -> Value {
    (1..depth).fold(json!([]), |inner, _| Value::Array(vec![inner]))
}

// ---------------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------------

/// A plain worker that serializes output as deep as parameters may nest.
async fn open() -> Runspace {
    common::builder().depth(MAX_DEPTH as u32).open().await.expect("a plain worker opens")
}

fn echo(value: Value) -> Command {
    Command::script("param($V) ,$V").param("V", value).timeout(Duration::from_secs(30))
}

/// Sends `value` and returns the one object that came back, or what went wrong instead.
async fn round_trip(rs: &mut Runspace, value: &Value) -> Result<Value, String> {
    let r = rs.invoke(&echo(value.clone())).await.map_err(|e| format!("the bridge failed: {e}"))?;
    if !r.errors.is_empty() {
        return Err(format!("the command wrote errors: {:?}", r.errors.iter().map(|e| &e.message).collect::<Vec<_>>()));
    }
    match <[_; 1]>::try_from(r.output) {
        Ok([object]) => Ok(object.value),
        Err(output) => Err(format!("expected one output object, got {}: {output:?}", output.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_values_come_back_as_powershell_types_them() {
    // One worker for every case. A case that breaks the bridge gets a fresh worker, so that shrinking
    // keeps testing values rather than a dead process.
    let runspace = RefCell::new(Some(open().await));
    let config = Config { cases: 64, max_shrink_iters: 200, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let handle = tokio::runtime::Handle::current();
    let outcome = runner.run(&value(), |value| {
        tokio::task::block_in_place(|| {
            let mut slot = runspace.borrow_mut();
            if slot.is_none() {
                *slot = Some(handle.block_on(open()));
            }
            let rs = slot.as_mut().expect("a worker");
            let result = handle.block_on(round_trip(rs, &value));
            if result.as_ref().is_err_and(|e| e.starts_with("the bridge failed")) {
                *slot = None;
            }
            let actual = result.map_err(TestCaseError::fail)?;
            same(&expected(&value), &actual, "$V").map_err(|e| TestCaseError::fail(format!("{e}\nsent: {value}")))
        })
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

#[test]
fn serde_json_keeps_integers_beyond_64_bits() {
    // Without serde_json's arbitrary_precision feature a literal beyond u64 becomes a double before it
    // is ever sent: 2^70 would travel as 1.1805916207174113e21.
    for literal in ["18446744073709551616", "1180591620717411303424", "-1180591620717411303424"] {
        let value: Value = serde_json::from_str(literal).unwrap();
        assert_eq!(value.to_string(), literal, "serde_json rounded {literal} (is arbitrary_precision on?)");
    }
}

#[tokio::test]
async fn integers_at_the_edges_come_back_digit_for_digit() {
    let mut rs = open().await;
    for literal in INTEGER_EDGES {
        let value: Value = serde_json::from_str(literal).unwrap();
        let back = round_trip(&mut rs, &value).await.unwrap_or_else(|e| panic!("{literal}: {e}"));
        assert_eq!(back.to_string(), *literal, "{literal} came back as {back}");
        // and inside containers, where the worker converts values recursively
        let nested = round_trip(&mut rs, &json!({ "n": [value] })).await.unwrap();
        assert_eq!(nested["n"][0].to_string(), *literal, "{literal} nested came back as {nested}");
    }
}

#[tokio::test]
async fn conversions_written_down_in_expected() {
    let mut rs = open().await;
    // A double with no fraction loses its ".0" on the way back (System.Text.Json writes 1.0 as `1`): same
    // value, other spelling. That is why `same` compares floats by value.
    let back = round_trip(&mut rs, &json!(1.0)).await.unwrap();
    assert_eq!(back.as_f64(), Some(1.0), "{back}");
    // Keys differing only in case: one hashtable entry, first spelling, last value.
    let back = round_trip(&mut rs, &json!({ "key": 1, "KEY": 2, "other": [] })).await.unwrap();
    same(&json!({ "key": 2, "other": [] }), &back, "$V").unwrap();
    // Empty containers stay what they were.
    assert_eq!(round_trip(&mut rs, &json!([])).await.unwrap(), json!([]));
    assert_eq!(round_trip(&mut rs, &json!({})).await.unwrap(), json!({}));
    assert_eq!(round_trip(&mut rs, &json!([[]])).await.unwrap(), json!([[]]));
}

#[tokio::test]
async fn null_arrives_as_a_json_null_output_object() {
    let mut rs = open().await;
    // The output pipeline of a hosted PowerShell holds a real null for each of these (pwsh -File prints
    // nothing for them); each must arrive as an output object whose value is null.
    for (script, values) in [
        ("$null", vec![Value::Null]),
        ("Write-Output $null", vec![Value::Null]),
        ("@($null, 1)", vec![Value::Null, json!(1)]),
        ("[pscustomobject]@{ A = $null; B = @($null) }", vec![json!({ "A": null, "B": [null] })]),
    ] {
        let r = rs.invoke(&Command::script(script)).await.unwrap_or_else(|e| panic!("{script}: {e}"));
        let got: Vec<Value> = r.output.into_iter().map(|o| o.value).collect();
        assert_eq!(got, values, "{script}");
    }
    assert_eq!(round_trip(&mut rs, &Value::Null).await.unwrap(), Value::Null);
}

#[tokio::test]
async fn values_nested_to_the_limit_pass_and_deeper_ones_are_refused_before_sending() {
    let mut rs = open().await;
    let pid = rs.pid();

    let deepest = nested_arrays(MAX_DEPTH);
    let back = round_trip(&mut rs, &deepest).await.unwrap_or_else(|e| panic!("depth {MAX_DEPTH}: {e}"));
    same(&deepest, &back, "$V").unwrap();
    let deepest_object = (1..MAX_DEPTH).fold(json!({}), |inner, _| json!({ "k": inner }));
    let back = round_trip(&mut rs, &deepest_object).await.unwrap_or_else(|e| panic!("depth {MAX_DEPTH} of objects: {e}"));
    same(&deepest_object, &back, "$V").unwrap();

    for too_deep in [nested_arrays(MAX_DEPTH + 1), json!({ "ok": 1, "deep": nested_arrays(MAX_DEPTH) }), nested_arrays(10 * MAX_DEPTH)] {
        let error = rs.invoke(&echo(too_deep)).await.expect_err("a value deeper than the limit is refused");
        assert!(error.to_string().contains("too deep"), "{error}");
    }

    // Refused on this side: the worker never saw them, so it is the same process and still serves.
    let r = rs.invoke(&Command::script("'still here'")).await.expect("the worker is still usable");
    assert_eq!(r.output[0].value, json!("still here"));
    assert_eq!(rs.pid(), pid, "the worker was not replaced");
}
