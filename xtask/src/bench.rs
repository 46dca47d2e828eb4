//! Benchmarks (filled in below).
pub fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("benchmarks: not written yet")
}
