//! Errors the operator caused (bad config, missing privilege, port taken) versus
//! failures of the service itself. The CLI maps the first to exit code 2 with one
//! clear line, as scripts expect from a refused command.
use std::fmt;

/// Bad input or an unmet precondition: nothing was changed.
#[derive(Debug)]
pub struct InputError(String);

impl InputError {
    pub fn new(message: impl Into<String>) -> Self {
        InputError(message.into())
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Exit code for success: the command did what it was asked.
pub const EXIT_OK: i32 = 0;
/// Exit code for bad input and unmet preconditions.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for an operation that was tried and failed (e.g. a new generation did not become ready).
pub const EXIT_FAILED: i32 = 1;

/// The exit code an error deserves: 2 if anywhere in its chain it is an [`InputError`].
pub fn exit_code(error: &anyhow::Error) -> i32 {
    if error.chain().any(|e| e.is::<InputError>()) {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILED
    }
}
