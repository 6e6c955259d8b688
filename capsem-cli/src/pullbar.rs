//! Progress of `capsem image pull` and `import` on stderr
//! ([`PullBar`], an [`indicatif`] bar implementing
//! [`capsem_image::Progress`]): bytes and layers while fetching, then a
//! line while converting. Drawn only when stderr is a terminal.

use std::os::fd::AsFd;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar, or nothing when stderr is not a terminal.
#[derive(Debug)]
pub struct PullBar {
    bar: Option<ProgressBar>,
    layers: usize,
}

impl PullBar {
    pub fn new() -> Self {
        let tty = crate::terminal::is_tty(std::io::stderr().as_fd());
        Self::with_enabled(tty)
    }

    fn with_enabled(enabled: bool) -> Self {
        let bar =
            enabled.then(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()));
        Self { bar, layers: 0 }
    }
}

impl capsem_image::Progress for PullBar {
    fn resolved(&mut self, layers: usize, bytes: u64) {
        self.layers = layers;
        if let Some(b) = &self.bar {
            b.set_length(bytes);
            // The template is a constant; it parses.
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
        }
    }

    fn layer(&mut self, index: usize, _size: u64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("layer {}/{}", index + 1, self.layers));
        }
    }

    fn bytes(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    fn converting(&mut self) {
        if let Some(b) = &self.bar {
            // A static line: indicatif's steady tick would be an unnamed
            // thread of its own.
            if let Ok(style) = ProgressStyle::with_template("{msg}") {
                b.set_style(style);
            }
            b.set_message(format!("converting {} layers...", self.layers));
            b.tick();
        }
    }

    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for PullBar {
    fn drop(&mut self) {
        capsem_image::Progress::done(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_image::Progress;

    #[test]
    fn disabled_has_no_bar_and_done_is_idempotent() {
        let mut p = PullBar::with_enabled(false);
        p.resolved(2, 10);
        p.layer(0, 5);
        p.bytes(5);
        assert!(p.bar.is_none());
        let mut p = PullBar::with_enabled(true);
        p.resolved(1, 3);
        assert!(p.bar.is_some());
        p.done();
        p.done();
        assert!(p.bar.is_none());
    }
}
