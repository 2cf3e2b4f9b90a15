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
        how: " on a machine with internet access (README: GPU backends)",
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

#[cfg(feature = "vulkan")]
mod vulkan {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, PoisonError};

    use burn::backend::{CubeDevice, DispatchDevice, WgpuDeviceKind};
    use burn::tensor::wgpu::{WgpuBackend, WgpuInitError};
    use burn::tensor::{Device, DeviceKind, DeviceType};

    use super::DeviceError;

    /// Devices opened so far, by index: a runtime is initialised once per process.
    fn opened() -> &'static Mutex<HashMap<usize, Device>> {
        static OPENED: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
        OPENED.get_or_init(Default::default)
    }

    fn adapters() -> Vec<Device> {
        // Discrete GPUs first, then integrated, virtual, software (Burn's enumeration order).
        Device::enumerate(DeviceType::Vulkan).into_vec()
    }

    fn kind_of(device: &Device) -> Option<WgpuDeviceKind> {
        match device.as_dispatch() {
            DispatchDevice::Cube(CubeDevice::Wgpu(w)) => Some(w.kind.clone()),
            _ => None,
        }
    }

    fn kind_label(kind: &WgpuDeviceKind) -> &'static str {
        match kind {
            WgpuDeviceKind::DiscreteGpu(_) => "discrete GPU",
            WgpuDeviceKind::IntegratedGpu(_) => "integrated GPU",
            WgpuDeviceKind::VirtualGpu(_) => "virtual GPU",
            WgpuDeviceKind::Cpu => "software",
            _ => "other",
        }
    }

    pub(super) fn open(index: usize) -> Result<Device, DeviceError> {
        if let Some(device) = opened()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&index)
        {
            return Ok(device.clone());
        }
        let all = adapters();
        if all.is_empty() {
            return Err(DeviceError::NoVulkanAdapter);
        }
        let Some(lazy) = all.get(index).cloned() else {
            return Err(DeviceError::NoSuchAdapter {
                index,
                available: describe_all(),
            });
        };
        let kind = match kind_of(&lazy) {
            Some(WgpuDeviceKind::DiscreteGpu(i)) => Some(DeviceKind::DiscreteGpu(i)),
            Some(WgpuDeviceKind::IntegratedGpu(i)) => Some(DeviceKind::IntegratedGpu(i)),
            Some(WgpuDeviceKind::VirtualGpu(i)) => Some(DeviceKind::VirtualGpu(i)),
            Some(WgpuDeviceKind::Cpu) => Some(DeviceKind::Cpu),
            _ => None,
        };
        // Initialise explicitly, so a driver that refuses comes back as an error, not as a
        // panic at the first tensor. A runtime already up (opened by an earlier call, or by
        // `describe`) is simply reused.
        let device = match kind {
            Some(kind) => match Device::wgpu_options()
                .device_kind(kind)
                .graphics_api(WgpuBackend::Vulkan)
                .init()
            {
                Ok(device) => device,
                Err(WgpuInitError::Registration { .. }) => lazy,
                Err(e) => {
                    return Err(DeviceError::Open {
                        name: format!("vulkan:{index}"),
                        reason: e.to_string(),
                    });
                }
            },
            None => lazy,
        };
        opened()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(index, device.clone());
        Ok(device)
    }

    fn line(index: usize, device: &Device) -> String {
        let kind = kind_of(device).map(|k| kind_label(&k)).unwrap_or("other");
        let name = device
            .identity()
            .map(|i| i.name)
            .unwrap_or_else(|| "unnamed".into());
        format!("vulkan:{index} {name} ({kind})")
    }

    pub(super) fn describe_all() -> Vec<String> {
        (0..adapters().len())
            .map(|i| match open(i) {
                Ok(device) => line(i, &device),
                Err(e) => format!("vulkan:{i} ({e})"),
            })
            .collect()
    }

    pub(super) fn describe(device: &Device) -> Option<String> {
        let bare = device.clone().without_autodiff();
        let index = adapters().iter().position(|d| *d == bare)?;
        Some(line(index, &bare))
    }
}

#[cfg(not(feature = "vulkan"))]
mod vulkan {
    use burn::tensor::Device;

    use super::DeviceError;

    pub(super) fn open(_index: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt {
            backend: "Vulkan",
            feature: "vulkan",
            how: " (README: GPU backends)",
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

    #[cfg(not(feature = "vulkan"))]
    #[test]
    fn vulkan_without_the_feature_says_how_to_build_it() {
        let e = open("vulkan").unwrap_err();
        assert!(e.to_string().contains("--features vulkan"), "{e}");
        assert!(vulkan_adapters().is_empty());
    }
}
