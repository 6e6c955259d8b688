//! `capsem inspect` (placeholder).
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _name: &str) -> Result<u8, PersistError> {
    Err(PersistError::Start("inspect: not built yet".into()))
}
