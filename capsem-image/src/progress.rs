//! What a pull or an import reports while it works ([`Progress`]); the
//! CLI draws it, a caller that wants nothing passes [`Quiet`].

/// Events of one pull or import, in order: `resolved`, then per layer
/// `layer` and `bytes`..., then `converting`, then `done`.
pub trait Progress {
    /// The manifest is known: `layers` layers, `bytes` to fetch in all.
    fn resolved(&mut self, _layers: usize, _bytes: u64) {}
    /// Layer `index` (from 0), `size` bytes, starts downloading or reading.
    fn layer(&mut self, _index: usize, _size: u64) {}
    /// `n` more bytes of the current layer arrived.
    fn bytes(&mut self, _n: u64) {}
    /// The layers are being flattened and converted.
    fn converting(&mut self) {}
    /// Finished (also called on failure, so a bar can be erased).
    fn done(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Progress for Quiet {}
