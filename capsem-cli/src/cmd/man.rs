//! `capsem man`: capsem's manual page, capsem(1) in roff, generated from
//! the clap definitions ([`clap_mangen`]), on stdout. `scripts/install.sh`
//! writes it to `PREFIX/share/man/man1/capsem.1`.

use clap::CommandFactory;

use crate::cli::Cli;
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;

/// The page, roff.
pub fn page() -> Result<Vec<u8>, CliError> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|source| CliError::Io {
            what: "cannot render the manual page".into(),
            source,
        })?;
    Ok(out)
}

/// Prints the page.
pub fn run() -> Result<Exit, CliError> {
    write_stdout(&page()?)?;
    Ok(Exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_roff_for_capsem() {
        let text = String::from_utf8(page().unwrap()).unwrap();
        assert!(text.contains(".TH capsem 1"), "{text}");
        assert!(text.contains(".SH SUBCOMMANDS"), "{text}");
        // The exit codes (after_long_help) are in the page too.
        assert!(text.contains("128+N"), "{text}");
    }
}
