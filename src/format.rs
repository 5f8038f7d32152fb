//! `csvctl format`: writes a new volume superblock to a LUN.

use anyhow::{Context, bail};
use csv_core::superblock::Superblock;

/// What to do with a LUN that already holds a csvd volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the safe default).
    Refuse,
    /// Keep it and report its superblock (idempotent provisioning).
    Keep,
    /// Overwrite it.
    Overwrite,
}

/// Formats the LUN named by `spec` (path or NBD URI).
pub async fn format_lun(
    spec: &str,
    block_size: u32,
    existing: Existing,
) -> anyhow::Result<Superblock> {
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        bail!("block size {block_size} must be a power of two between 512 and 65536");
    }
    let lun = csv_core::lun::open_lun(spec, &Default::default())
        .await
        .with_context(|| format!("cannot open LUN {spec}"))?;
    if let Ok(sb) = csv_core::superblock::read(lun.as_ref()).await {
        match existing {
            Existing::Refuse => bail!(
                "{spec} already holds csvd volume {}; pass --force to overwrite it (its data will be lost)",
                sb.uuid_string()
            ),
            Existing::Keep => return Ok(sb),
            Existing::Overwrite => {}
        }
    }
    let min = 16 * u64::from(block_size);
    if lun.size() < min {
        bail!("{spec} is too small: {} bytes (at least {min})", lun.size());
    }
    let sb = Superblock::new(lun.size(), block_size);
    csv_core::superblock::format(lun.as_ref(), &sb)
        .await
        .with_context(|| format!("cannot write the superblock to {spec}"))?;
    Ok(sb)
}
