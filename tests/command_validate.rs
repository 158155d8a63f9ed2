//! `Command::validate`: what psbridge refuses before anything reaches a worker (values nested deeper than
//! `MAX_VALUE_DEPTH`, the same parameter twice), and that `invoke` refuses it the same way.

mod common;

use psbridge::{Command, Error, MAX_VALUE_DEPTH};
use serde_json::{Value, json};

/// `depth` nested arrays around an empty one: `depth` levels however the innermost value is counted.
fn nested(depth: usize) -> Value {
    (1..depth).fold(json!([]), |inner, _| Value::Array(vec![inner]))
}

fn echo(value: Value) -> Command {
    Command::script("param($V) ,$V").param("V", value)
}

/// The reason of an `InvalidCommand` error (panics on anything else).
fn invalid(result: psbridge::Result<()>) -> String {
    match result {
        Err(Error::InvalidCommand { reason, .. }) => reason,
        other => panic!("expected Error::InvalidCommand, got {other:?}"),
    }
}

#[test]
fn the_limit_is_the_one_the_worker_can_read() {
    // The worker's System.Text.Json reader stops at 64 levels (JsonDocumentOptions.MaxDepth).
    assert_eq!(MAX_VALUE_DEPTH, 64);
}

#[test]
fn values_nested_to_the_limit_are_valid() {
    echo(nested(MAX_VALUE_DEPTH)).validate().expect("depth 64 is allowed");
    let objects = (1..MAX_VALUE_DEPTH).fold(json!({}), |inner, _| json!({ "k": inner }));
    echo(objects).validate().expect("64 nested objects are allowed");
}

#[test]
fn deeper_values_are_refused_wherever_they_are() {
    for command in [
        echo(nested(MAX_VALUE_DEPTH + 1)),
        echo(json!({ "shallow": 1, "deep": nested(MAX_VALUE_DEPTH) })),
        echo(json!([1, [2, nested(MAX_VALUE_DEPTH - 1)]])),
        // in a later step of a pipeline
        Command::new("Get-Date").pipe("Write-Output").param("InputObject", nested(MAX_VALUE_DEPTH + 1)),
        // far too deep: must not overflow the stack while checking
        echo(nested(5_000)),
    ] {
        let error = command.validate().expect_err("too deep");
        assert!(error.to_string().contains("too deep"), "{error}");
        assert!(invalid(Err(error)).contains("too deep"));
    }
}

#[test]
fn the_same_parameter_twice_is_refused_whatever_its_case() {
    let reason = invalid(Command::new("Get-Item").param("Path", "/a").param("path", "/b").validate());
    assert!(reason.to_lowercase().contains("path"), "the reason names the parameter: {reason}");
    invalid(Command::script("param($Name) $Name").param("NAME", 1).param("name", 2).validate());
    // the same name in two steps of a pipeline is two parameters
    Command::new("Get-Item").param("Path", "/a").pipe("Get-Item").param("Path", "/b").validate().expect("one per step");
    Command::new("Get-Item").param("Path", "/a").param("Force", true).validate().expect("different names");
}

#[tokio::test]
async fn invoke_refuses_an_invalid_command_and_the_worker_stays() {
    let mut rs = common::plain().await;
    let pid = rs.pid();
    for command in [echo(nested(MAX_VALUE_DEPTH + 1)), Command::new("Get-Item").param("Path", "/a").param("PATH", "/b")] {
        match rs.invoke(&command).await {
            Err(Error::InvalidCommand { .. }) => {}
            other => panic!("expected Error::InvalidCommand, got {other:?}"),
        }
    }
    let r = rs.invoke(&echo(nested(MAX_VALUE_DEPTH))).await.expect("depth 64 goes through");
    assert_eq!(r.output.len(), 1);
    assert_eq!(rs.pid(), pid, "refused commands never reached (or broke) the worker");
}
