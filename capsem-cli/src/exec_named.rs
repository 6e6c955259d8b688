//! `capsem exec NAME` (placeholder).
use crate::cli::ExecArgs;
use crate::persist::{Ctx, PersistError};
pub fn run(_ctx: &Ctx, _args: ExecArgs) -> Result<u8, PersistError> {
    Err(PersistError::Start("exec: not built yet".into()))
}
