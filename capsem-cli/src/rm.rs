//! `capsem rm` (placeholder).
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _name: &str, _force: bool) -> Result<u8, PersistError> {
    Err(PersistError::Start("rm: not built yet".into()))
}
