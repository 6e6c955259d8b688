//! `capsem logs` (placeholder).
use crate::cli::LogSource;
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _name: &str, _follow: bool, _source: LogSource) -> Result<u8, PersistError> {
    Err(PersistError::Start("logs: not built yet".into()))
}
