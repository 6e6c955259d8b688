//! Writing a command's result to stdout.

use std::io::{self, Write};

use crate::error::CliError;

/// Writes all of `data` to stdout; a closed stdout is an error, not a
/// panic.
pub fn write_stdout(data: &[u8]) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(|source| CliError::Io {
            what: "cannot write to stdout".into(),
            source,
        })
}
