//! LoRA and DoRA on convolutions against Hugging Face PEFT 0.21.2 (`lora.Conv2d`), with the
//! fixtures of `tests/fixtures/gen/conv_tiny.py`: a tiny CNN (a strided 3x3 convolution with a
//! bias, a depthwise 3x3, a pointwise 1x1, a linear head). Forward (active, merged, unmerged,
//! disabled), one backward pass's gradients, rsLoRA, a grouped convolution (merge refused, as in
//! PEFT), a mixed-adapter batch, and bundles we write that PEFT loads (`conv/ours`, checked by
//! `conv_tiny.py --check-ours`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};
use burn_peft::core::nn::{
    Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, ForwardContext, Linear, RowAdapters,
};
use burn_peft::core::{Adaptable, AdapterState, PeftModel, Site, SitePath, bundle};
use common::hf::{fixture, read_all};

/// The generator's `TinyCnn`.
#[derive(Module, Debug, Adaptable)]
struct TinyCnn {
    conv1: Conv2d,
    dw: Conv2d,
    pw: Conv2d,
    head: Linear,
}

impl TinyCnn {
    fn forward(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<2> {
        let x = relu(self.conv1.forward_in(x, fc));
        let x = relu(self.dw.forward_in(x, fc));
        let x = relu(self.pw.forward_in(x, fc));
        let [b, c, _, _] = x.dims();
        let pooled = x.mean_dim(2).mean_dim(3).reshape([b, c]);
        self.head.forward_in(pooled, fc)
    }

    /// The base weights of `conv/base.safetensors` (PyTorch layouts; the head transposed).
    fn load(device: &Device) -> Self {
        let tensors = read_all(&dir().join("base.safetensors"));
        let t4 = |k: &str| {
            let (v, s) = &tensors[k];
            Tensor::<4>::from_data(TensorData::new(v.clone(), s.clone()), device)
        };
        let t1 = |k: &str| {
            let (v, s) = &tensors[k];
            Tensor::<1>::from_data(TensorData::new(v.clone(), s.clone()), device)
        };
        let set = |mut conv: Conv2d, name: &str, bias: bool| {
            conv.weight = Param::from_tensor(t4(&format!("{name}.weight")));
            conv.bias = bias.then(|| Param::from_tensor(t1(&format!("{name}.bias"))));
            conv
        };
        let (hv, hs) = &tensors["head.weight"];
        let head = Tensor::<2>::from_data(TensorData::new(hv.clone(), hs.clone()), device);
        Self {
            conv1: set(
                Conv2dConfig::new([3, 8], [3, 3])
                    .with_stride([2, 2])
                    .with_padding([1, 1])
                    .init(device),
                "conv1",
                true,
            ),
            dw: set(
                Conv2dConfig::new([8, 8], [3, 3])
                    .with_padding([1, 1])
                    .with_groups(8)
                    .with_bias(false)
                    .init(device),
                "dw",
                false,
            ),
            pw: set(Conv2dConfig::new([8, 16], [1, 1]).init(device), "pw", true),
            head: Linear::from_tensors(head.transpose(), Some(t1("head.bias"))),
        }
    }
}

fn dir() -> PathBuf {
    fixture("conv")
}

fn pixels(device: &Device) -> Tensor<4> {
    let (v, s) = &read_all(&dir().join("inputs.safetensors"))["pixel_values"];
    Tensor::from_data(TensorData::new(v.clone(), s.clone()), device)
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn logits(model: &PeftModel<TinyCnn>, device: &Device) -> Vec<f32> {
    values(
        model
            .model()
            .forward(pixels(device), &ForwardContext::default()),
    )
}

fn expected(case: &str, key: &str) -> Vec<f32> {
    read_all(&dir().join(case).join("expected.safetensors"))
        .remove(key)
        .unwrap_or_else(|| panic!("{case}: {key}"))
        .0
}

/// Largest difference relative to the reference's largest magnitude (at least 1).
fn scaled_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
        / scale
}

fn close(ours: &[f32], theirs: &[f32], what: &str) {
    let diff = scaled_diff(ours, theirs);
    eprintln!("{what}: max diff {diff:.2e}");
    assert!(diff < 1e-5, "{what}: differs from PEFT by {diff}");
}

fn with_adapter(case: &str, device: &Device) -> PeftModel<TinyCnn> {
    let mut model = PeftModel::new(TinyCnn::load(device));
    model.load_adapter(dir().join(case), "default").unwrap();
    model
}

/// Active, disabled, merged, unmerged, merge_and_unload.
fn forward_parity(case: &str) {
    let device = Device::flex();
    let base = values(TinyCnn::load(&device).forward(pixels(&device), &Default::default()));
    let base_ref = read_all(&dir().join("inputs.safetensors"))["base_logits"]
        .0
        .clone();
    close(&base, &base_ref, &format!("{case} base"));
    let mut model = with_adapter(case, &device);
    let active = logits(&model, &device);
    close(
        &active,
        &expected(case, "logits"),
        &format!("{case} active"),
    );
    model.disable_adapters().unwrap();
    assert_eq!(logits(&model, &device), base, "{case} disabled");
    model.enable_adapters().unwrap();
    model.merge().unwrap();
    let merged = logits(&model, &device);
    close(
        &merged,
        &expected(case, "merged_logits"),
        &format!("{case} merged"),
    );
    model.unmerge().unwrap();
    close(
        &logits(&model, &device),
        &active,
        &format!("{case} unmerged"),
    );
    let unloaded = model.merge_and_unload().unwrap();
    close(
        &values(unloaded.forward(pixels(&device), &Default::default())),
        &merged,
        &format!("{case} merge_and_unload"),
    );
}

#[test]
fn lora_on_convolutions_and_a_linear_head_matches_peft() {
    forward_parity("lora");
}

#[test]
fn dora_on_convolutions_matches_peft() {
    forward_parity("dora");
}

#[test]
fn rslora_on_a_strided_convolution_matches_peft() {
    forward_parity("rslora");
}

#[test]
fn lora_on_a_depthwise_convolution_matches_peft_and_refuses_to_merge() {
    let device = Device::flex();
    let mut model = with_adapter("grouped", &device);
    let active = logits(&model, &device);
    close(&active, &expected("grouped", "logits"), "grouped active");
    let err = model.merge().unwrap_err();
    assert!(err.to_string().contains("groups > 1"), "{err}");
    // Nothing was folded.
    assert_eq!(logits(&model, &device), active);
}

#[test]
fn a_rank_not_divisible_by_the_groups_is_refused_as_in_peft() {
    let device = Device::flex();
    let mut model = PeftModel::new(TinyCnn::load(&device));
    let config = burn_peft::lora::LoraConfig::new(4).targets(["dw"]);
    let err = model.add_adapter("default", &config).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("not divisible") && text.contains("dw"),
        "{text}"
    );
}

/// The gradient of every adapter tensor, in the bundle's names and layouts.
fn adapter_grads(
    model: &PeftModel<TinyCnn>,
    grads: &burn::tensor::Gradients,
) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    model
        .model()
        .visit_sites(&mut SitePath::root(), &mut |path, site| {
            let adapters: &[AdapterState] = match site {
                Site::Linear(l) => &l.adapters,
                Site::Conv2d(c) => &c.adapters,
                _ => return,
            };
            for adapter in adapters {
                let mut as_grads = adapter.clone();
                for p in as_grads.matrices.iter_mut() {
                    *p = Param::from_tensor(p.val().grad(grads).expect("a gradient"));
                }
                for p in as_grads.vectors.iter_mut() {
                    *p = Param::from_tensor(p.val().grad(grads).expect("a gradient"));
                }
                for (suffix, data) in adapter.kernel.export(&as_grads) {
                    out.insert(
                        format!("base_model.model.{path}.{suffix}"),
                        data.try_to_vec::<f32>().unwrap(),
                    );
                }
            }
        });
    out
}

fn gradient_parity(case: &str) {
    let device = Device::flex().autodiff();
    let mut model = with_adapter(case, &device);
    model.set_adapter_trainable("default", true).unwrap();
    let (pv, ps) = &read_all(&dir().join("inputs.safetensors"))["probe"];
    let probe = Tensor::<2>::from_data(TensorData::new(pv.clone(), ps.clone()), &device);
    let out = model
        .model()
        .forward(pixels(&device), &ForwardContext::default());
    let loss = (out * probe).sum();
    let ours_loss = loss.clone().into_data().try_to_vec::<f32>().unwrap();
    close(&ours_loss, &expected(case, "loss"), &format!("{case} loss"));
    let grads = loss.backward();
    let ours = adapter_grads(&model, &grads);
    let theirs = read_all(&dir().join(case).join("grads.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{case}: gradient keys"
    );
    for (key, (values, _)) in &theirs {
        close(&ours[key], values, &format!("{case} grad {key}"));
    }
}

#[test]
fn lora_gradients_on_convolutions_match_peft() {
    gradient_parity("lora");
}

#[test]
fn dora_gradients_on_convolutions_match_peft() {
    gradient_parity("dora");
}

#[test]
fn grouped_lora_gradients_match_peft() {
    gradient_parity("grouped");
}

/// A batch whose images run different adapters gives each image what that adapter alone gives
/// it, through the convolutions as through the linear head.
#[test]
fn a_mixed_batch_of_convolution_adapters_runs_each_image_with_its_own() {
    let device = Device::flex();
    let mut model = with_adapter("lora", &device);
    model.load_adapter(dir().join("dora"), "dora").unwrap();
    model
        .load_adapter(dir().join("grouped"), "grouped")
        .unwrap();
    let x = pixels(&device);
    let x = Tensor::cat(vec![x.clone(), x.clone()], 0); // 4 images: 2 pairs
    let names = ["default", "grouped", "__base__", "dora"];
    let rows = RowAdapters::new(&names, &device);
    let mixed = values(
        model
            .model()
            .forward(x.clone(), &ForwardContext::mixed(rows)),
    );
    for (i, name) in names.iter().enumerate() {
        let one = x.clone().narrow(0, i, 1);
        let single = if *name == "__base__" {
            model.disable_adapters().unwrap();
            let out = model.model().forward(one, &Default::default());
            model.enable_adapters().unwrap();
            out
        } else {
            model.set_adapter(name).unwrap();
            model.model().forward(one, &Default::default())
        };
        close(
            &mixed[i * 5..i * 5 + 5],
            &values(single),
            &format!("row {i} ({name})"),
        );
    }
}

fn write_ours(case: &str, out: &Path) {
    let device = Device::flex();
    let mut model = with_adapter(case, &device);
    // Our own numbers: move every adapter tensor, so the bundle is not PEFT's file copied.
    model.set_adapter_trainable("default", true).unwrap();
    model.update(|m| m.map(&mut Nudge));
    assert_ne!(
        logits(&model, &device),
        expected(case, "logits"),
        "{case}: the nudge moved nothing"
    );
    let folder = out.join(case);
    model.save_adapter(&folder, "default").unwrap();
    // The flat layout `conv_tiny.py --check-ours` reads: the bundle files at the top.
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let nested = folder.join("default").join(file);
        if nested.exists() {
            std::fs::rename(&nested, folder.join(file)).unwrap();
        }
    }
    let active = logits(&model, &device);
    let mut outputs = BTreeMap::from([("logits".to_string(), TensorData::new(active, vec![2, 5]))]);
    if model.merge().is_ok() {
        let merged = logits(&model, &device);
        outputs.insert("merged_logits".into(), TensorData::new(merged, vec![2, 5]));
    }
    std::fs::write(
        folder.join("expected.safetensors"),
        bundle::encode_safetensors(&outputs).unwrap(),
    )
    .unwrap();
}

/// Multiplies every adapter tensor by 1.1 (base weights are frozen and left alone).
struct Nudge;

impl burn::module::ModuleMapper for Nudge {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if param.is_require_grad() {
            param.map(|t| t.mul_scalar(1.1))
        } else {
            param
        }
    }
}

/// `cargo test --test conv_parity -- --ignored write_ours_fixture`, then
/// `python tests/fixtures/gen/conv_tiny.py --check-ours`.
#[test]
#[ignore = "writes tests/fixtures/conv/ours; run by hand, then conv_tiny.py --check-ours"]
fn write_ours_fixture() {
    let out = dir().join("ours");
    for case in ["lora", "dora", "grouped"] {
        write_ours(case, &out);
    }
}

/// The committed bundles we wrote (which `conv_tiny.py --check-ours` confirmed PEFT loads to the
/// same outputs) still load here to the outputs we recorded, active and merged.
#[test]
fn our_committed_bundles_reproduce_our_recorded_outputs() {
    let device = Device::flex();
    for case in ["lora", "dora", "grouped"] {
        let folder = dir().join("ours").join(case);
        let mut model = PeftModel::new(TinyCnn::load(&device));
        model.load_adapter(&folder, "default").unwrap();
        let recorded = read_all(&folder.join("expected.safetensors"));
        close(
            &logits(&model, &device),
            &recorded["logits"].0,
            &format!("ours {case}"),
        );
        if let Some((merged, _)) = recorded.get("merged_logits") {
            model.merge().unwrap();
            close(
                &logits(&model, &device),
                merged,
                &format!("ours {case} merged"),
            );
        }
    }
}

/// The generator's `TinyCnn` written with Burn's own layers (`burn::nn::conv::Conv2d`,
/// `burn::nn::Linear`), for the weight-space path of plain Burn modules.
#[derive(Module, Debug)]
struct PlainCnn {
    conv1: burn::nn::conv::Conv2d,
    dw: burn::nn::conv::Conv2d,
    pw: burn::nn::conv::Conv2d,
    head: burn::nn::Linear,
}

impl PlainCnn {
    fn from(adapted: TinyCnn, device: &Device) -> Self {
        use burn::nn::PaddingConfig2d;
        use burn::nn::conv::Conv2dConfig as BurnConv2dConfig;
        let plain =
            |conv: Conv2d, channels: [usize; 2], groups: usize, stride: usize, pad: usize| {
                let mut layer = BurnConv2dConfig::new(channels, [conv.dims()[2], conv.dims()[3]])
                    .with_stride([stride, stride])
                    .with_groups(groups)
                    .with_bias(conv.bias.is_some())
                    .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                    .init(device);
                layer.weight = conv.weight;
                layer.bias = conv.bias;
                layer
            };
        let mut head = burn::nn::LinearConfig::new(16, 5).init(device);
        head.weight = adapted.head.weight;
        head.bias = adapted.head.bias;
        Self {
            conv1: plain(adapted.conv1, [3, 8], 1, 2, 1),
            dw: plain(adapted.dw, [8, 8], 8, 1, 1),
            pw: plain(adapted.pw, [8, 16], 1, 1, 0),
            head,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu(self.conv1.forward(x));
        let x = relu(self.dw.forward(x));
        let x = relu(self.pw.forward(x));
        let [b, c, _, _] = x.dims();
        self.head.forward(x.mean_dim(2).mean_dim(3).reshape([b, c]))
    }
}

/// PEFT's conv bundles on a model of Burn's own `Conv2d` layers (the weight-space path): the
/// same outputs as PEFT, active and merged.
#[test]
fn peft_conv_bundles_load_onto_plain_burn_conv2d_layers() {
    use burn_peft::core::burn_modules::PeftModule;
    let device = Device::flex();
    for case in ["lora", "dora", "rslora"] {
        let mut model = PeftModule::new(PlainCnn::from(TinyCnn::load(&device), &device));
        model.load_adapter(dir().join(case), "default").unwrap();
        let active = values(model.model().forward(pixels(&device)));
        close(
            &active,
            &expected(case, "logits"),
            &format!("plain {case} active"),
        );
        model.merge().unwrap();
        let merged = values(model.model().forward(pixels(&device)));
        close(
            &merged,
            &expected(case, "merged_logits"),
            &format!("plain {case} merged"),
        );
    }
}

/// The generator `conv1d_tiny.py`'s `TinyConv1d`.
#[derive(Module, Debug, Adaptable)]
struct TinyConv1d {
    conv_a: Conv1d,
    conv_b: Conv1d,
    head: Linear,
}

impl TinyConv1d {
    fn load(device: &Device) -> Self {
        let tensors = read_all(&fixture("conv1d/base.safetensors"));
        let t = |k: &str| {
            let (v, s) = &tensors[k];
            TensorData::new(v.clone(), s.clone())
        };
        let mut conv_a = Conv1dConfig::new(4, 6, 3)
            .with_stride(2)
            .with_padding(1)
            .init(device);
        conv_a.weight = Param::from_tensor(Tensor::from_data(t("conv_a.weight"), device));
        conv_a.bias = Some(Param::from_tensor(Tensor::from_data(
            t("conv_a.bias"),
            device,
        )));
        let mut conv_b = Conv1dConfig::new(6, 6, 3)
            .with_padding(1)
            .with_groups(3)
            .with_bias(false)
            .init(device);
        conv_b.weight = Param::from_tensor(Tensor::from_data(t("conv_b.weight"), device));
        let head = Tensor::<2>::from_data(t("head.weight"), device);
        Self {
            conv_a,
            conv_b,
            head: Linear::from_tensors(
                head.transpose(),
                Some(Tensor::from_data(t("head.bias"), device)),
            ),
        }
    }

    fn forward(&self, x: Tensor<3>, fc: &ForwardContext) -> Tensor<2> {
        let x = relu(self.conv_a.forward_in(x, fc));
        let x = relu(self.conv_b.forward_in(x, fc));
        let [b, c, _] = x.dims();
        self.head.forward_in(x.mean_dim(2).reshape([b, c]), fc)
    }
}

fn sequence(device: &Device) -> Tensor<3> {
    let (v, s) = &read_all(&fixture("conv1d/inputs.safetensors"))["sequence"];
    Tensor::from_data(TensorData::new(v.clone(), s.clone()), device)
}

/// LoRA (grouped too) and DoRA on `nn.Conv1d` as PEFT's `lora.Conv1d`: active, merged (refused
/// for the grouped layer, as in PEFT), a mixed batch, and our bundle read back.
#[test]
fn lora_and_dora_on_conv1d_match_peft() {
    let device = Device::flex();
    let base = values(TinyConv1d::load(&device).forward(sequence(&device), &Default::default()));
    let reference = &read_all(&fixture("conv1d/inputs.safetensors"))["base_logits"].0;
    close(&base, reference, "conv1d base");
    for (case, merges) in [("lora", false), ("lora_a", true), ("dora", true)] {
        let folder = fixture("conv1d").join(case);
        let expected = read_all(&folder.join("expected.safetensors"));
        let mut model = PeftModel::new(TinyConv1d::load(&device));
        model.load_adapter(&folder, "default").unwrap();
        let run = |m: &PeftModel<TinyConv1d>| {
            values(m.model().forward(sequence(&device), &Default::default()))
        };
        let active = run(&model);
        close(
            &active,
            &expected["logits"].0,
            &format!("conv1d {case} active"),
        );
        // Saved by us, read back: the same outputs.
        let saved = tempfile::tempdir().unwrap();
        model.save_adapter(saved.path(), "default").unwrap();
        let mut again = PeftModel::new(TinyConv1d::load(&device));
        again.load_adapter(saved.path(), "default").unwrap();
        close(
            &run(&again),
            &active,
            &format!("conv1d {case} saved and read"),
        );
        if merges {
            model.merge().unwrap();
            close(
                &run(&model),
                &expected["merged_logits"].0,
                &format!("conv1d {case} merged"),
            );
        } else {
            let err = model.merge().unwrap_err().to_string();
            assert!(err.contains("groups > 1"), "{err}");
        }
    }
    // A mixed batch: row 0 the grouped LoRA, row 1 the base model.
    let mut model = PeftModel::new(TinyConv1d::load(&device));
    model
        .load_adapter(fixture("conv1d/lora"), "default")
        .unwrap();
    let rows = RowAdapters::new(&["default", "__base__"], &device);
    let mixed = values(
        model
            .model()
            .forward(sequence(&device), &ForwardContext::mixed(rows)),
    );
    let lora = &read_all(&fixture("conv1d/lora/expected.safetensors"))["logits"].0;
    close(&mixed[..3], &lora[..3], "conv1d mixed row 0");
    close(&mixed[3..], &base[3..], "conv1d mixed row 1");
}
