//! `capsem list` (placeholder).
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _json: bool) -> Result<u8, PersistError> {
    Err(PersistError::Start("list: not built yet".into()))
}
