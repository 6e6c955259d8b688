//! `capsem completions SHELL`: a completion script for bash, zsh, fish,
//! elvish or PowerShell, generated from the clap definitions
//! ([`clap_complete`]), on stdout.

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;

/// The script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "capsem", &mut out);
    out
}

/// Prints the script; a closed stdout is an error, not a panic.
pub fn run(shell: Shell) -> Result<Exit, CliError> {
    write_stdout(&script(shell))?;
    Ok(Exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_that_names_capsem() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let text = String::from_utf8(script(shell)).unwrap();
            assert!(text.contains("capsem"), "{shell:?}");
        }
    }
}
