//! A one-line "starting" indicator on stderr, drawn only when stderr is a
//! terminal and erased when dropped.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// How often the indicator is redrawn (the poll timeout while waiting).
pub const TICK: Duration = Duration::from_millis(100);

const FRAMES: [char; 4] = ['|', '/', '-', '\\'];

#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    what: &'static str,
    started: Instant,
    frame: usize,
    drawn: bool,
}

impl Progress {
    pub fn new(what: &'static str) -> Self {
        let enabled = crate::terminal::is_tty(std::io::stderr().as_fd());
        Self::with_enabled(what, enabled)
    }

    fn with_enabled(what: &'static str, enabled: bool) -> Self {
        Self {
            enabled,
            what,
            started: Instant::now(),
            frame: 0,
            drawn: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The line drawn now.
    fn line(&self) -> String {
        format!(
            "\r{} {} {:.1}s\x1b[K",
            FRAMES[self.frame % FRAMES.len()],
            self.what,
            self.started.elapsed().as_secs_f32()
        )
    }

    /// Redraws the indicator.
    pub fn tick(&mut self) {
        if !self.enabled {
            return;
        }
        let line = self.line();
        self.frame += 1;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the indicator if it was drawn.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(b"\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_never_draws() {
        let mut p = Progress::with_enabled("starting", false);
        p.tick();
        assert!(!p.drawn);
    }

    #[test]
    fn line_erases_to_end_of_line() {
        let p = Progress::with_enabled("starting VM", true);
        let line = p.line();
        assert!(line.starts_with("\r| starting VM 0."), "{line:?}");
        assert!(line.ends_with("s\x1b[K"));
    }
}
