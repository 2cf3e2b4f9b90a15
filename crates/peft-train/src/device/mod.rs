//! Devices by name, as configs and the command line give them: `flex` (or `cpu`), `cuda`,
//! `cuda:N`, `vulkan`, `vulkan:N`.
//!
//! `vulkan` is the first adapter of [`vulkan_adapters`] (a discrete GPU when there is one, then
//! integrated, virtual, and last a software rasterizer such as lavapipe); `vulkan:N` is the
//! N-th of that list, which `burn-peft devices` prints. A name whose backend this build lacks,
//! or an adapter that does not exist, is a typed [`DeviceError`] that says what to do (and lists
//! the adapters there are), never a panic deep inside the runtime.
//!
//! ```
//! use peft_train::device::DeviceName;
//!
//! let name: DeviceName = "vulkan:1".parse().unwrap();
//! assert_eq!(name, DeviceName::Vulkan(Some(1)));
//! assert_eq!(name.to_string(), "vulkan:1");
//! assert!("tpu".parse::<DeviceName>().is_err());
//! // Flex is always built in.
//! let device = DeviceName::Flex.open().unwrap();
//! assert_eq!(device, burn::tensor::Device::flex());
//! ```

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// Every spelling [`DeviceName`] accepts, for messages.
pub const DEVICE_NAMES: &str = "flex (or cpu), cuda, cuda:N, vulkan, vulkan:N";

/// A device as named in a config or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceName {
    /// Burn's CPU backend.
    #[default]
    Flex,
    /// A CUDA device (index 0 when not given).
    Cuda(Option<usize>),
    /// A Vulkan adapter (the best one when not given).
    Vulkan(Option<usize>),
}

/// A device that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Not a device name.
    #[error("unknown device `{0}`; expected one of: {DEVICE_NAMES}")]
    Unknown(String),
    /// The backend is not compiled into this build.
    #[error("this build has no {backend} backend; rebuild with `--features {feature}`{how}")]
    NotBuilt {
        /// `CUDA`, `Vulkan`.
        backend: &'static str,
        /// The cargo feature.
        feature: &'static str,
        /// Where to read more.
        how: &'static str,
    },
    /// The Vulkan backend is built but the machine has no adapter.
    #[error(
        "no Vulkan adapter found: install a Vulkan driver (for a software device, Debian's `mesa-vulkan-drivers` brings lavapipe) and check `vulkaninfo --summary`, or use --device flex"
    )]
    NoVulkanAdapter,
    /// `vulkan:N` with N past the end of the list.
    #[error("there is no Vulkan adapter {index}; this machine has {}: {}", .available.len(), .available.join("; "))]
    NoSuchAdapter {
        /// The index asked for.
        index: usize,
        /// `vulkan:i  name (kind)` for each adapter.
        available: Vec<String>,
    },
    /// A software adapter in a SPIR-V (`--features vulkan`) build, which it cannot run
    /// (`device/vulkan.rs` says why).
    #[error(
        "{name} is a software Vulkan device (lavapipe), which this build's SPIR-V kernels crash: cubecl 0.11 needs VK_KHR_workgroup_memory_explicit_layout for them; build with `--features wgpu` (WGSL kernels) to run on it"
    )]
    SoftwareSpirv {
        /// The device name.
        name: String,
    },
    /// The adapter exists but the runtime could not open it.
    #[error("cannot open {name}: {reason}")]
    Open {
        /// The device name.
        name: String,
        /// What the runtime said.
        reason: String,
    },
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => f.write_str("flex"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(i)) => write!(f, "cuda:{i}"),
            Self::Vulkan(None) => f.write_str("vulkan"),
            Self::Vulkan(Some(i)) => write!(f, "vulkan:{i}"),
        }
    }
}

impl FromStr for DeviceName {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::Unknown(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        let (backend, index) = match lower.split_once(':') {
            Some((b, i)) => (b, Some(i.parse::<usize>().map_err(|_| unknown())?)),
            None => (lower.as_str(), None),
        };
        match (backend, index) {
            ("flex" | "cpu", None) => Ok(Self::Flex),
            ("cuda", index) => Ok(Self::Cuda(index)),
            ("vulkan", index) => Ok(Self::Vulkan(index)),
            _ => Err(unknown()),
        }
    }
}

impl DeviceName {
    /// Open the device (not yet with autodiff; training adds it).
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Flex => Ok(Device::flex()),
            Self::Cuda(index) => cuda(index.unwrap_or(0)),
            Self::Vulkan(index) => vulkan::open(index.unwrap_or(0)),
        }
    }
}

/// Parse and open `name`.
pub fn open(name: &str) -> Result<Device, DeviceError> {
    name.parse::<DeviceName>()?.open()
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, DeviceError> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        backend: "CUDA",
        feature: "cuda",
        how: " on a machine with internet access (docs/gpu.md)",
    })
}

/// The Vulkan adapters of this machine, in the order `vulkan:N` counts them: `vulkan:i  name
/// (kind)`. Empty when the build has no Vulkan backend or the machine no adapter. Opens each
/// adapter to ask its name.
pub fn vulkan_adapters() -> Vec<String> {
    vulkan::describe_all()
}

/// A line saying what `device` is, for logs: `vulkan:0 llvmpipe (LLVM 15.0.6, 256 bits)
/// (software)` or `flex (CPU)`.
pub fn describe(device: &Device) -> String {
    if *device == Device::flex() {
        return "flex (CPU)".into();
    }
    vulkan::describe(device).unwrap_or_else(|| format!("{device:?}"))
}

#[cfg(any(feature = "vulkan", feature = "wgpu"))]
mod vulkan;

#[cfg(not(any(feature = "vulkan", feature = "wgpu")))]
mod vulkan {
    use burn::tensor::Device;

    use super::DeviceError;

    pub(super) fn open(_index: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt {
            backend: "Vulkan",
            feature: "vulkan",
            how: " (or `--features wgpu` for software Vulkan such as lavapipe; docs/gpu.md)",
        })
    }

    pub(super) fn describe_all() -> Vec<String> {
        Vec::new()
    }

    pub(super) fn describe(_device: &Device) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, name) in [
            ("flex", DeviceName::Flex),
            ("cpu", DeviceName::Flex),
            ("cuda", DeviceName::Cuda(None)),
            ("cuda:1", DeviceName::Cuda(Some(1))),
            ("vulkan", DeviceName::Vulkan(None)),
            ("Vulkan:0", DeviceName::Vulkan(Some(0))),
        ] {
            assert_eq!(text.parse::<DeviceName>().unwrap(), name, "{text}");
        }
        for bad in ["tpu", "vulkan:x", "flex:0", "cuda:-1", ""] {
            let e = bad.parse::<DeviceName>().unwrap_err();
            assert!(e.to_string().contains("vulkan:N"), "{e}");
        }
        assert_eq!(DeviceName::Cuda(Some(2)).to_string(), "cuda:2");
    }

    /// The SPIR-V build names the way out instead of letting lavapipe crash.
    #[cfg(feature = "vulkan")]
    #[test]
    fn spirv_build_refuses_software_adapters_with_the_way_out() {
        let adapters = vulkan_adapters();
        let software: Vec<_> = adapters
            .iter()
            .enumerate()
            .filter(|(_, line)| line.contains("(software)"))
            .collect();
        if software.is_empty() {
            eprintln!("no software Vulkan adapter here; nothing to refuse ({adapters:?})");
            return;
        }
        for (i, line) in software {
            let e = open(&format!("vulkan:{i}")).unwrap_err();
            assert!(matches!(e, DeviceError::SoftwareSpirv { .. }), "{e}");
            assert!(e.to_string().contains("--features wgpu"), "{e}");
            assert!(line.contains("--features wgpu"), "{line}");
        }
    }

    #[cfg(not(any(feature = "vulkan", feature = "wgpu")))]
    #[test]
    fn vulkan_without_the_feature_says_how_to_build_it() {
        let e = open("vulkan").unwrap_err();
        assert!(e.to_string().contains("--features vulkan"), "{e}");
        assert!(vulkan_adapters().is_empty());
    }
}
