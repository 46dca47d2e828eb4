//! Kernel slab mode.

use crate::config::Config;

/// Runs kernel mode.
pub async fn run(_config: Config) -> anyhow::Result<i32> {
    anyhow::bail!("kernel mode is not available in this build yet")
}
