//! `--device`: the backend chosen at run time.

use anyhow::{Result, bail};
use burn::tensor::Device;

/// The device named on the command line.
pub fn parse(name: &str) -> Result<Device> {
    match name {
        "flex" | "cpu" => Ok(Device::flex()),
        "cuda" => cuda(),
        other => bail!("unknown --device `{other}`; expected `flex` or `cuda`"),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!("this build has no CUDA backend; rebuild with `--features cuda`")
}
