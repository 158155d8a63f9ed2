#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod command;
mod connect;
mod errors;
mod lines;
mod locate;
mod pool;
mod process;
mod protocol;
mod records;
pub mod exo;
pub mod retry;
mod runspace;
mod worker_files;

pub use connect::{Connection, Connector, ConnectorError};
pub use command::{Command, MAX_VALUE_DEPTH, ParamValue, valid_parameter_name};
pub use errors::{Error, Result, WorkerExit};
pub use locate::{PWSH_ENV, find_pwsh};
pub use protocol::{ModuleSpec, WorkerInfo};
pub use records::{
    Completion, ErrorRecord, InformationRecord, InvocationResult, PipelineState, ProgressRecord, PsObject, StreamItem,
};
pub use pool::{
    Counters, Pending, Percentiles, PoolBuilder, PoolStats, PoolStream, ProcessStats, RecyclePolicy, RunspacePool, WorkerState, WorkerStats,
};
pub use retry::RetryPolicy;
pub use runspace::{CancelHandle, Invocation, Runspace, RunspaceBuilder};

pub use secrecy::SecretString;
