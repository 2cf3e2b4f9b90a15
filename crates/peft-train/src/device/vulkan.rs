//! Vulkan adapters through Burn's wgpu runtime, pinned to the Vulkan API. With the `vulkan`
//! feature kernels are compiled to SPIR-V by cubecl; with `wgpu` alone they are written in WGSL
//! and translated by wgpu (naga).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use burn::backend::{CubeDevice, DispatchDevice, WgpuDevice, WgpuDeviceKind};
use burn::tensor::wgpu::{WgpuBackend, WgpuInitError};
use burn::tensor::{Device, DeviceKind};

use super::DeviceError;

/// Devices opened so far, by index: a runtime is initialised once per process.
fn opened() -> &'static Mutex<HashMap<usize, Device>> {
    static OPENED: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Every Vulkan adapter, discrete GPUs first, then integrated, virtual, software (the order of
/// Burn's own `Device::enumerate(DeviceType::Vulkan)`, which the `wgpu`-only build lacks).
fn adapters() -> Vec<Device> {
    let mut out: Vec<Device> = Vec::new();
    for kind in [
        WgpuDeviceKind::DiscreteGpu(0),
        WgpuDeviceKind::IntegratedGpu(0),
        WgpuDeviceKind::VirtualGpu(0),
        WgpuDeviceKind::Cpu,
        WgpuDeviceKind::Other(0),
    ] {
        let seed = CubeDevice::Wgpu(WgpuDevice::new(kind).on(WgpuBackend::Vulkan));
        for id in CubeDevice::enumerate(seed.to_id()) {
            let device = Device::new(CubeDevice::from_id(id));
            if !out.contains(&device) {
                out.push(device);
            }
        }
    }
    out
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

/// The SPIR-V build refuses software adapters: cubecl 0.11's SPIR-V compiler declares shared
/// memory with the wrong pointer type on drivers without `VK_KHR_workgroup_memory_explicit_
/// layout` (lavapipe has none; NVIDIA, AMD and Intel drivers have it), and lavapipe segfaults
/// compiling the first matmul. The `wgpu` build (WGSL) runs there.
fn refuse_software_spirv(index: usize, kind: &WgpuDeviceKind) -> Result<(), DeviceError> {
    let forced = std::env::var_os("BURN_PEFT_SPIRV_ON_SOFTWARE").is_some();
    software_spirv_refusal(cfg!(feature = "vulkan"), forced, index, kind)
}

/// The rule of [`refuse_software_spirv`], apart from the build and the environment so that a
/// `wgpu` build can test what a `vulkan` build does.
fn software_spirv_refusal(
    spirv: bool,
    forced: bool,
    index: usize,
    kind: &WgpuDeviceKind,
) -> Result<(), DeviceError> {
    if spirv && !forced && *kind == WgpuDeviceKind::Cpu {
        return Err(DeviceError::SoftwareSpirv {
            name: format!("vulkan:{index}"),
        });
    }
    Ok(())
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
    let wgpu_kind = kind_of(&lazy).unwrap_or(WgpuDeviceKind::Other(0));
    refuse_software_spirv(index, &wgpu_kind)?;
    let kind = match wgpu_kind {
        WgpuDeviceKind::DiscreteGpu(i) => Some(DeviceKind::DiscreteGpu(i)),
        WgpuDeviceKind::IntegratedGpu(i) => Some(DeviceKind::IntegratedGpu(i)),
        WgpuDeviceKind::VirtualGpu(i) => Some(DeviceKind::VirtualGpu(i)),
        WgpuDeviceKind::Cpu => Some(DeviceKind::Cpu),
        _ => None,
    };
    // Initialise explicitly, so a driver that refuses comes back as an error, not as a panic
    // at the first tensor. A runtime already up (opened by an earlier call) is reused.
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
    adapters()
        .iter()
        .enumerate()
        .map(|(i, lazy)| match open(i) {
            Ok(device) => line(i, &device),
            Err(e @ DeviceError::SoftwareSpirv { .. }) => format!("{}: {e}", line(i, lazy)),
            Err(e) => format!("vulkan:{i} ({e})"),
        })
        .collect()
}

pub(super) fn describe(device: &Device) -> Option<String> {
    let bare = device.clone().without_autodiff();
    let index = adapters().iter().position(|d| *d == bare)?;
    Some(line(index, &bare))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_spirv_on_a_software_adapter_is_refused_with_the_way_out() {
        let e = software_spirv_refusal(true, false, 1, &WgpuDeviceKind::Cpu).unwrap_err();
        assert!(matches!(&e, DeviceError::SoftwareSpirv { name } if name == "vulkan:1"));
        assert!(e.to_string().contains("--features wgpu"), "{e}");
        // Forced by the environment, a GPU, or WGSL kernels: no refusal.
        assert!(software_spirv_refusal(true, true, 1, &WgpuDeviceKind::Cpu).is_ok());
        for kind in [
            WgpuDeviceKind::DiscreteGpu(0),
            WgpuDeviceKind::IntegratedGpu(0),
            WgpuDeviceKind::VirtualGpu(0),
        ] {
            assert!(software_spirv_refusal(true, false, 0, &kind).is_ok());
        }
        assert!(software_spirv_refusal(false, false, 0, &WgpuDeviceKind::Cpu).is_ok());
    }
}
