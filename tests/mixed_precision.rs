//! Mixed precision on flex: the frozen base in f16 / bf16, adapters, gradients, optimizer
//! state and saved bundles in f32; full fine-tuning refuses a half-precision base.

mod common;

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Tensor};
use burn_peft::core::PeftModel;
use burn_peft::core::nn::{BASE_ROW, ForwardContext, RowAdapters};
use burn_peft::core::precision::{BaseDType, PrecisionError, cast_frozen_base};
use burn_peft::lora::LoraConfig;
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use burn_peft::train::{TrainConfig, Trainer, checkpoint};
use common::fixture_models::{lm_data, model_dir, model_inputs, with_lora};

fn output(model: &HfModel, inputs: &ModelInputs) -> Vec<f32> {
    let out = model.forward(inputs).unwrap();
    let t = out
        .logits
        .map(|l| l.into_data())
        .or(out.class_logits.map(|l| l.into_data()))
        .or(out.last_hidden_state.map(|l| l.into_data()))
        .unwrap();
    assert_eq!(t.dtype(), DType::F32, "activations leave the model in f32");
    t.try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Counts float parameters by dtype.
#[derive(Default)]
struct Dtypes {
    f32: usize,
    half: usize,
}

impl ModuleVisitor for Dtypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match param.dtype() {
            DType::F32 => self.f32 += 1,
            _ => self.half += 1,
        }
    }
}

#[test]
fn half_precision_base_stays_close_to_f32_on_every_family() {
    let device = Device::flex();
    for name in ["bert", "gpt2", "llama_gqa", "llama_tied"] {
        let inputs = model_inputs(name, &device);
        let reference = output(with_lora(name, &device).model(), &inputs);
        for dtype in [BaseDType::F16, BaseDType::BF16] {
            let mut model = with_lora(name, &device);
            let report = cast_frozen_base(&mut model, dtype, &device).unwrap();
            assert!(report.tensors > 0, "{name}");
            let mut seen = Dtypes::default();
            model.model().visit(&mut seen);
            assert_eq!(
                seen.half, report.tensors,
                "{name}: only the cast tensors are half"
            );
            let got = output(model.model(), &inputs);
            let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, &reference) / scale;
            eprintln!("{name} {dtype}: max |diff| vs f32 {diff:.2e} of the largest output");
            // Rounding the weights: 2^-11 (f16) or 2^-8 (bf16) relative per weight, a few of
            // those through these two-layer models.
            let bound = if dtype == BaseDType::BF16 { 5e-2 } else { 1e-2 };
            assert!(diff > 0.0 && diff < bound, "{name} {dtype}: {diff}");

            // Merging folds the f32 delta into the half-precision weight once.
            model.merge().unwrap();
            let merged = output(model.model(), &inputs);
            let diff = max_abs_diff(&merged, &reference) / scale;
            assert!(diff < bound, "{name} {dtype} merged: {diff}");
        }
    }
}

/// Kernels that read the base weights (DoRA's column norms, its merge) or transform the GEMM's
/// input (IA3 on feed-forward layers), and mixed-adapter batches (one base GEMM, per-row
/// adapters), over an f16 base: close to the f32 model, activations f32.
#[test]
fn dora_ia3_and_mixed_batches_run_over_a_half_precision_base() {
    let device = Device::flex();
    let fixture = |rest: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rest)
    };
    let base = |name: &str| {
        PeftModel::new(
            from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, &device)
                .unwrap()
                .model,
        )
    };
    let bound = 1e-2;
    for (method, case, name) in [
        ("dora", "llama", "llama_gqa"),
        ("dora", "gpt2", "gpt2"),
        ("ia3", "llama", "llama_gqa"),
        ("ia3", "bert_cls", "bert_cls"),
    ] {
        let inputs = model_inputs(name, &device);
        let mut reference = base(name);
        reference
            .load_adapter(fixture(method).join(case), "default")
            .unwrap();
        let expected = output(reference.model(), &inputs);
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let mut model = base(name);
        model
            .load_adapter(fixture(method).join(case), "default")
            .unwrap();
        cast_frozen_base(&mut model, BaseDType::F16, &device).unwrap();
        let diff = max_abs_diff(&output(model.model(), &inputs), &expected) / scale;
        eprintln!("{method} {case} f16: max |diff| vs f32 {diff:.2e} of the largest output");
        assert!(diff > 0.0 && diff < bound, "{method} {case}: {diff}");
        model.merge().unwrap();
        let diff = max_abs_diff(&output(model.model(), &inputs), &expected) / scale;
        assert!(diff < bound, "{method} {case} merged: {diff}");
    }

    // A mixed batch: rows 0 and 2 with DoRA, row 1 with the base alone.
    let name = "llama_gqa";
    let inputs = model_inputs(name, &device);
    let rows = ["default", BASE_ROW, "default"];
    let run = |half: bool| {
        let mut model = base(name);
        model
            .load_adapter(fixture("dora/llama"), "default")
            .unwrap();
        if half {
            cast_frozen_base(&mut model, BaseDType::F16, &device).unwrap();
        }
        let ctx = ForwardContext::mixed(RowAdapters::new(&rows, &device));
        let out = model.model().forward_with(&inputs, &ctx).unwrap();
        let t = out.logits.unwrap().into_data();
        assert_eq!(t.dtype(), DType::F32);
        t.try_to_vec::<f32>().unwrap()
    };
    let expected = run(false);
    let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&run(true), &expected) / scale;
    eprintln!("mixed batch f16: max |diff| vs f32 {diff:.2e} of the largest output");
    assert!(diff > 0.0 && diff < bound, "mixed batch: {diff}");
}

#[test]
fn full_fine_tuning_refuses_a_half_precision_base() {
    let device = Device::flex();
    let base = from_pretrained(model_dir("gpt2").to_str().unwrap(), Task::Auto, &device).unwrap();
    let mut model = PeftModel::new(base.model);
    model.set_train_base(true).unwrap();
    let e = cast_frozen_base(&mut model, BaseDType::F16, &device).unwrap_err();
    assert_eq!(e, PrecisionError::TrainedBase(BaseDType::F16));
    assert!(e.to_string().contains("dtype f32"), "{e}");
}

#[test]
fn training_with_an_f16_base_keeps_adapters_and_optimizer_state_in_f32() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let out = tempfile::tempdir().unwrap();
    let base = from_pretrained(
        model_dir("llama_gqa").to_str().unwrap(),
        Task::CausalLm,
        &device,
    )
    .unwrap()
    .model;
    let mut model = PeftModel::new(base);
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(["q_proj", "v_proj", "down_proj"].into()),
        ..Default::default()
    };
    model.add_adapter("default", &lora).unwrap();
    cast_frozen_base(&mut model, BaseDType::F16, &device).unwrap();
    let mut trainer = Trainer::builder(model, Task::CausalLm)
        .adapters(["default"])
        .config(TrainConfig {
            epochs: 100,
            max_steps: Some(30),
            batch_size: 8,
            learning_rate: 2e-2,
            schedule: burn_peft::train::schedule::Schedule::Constant,
            progress: false,
            ..Default::default()
        })
        .output_dir(out.path().to_path_buf())
        .device(device)
        .build()
        .unwrap();
    let report = trainer.train(&lm_data(32), None, None).unwrap();
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    eprintln!("f16 base: loss {first:.3} -> {last:.3}");
    assert!(last < 0.7 * first, "{first} -> {last}");

    // The bundle and the optimizer moments are f32.
    let bytes = std::fs::read(report.adapter_dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(!st.tensors().is_empty());
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let ckpt = checkpoint::latest(&out.path().join("checkpoints")).unwrap();
    let loaded = checkpoint::load(&ckpt).unwrap();
    assert!(!loaded.optimizer.1.is_empty());
    for (name, data) in &loaded.optimizer.1 {
        assert_eq!(data.dtype(), DType::F32, "{name}");
    }
    for (name, data) in &loaded.params {
        assert_eq!(data.dtype(), DType::F32, "{name}");
    }
}

#[test]
fn unknown_dtype_names_are_typed_errors() {
    let e = "int4".parse::<BaseDType>().unwrap_err();
    assert_eq!(e, PrecisionError::Unknown("int4".into()));
}

/// Rounds every frozen site weight but an untied output head to `dtype` and back to f32: the
/// values a half-precision base holds, in an f32 model.
fn rounded_to(model: &mut PeftModel<HfModel>, dtype: DType) {
    use burn_peft::core::{Adaptable, SiteMut, SitePath};
    let trainable = model.trainable_param_ids().clone();
    let head = model.model().output_layer();
    model.update(|mut m| {
        m.visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
            if head.as_deref() == Some(path.to_string().as_str()) {
                return;
            }
            let weight = match site {
                SiteMut::Linear(l) => &mut l.weight,
                SiteMut::Embedding(e) => &mut e.weight,
                _ => return,
            };
            if !trainable.contains(&weight.id) {
                *weight = weight.clone().map(|t| t.cast(dtype).cast(DType::F32));
            }
        });
        m
    });
}

/// On flex, `apply_base_dtype` (what train / eval / generate / serve use for `dtype: f16` /
/// `bf16`) keeps the frozen linear weights and token tables as half-precision rows behind the
/// CPU kernels, with f32 activations: the output equals the f32 model whose weights are
/// rounded to the same format, up to the order of the sums, on tied and untied heads.
#[test]
fn a_half_precision_base_on_flex_is_the_f32_model_with_rounded_weights() {
    use burn_peft::models::base_dtype::apply_base_dtype;
    let device = Device::flex();
    for name in ["llama_gqa", "llama_tied", "gpt2", "bert"] {
        let inputs = model_inputs(name, &device);
        let unrounded = output(with_lora(name, &device).model(), &inputs);
        for (dtype, burn_dtype) in [(BaseDType::BF16, DType::BF16), (BaseDType::F16, DType::F16)] {
            let mut reference = with_lora(name, &device);
            rounded_to(&mut reference, burn_dtype);
            let expected = output(reference.model(), &inputs);
            assert!(
                max_abs_diff(&expected, &unrounded) > 0.0,
                "{name}: rounding shows"
            );
            let mut model = with_lora(name, &device);
            let report = apply_base_dtype(&mut model, dtype, &device).unwrap();
            assert!(report.cast.tensors > 0, "{name} {dtype}");
            assert!(report.to_string().contains("rows"), "{report}");
            let mut seen = Dtypes::default();
            model.model().visit(&mut seen);
            assert_eq!(seen.half, 0, "{name}: no Burn half tensors, rows instead");
            let got = output(model.model(), &inputs);
            let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, &expected) / scale;
            eprintln!("{name} {dtype} rows: max |diff| vs rounded f32 {diff:.2e}");
            assert!(diff < 1e-5, "{name} {dtype}: {diff}");
        }
    }
}
