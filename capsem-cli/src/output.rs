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

/// Rows of four cells as aligned text: the first three columns padded to
/// their widest cell plus two spaces, the last one as it is (`list`,
/// `image ls`).
pub fn columns(rows: &[[String; 4]]) -> String {
    let mut widths = [0usize; 3];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        for (w, cell) in widths.iter().zip(row.iter()) {
            out.push_str(cell);
            out.push_str(&" ".repeat(w - cell.chars().count() + 2));
        }
        out.push_str(&row[3]);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_pad_all_but_the_last() {
        let rows = [
            ["NAME".into(), "A".into(), "B".into(), "LAST".into()],
            ["x".into(), "long-é".into(), "".into(), "tail cell".into()],
        ];
        assert_eq!(
            columns(&rows),
            "NAME  A       B  LAST\nx     long-é     tail cell\n"
        );
    }
}
