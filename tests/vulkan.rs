//! The GPU code path on Vulkan (lavapipe in CI): a LoRA training step whose gradients match
//! flex's, checkpoints that move between Vulkan and flex, and a half-precision frozen base.
//! The parity fixtures themselves run on Vulkan through `models_parity` / `prefix_parity` with
//! `BURN_PEFT_TEST_DEVICE=vulkan` (`.ci/run`).
//!
//! Built without a Vulkan backend (`--features wgpu`, WGSL kernels, runs on lavapipe;
//! `--features vulkan`, SPIR-V kernels, needs a GPU driver with explicit workgroup layouts),
//! the GPU tests here are ignored (the test count says they did not run). Built with one, on a
//! machine without a Vulkan adapter, they print `SKIPPED ...` and pass, unless
//! `BURN_PEFT_REQUIRE_VULKAN` is set (CI sets it).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_peft::core::nn::{ForwardContext, IdBounds};
use burn_peft::core::precision::{BaseDType, PrecisionError, cast_frozen_base};
use burn_peft::core::{Adaptable, PeftModel, Site, SitePath};
use burn_peft::lora::LoraConfig;
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use burn_peft::train::optim::trainable_paths;
use burn_peft::train::{TrainConfig, Trainer, causal_lm_loss, checkpoint, classification_loss};
use common::fixture_models::{lm_data, model_dir, model_inputs, with_lora};

/// Loss of one batch: next-token cross-entropy on the real tokens (causal LM) or against
/// label `row % classes` (classifier).
fn loss(model: &HfModel, inputs: &ModelInputs) -> Tensor<1> {
    let out = model.forward(inputs).unwrap();
    if let Some(logits) = out.logits {
        let mask = inputs.attention_mask.clone().unwrap();
        let labels = inputs.input_ids.clone().mask_fill(mask.equal_elem(0), -100);
        return causal_lm_loss(logits, labels).0;
    }
    let logits = out.class_logits.expect("a head");
    let [b, c] = logits.dims();
    let labels: Vec<i64> = (0..b).map(|i| (i % c) as i64).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), &logits.device());
    classification_loss(logits, labels)
}

/// The loss and the gradient of every trainable tensor, by module path, after one backward.
fn step_gradients(name: &str, device: &Device) -> (f32, BTreeMap<String, Vec<f32>>) {
    let device = device.clone().autodiff();
    let model = with_lora(name, &device);
    let inputs = model_inputs(name, &device);
    let loss = loss(model.model(), &inputs);
    let value = loss.clone().into_scalar::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), model.model());
    let mut out = BTreeMap::new();
    for (id, path, rank) in trainable_paths(model.model(), model.trainable_param_ids()) {
        let data = match rank {
            1 => grads.get::<1>(id).map(|g| g.into_data()),
            2 => grads.get::<2>(id).map(|g| g.into_data()),
            _ => None,
        };
        let data = data.unwrap_or_else(|| panic!("{name}: no gradient for {path}"));
        out.insert(path, data.convert::<f32>().try_to_vec::<f32>().unwrap());
    }
    (value, out)
}

fn assert_gradients_match_flex(name: &str) {
    let Some(vulkan) = common::device_or_skip("vulkan", name) else {
        return;
    };
    let (loss_flex, flex) = step_gradients(name, &Device::flex());
    let (loss_vk, vk) = step_gradients(name, &vulkan);
    assert!(
        (loss_flex - loss_vk).abs() < 1e-4,
        "{name}: loss {loss_vk} on Vulkan, {loss_flex} on flex"
    );
    assert_eq!(
        flex.keys().collect::<Vec<_>>(),
        vk.keys().collect::<Vec<_>>()
    );
    let mut worst = (0.0f32, String::new());
    let mut largest = 0.0f32;
    for (path, want) in &flex {
        let got = &vk[path];
        assert!(
            want.iter().any(|v| *v != 0.0),
            "{name}: zero gradient for {path}"
        );
        largest = want.iter().fold(largest, |m, v| m.max(v.abs()));
        let diff = common::max_diff(got, want);
        if diff > worst.0 {
            worst = (diff, path.clone());
            if std::env::var_os("BURN_PEFT_DEBUG_GRADS").is_some() {
                let i = (0..got.len())
                    .max_by(|&a, &b| {
                        (got[a] - want[a])
                            .abs()
                            .total_cmp(&(got[b] - want[b]).abs())
                    })
                    .unwrap();
                eprintln!(
                    "{path}[{i}] of {}: Vulkan {} flex {}",
                    got.len(),
                    got[i],
                    want[i]
                );
            }
        }
    }
    eprintln!(
        "{name}: {} gradients (largest |g| {largest:.3}), loss {loss_vk:.6}, max |Vulkan - flex| {:.2e} ({})",
        flex.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "{name}: gradient {} differs by {}",
        worst.1,
        worst.0
    );
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn lora_step_gradients_on_vulkan_match_flex_llama_gqa() {
    assert_gradients_match_flex("llama_gqa");
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn lora_step_gradients_on_vulkan_match_flex_bert_classifier() {
    assert_gradients_match_flex("bert_cls");
}

fn lm_trainer(device: &Device, out: &Path, max_steps: u64) -> Trainer<HfModel> {
    let device = device.clone().autodiff();
    let config = TrainConfig {
        epochs: 100,
        max_steps: Some(max_steps),
        batch_size: 4,
        learning_rate: 1e-2,
        schedule: burn_peft::train::schedule::Schedule::Constant,
        save_every: Some(1),
        keep_last: 10,
        progress: false,
        ..Default::default()
    };
    device.seed(config.seed);
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
        target_modules: Some(["q_proj", "v_proj"].into()),
        ..Default::default()
    };
    model.add_adapter("default", &lora).unwrap();
    Trainer::builder(model, Task::CausalLm)
        .adapters(["default"])
        .config(config)
        .output_dir(out.to_path_buf())
        .device(device)
        .build()
        .unwrap()
}

fn adapter_tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-4, "{what}: losses {a:?} vs {b:?}");
    }
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn checkpoint_written_on_vulkan_resumes_on_flex_and_back() {
    let Some(vulkan) = common::device_or_skip("vulkan", "checkpoint round trip") else {
        return;
    };
    let flex = Device::flex();
    let data = lm_data(32);
    let root = tempfile::tempdir().unwrap();
    let run = |device: &Device, out: &Path, steps: u64, resume: Option<&Path>| {
        let mut t = lm_trainer(device, out, steps);
        t.train(&data, None, resume).unwrap()
    };

    // Two steps on Vulkan.
    let vk_out = root.path().join("vulkan");
    let first = run(&vulkan, &vk_out, 2, None);
    let ckpt = checkpoint::latest(&vk_out.join("checkpoints")).unwrap();
    assert_eq!(first.losses.len(), 2);

    // On flex, the checkpoint restores the very tensors Vulkan trained (0 steps left: the
    // adapter written is the restored one).
    let same = root.path().join("flex-same");
    let restored = run(&flex, &same, 2, Some(&ckpt));
    assert_eq!(restored.steps, 2);
    assert_eq!(
        adapter_tensors(&same.join("adapter")),
        adapter_tensors(&vk_out.join("adapter")),
        "flex restored other tensors than Vulkan saved"
    );

    // Continuing to step 4 on flex and on Vulkan from that checkpoint gives the same losses
    // (moments and step count came along: a fresh optimizer would move differently).
    let flex_out = root.path().join("flex");
    let on_flex = run(&flex, &flex_out, 4, Some(&ckpt));
    let on_vk = run(&vulkan, &root.path().join("vulkan-4"), 4, Some(&ckpt));
    close(
        &on_flex.losses,
        &on_vk.losses,
        "steps 1-4, resumed on flex / on Vulkan",
    );
    close(&on_flex.losses[..2], &first.losses, "history kept");

    // And back: flex's step-4 checkpoint resumes on Vulkan.
    let flex_ckpt = checkpoint::latest(&flex_out.join("checkpoints")).unwrap();
    let back = run(&vulkan, &root.path().join("back"), 5, Some(&flex_ckpt));
    let reference = run(&flex, &root.path().join("flex-5"), 5, Some(&flex_ckpt));
    assert_eq!(back.steps, 5);
    close(
        &back.losses,
        &reference.losses,
        "step 5 on Vulkan / on flex",
    );
    eprintln!("losses (Vulkan 1-2, flex 3-4, Vulkan 5): {:?}", back.losses);
}

fn logits(model: &HfModel, inputs: &ModelInputs) -> Vec<f32> {
    let out = model.forward(inputs).unwrap().logits.unwrap();
    out.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn half_precision_base_on_vulkan_where_the_device_has_it() {
    let Some(vulkan) = common::device_or_skip("vulkan", "half precision on Vulkan") else {
        return;
    };
    let inputs = model_inputs("llama_gqa", &vulkan);
    let reference = logits(with_lora("llama_gqa", &vulkan).model(), &inputs);
    for dtype in [BaseDType::F16, BaseDType::BF16] {
        let mut model = with_lora("llama_gqa", &vulkan);
        match cast_frozen_base(&mut model, dtype, &vulkan) {
            Ok(report) => {
                assert!(report.tensors > 0);
                let got = logits(model.model(), &inputs);
                let diff = common::max_diff(&got, &reference);
                eprintln!("{dtype} base on Vulkan: max |diff| vs f32 {diff:.2e}");
                assert!(diff < 5e-2 && diff > 0.0, "{dtype}: {diff}");
                let mut head = None;
                model
                    .model()
                    .visit_sites(&mut SitePath::root(), &mut |path, site| {
                        if let Site::Linear(l) = site
                            && path.to_string() == "model.layers.0.self_attn.q_proj"
                        {
                            head = Some(l.clone());
                        }
                    });
                let head = head.expect("llama_gqa has model.layers.0.self_attn.q_proj");
                assert_eq!(head.weight.dtype(), DType::from(dtype.float_dtype()));
                assert_eq!(head.adapters[0].matrices[0].dtype(), DType::F32);
            }
            Err(e @ PrecisionError::Unsupported { .. }) => {
                assert!(!vulkan.supports_dtype(dtype.float_dtype()));
                eprintln!("{dtype} on Vulkan refused: {e}");
                assert!(e.to_string().contains("use dtype f32"), "{e}");
            }
            Err(e) => panic!("{dtype}: {e}"),
        }
    }
}

/// The ids of `inputs` with the last id of row 0 replaced by `id`.
fn with_last_id(inputs: &ModelInputs, id: i64) -> (ModelInputs, IdBounds) {
    let [b, s] = inputs.input_ids.dims();
    let mut ids: Vec<i64> = inputs
        .input_ids
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    ids[s - 1] = id;
    let bounds = IdBounds::of(ids.iter().copied()).unwrap();
    let device = inputs.input_ids.device();
    let mut out = inputs.clone();
    out.input_ids = Tensor::from_data(TensorData::new(ids, [b, s]), &device);
    (out, bounds)
}

/// Host-side id bounds (what the trainer, generation and the server pass so that a GPU forward
/// need not read the ids back) change no output, and ids out of range are still an error
/// naming the position: with honest bounds on any device, and on flex even with wrong ones.
fn check_host_id_bounds(device: &Device, trust_bounds: bool) {
    let model = with_lora("llama_gqa", device);
    let inputs = model_inputs("llama_gqa", device);
    let ids: Vec<i64> = inputs
        .input_ids
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let bounds = IdBounds::of(ids).unwrap();
    let plain = logits(model.model(), &inputs);
    let fc = ForwardContext::default().with_id_bounds(bounds, None);
    let out = model
        .model()
        .forward_with(&inputs, &fc)
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(
        out.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap(),
        plain
    );

    let vocab = model.model().vocab_size() as i64;
    let (bad, honest) = with_last_id(&inputs, vocab);
    let e = model
        .model()
        .forward_with(
            &bad,
            &ForwardContext::default().with_id_bounds(honest, None),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!("id {vocab} at row 0")),
        "{e}"
    );
    if !trust_bounds {
        // Flex ignores the bounds and reads: bounds that claim every id is fine cannot make
        // the CPU look up a row the table does not have.
        let lying = IdBounds { min: 0, max: 1 };
        let e = model
            .model()
            .forward_with(&bad, &ForwardContext::default().with_id_bounds(lying, None))
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("id {vocab} at row 0")),
            "{e}"
        );
    }
}

/// Host-side id bounds on flex: the forward reads the ids whatever bounds it is given.
#[test]
fn host_id_bounds_change_nothing_and_bad_ids_still_fail_on_flex() {
    check_host_id_bounds(&Device::flex(), false);
}

/// Host-side id bounds on Vulkan, where honest bounds replace the read.
#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn host_id_bounds_change_nothing_and_bad_ids_still_fail_on_vulkan() {
    let Some(vulkan) = common::device_or_skip("vulkan", "host id bounds on Vulkan") else {
        return;
    };
    check_host_id_bounds(&vulkan, true);
}

/// One op's input gradient on `device`, for a fixed input and a fixed upstream gradient.
fn op_gradient(
    device: &Device,
    op: &dyn Fn(Tensor<4>) -> Tensor<4>,
    values: &[f32],
    shape: [usize; 4],
) -> (Vec<f32>, Vec<f32>) {
    let device = device.clone().autodiff();
    let x = Tensor::<4>::from_data(TensorData::new(values.to_vec(), shape), &device).require_grad();
    let y = op(x.clone());
    let n = y.shape().num_elements();
    let weights: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let w = Tensor::<4>::from_data(TensorData::new(weights, y.dims()), &device);
    let out = y
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let grads = (y * w).sum().backward();
    let g = x.grad(&grads).unwrap();
    (
        out,
        g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
    )
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn op_gradients_on_vulkan_match_flex() {
    use burn::tensor::activation::{silu, softmax};
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn_peft::models::ops::gelu;
    let Some(vulkan) = common::device_or_skip("vulkan", "op gradients") else {
        return;
    };
    let shape = [2, 2, 5, 8];
    let values: Vec<f32> = (0..160)
        .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let norm = |x: Tensor<4>| {
        let mean = x.clone().mean_dim(3);
        let centered = x - mean;
        let var = centered.clone().powf_scalar(2.0).mean_dim(3);
        centered / (var + 1e-12).sqrt()
    };
    let mask = |x: &Tensor<4>| {
        let keep = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 1, 1, 0, 0, 1, 1, 1, 1, 1], [2, 5]),
            &x.device(),
        );
        keep.equal_elem(0)
            .reshape([2, 1, 1, 5])
            .expand([2, 2, 5, 5])
    };
    let sdpa = |causal: bool, masked: bool| {
        move |x: Tensor<4>| {
            let m = masked.then(|| mask(&x));
            let k = x.clone().mul_scalar(0.5);
            let v = x.clone().tanh();
            attention(
                x,
                k,
                v,
                m,
                None,
                AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal: causal,
                },
            )
        }
    };
    type Op = Box<dyn Fn(Tensor<4>) -> Tensor<4>>;
    let cases: Vec<(&str, Op)> = vec![
        // Burn's own gelu has the tanh approximation's derivative on cubecl backends; the
        // models use `ops::gelu` (the erf composition there).
        ("gelu (burn_peft::models::ops)", Box::new(gelu::<4>)),
        ("silu", Box::new(silu)),
        ("tanh", Box::new(|x: Tensor<4>| x.tanh())),
        ("erf", Box::new(|x: Tensor<4>| x.erf())),
        ("softmax", Box::new(|x: Tensor<4>| softmax(x, 3))),
        ("layer-norm (decomposed)", Box::new(norm)),
        ("attention", Box::new(sdpa(false, false))),
        ("attention, padding mask", Box::new(sdpa(false, true))),
        ("attention, causal", Box::new(sdpa(true, false))),
        ("attention, causal + padding", Box::new(sdpa(true, true))),
    ];
    let mut failures = Vec::new();
    for (name, op) in &cases {
        let (y_flex, g_flex) = op_gradient(&Device::flex(), op.as_ref(), &values, shape);
        let (y_vk, g_vk) = op_gradient(&vulkan, op.as_ref(), &values, shape);
        let (dy, dg) = (
            common::max_diff(&y_vk, &y_flex),
            common::max_diff(&g_vk, &g_flex),
        );
        eprintln!("{name}: forward {dy:.1e}, gradient {dg:.1e}");
        if dy > 1e-5 || dg > 1e-5 {
            failures.push(format!("{name} (forward {dy:.1e}, gradient {dg:.1e})"));
        }
    }
    assert!(
        failures.is_empty(),
        "Vulkan differs from flex: {failures:?}"
    );
}

/// Tests of this file that need no GPU and run in every build.
const RUNS_ANYWHERE: &[&str] = &["host_id_bounds_change_nothing_and_bad_ids_still_fail_on_flex"];

/// Built without a GPU feature the tests above cannot run (there is no Vulkan device to
/// open): they are ignored there, so the test count says what ran. They used to print
/// `SKIPPED` and count as passed.
#[cfg(not(any(feature = "vulkan", feature = "wgpu")))]
#[test]
fn without_a_gpu_feature_the_gpu_tests_are_ignored() {
    common::gpu_tests::assert_gpu_tests_ignored(RUNS_ANYWHERE);
}
