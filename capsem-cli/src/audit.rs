//! `capsem audit NAME` (placeholder).
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _name: &str, _follow: bool, _json: bool) -> Result<u8, PersistError> {
    Err(PersistError::Start("audit: not built yet".into()))
}
