//! The plugin boundary: a PEFT method defined outside the workspace crates (here, in this test
//! file) registers itself through typetag and is injected, trained one optimizer step, saved,
//! reloaded and merged through the same `PeftModel` API as LoRA, with no change to `peft-core`.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_peft::core::nn::{Linear, LinearConfig};
use burn_peft::core::{
    Adaptable, AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError,
    PeftMethod, PeftModel, Result, SiteInfo, SiteKind, TargetModules, TargetSpec, TensorSource,
    bundle, peft_type_of,
};
// Link the LoRA crate so its `LORA` registration is part of this program.
use burn_peft::lora as _;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// The out-of-tree method.
// ---------------------------------------------------------------------------------------------

/// IA3-style output scaling: at each targeted linear site a learned vector `l` (`[d_out]`)
/// scales the output, `y = base(x) ⊙ l`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Scale {
    /// Modules to adapt.
    pub target_modules: Option<TargetModules>,
    /// `true`: `l` starts at ones (a no-op); `false`: uniform in `[0.5, 1.5)`.
    pub init_ia3_weights: bool,
}

impl Default for Ia3Scale {
    fn default() -> Self {
        Self {
            target_modules: None,
            init_ia3_weights: true,
        }
    }
}

/// Export name of the scale vector, relative to the site.
const IA3_KEY: &str = "ia3_l";

#[typetag::serde(name = "IA3_SCALE")]
impl PeftMethod for Ia3Scale {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.target_modules.is_none() {
            return Err(PeftError::invalid_config(
                "target_modules",
                "missing: name the modules to scale",
            ));
        }
        Ok(())
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::Linear { .. })
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let SiteKind::Linear { d_output, .. } = site.kind else {
            return Err(PeftError::UnsupportedSite {
                path: site.path.clone(),
                kind: site.kind.name().into(),
                method: "IA3_SCALE".into(),
            });
        };
        let l = if self.init_ia3_weights {
            Tensor::<1>::ones([d_output], &site.device)
        } else {
            Tensor::<1>::random([d_output], Distribution::Uniform(0.5, 1.5), &site.device)
        };
        Ok(AdapterState::new(
            name,
            vec![],
            vec![l],
            Arc::new(Ia3ScaleKernel),
        ))
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

/// The behaviour of [`Ia3Scale`] at a linear site; `vectors[0]` is `l`.
#[derive(Debug)]
pub struct Ia3ScaleKernel;

impl Ia3ScaleKernel {
    /// `l` as a `[1, d_out]` row, broadcast over rows.
    fn row(state: &AdapterState) -> Tensor<2> {
        state.vectors[0].val().unsqueeze::<2>()
    }
}

impl AdapterKernel for Ia3ScaleKernel {
    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        _x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        y * Self::row(state)
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let base = site.current;
        let l = state.vectors[0].val();
        let row = Self::row(state);
        Ok(match direction {
            MergeDirection::Merge => BaseWeights {
                weight: base.weight * row,
                bias: base.bias.map(|b| b * l),
            },
            MergeDirection::Unmerge => BaseWeights {
                weight: base.weight / row,
                bias: base.bias.map(|b| b / l),
            },
        })
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![(IA3_KEY.into(), state.vectors[0].val().into_data())]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let [d_out] = state.vectors[0].dims();
        let data = source.take(IA3_KEY, &[d_out])?;
        let param: &mut Param<Tensor<1>> = &mut state.vectors[0];
        let tensor = Tensor::<1>::from_data(data, &param.lazy_device());
        *param = param.clone().map(|_| tensor);
        Ok(state)
    }
}

// ---------------------------------------------------------------------------------------------
// A small model.
// ---------------------------------------------------------------------------------------------

/// One block: `fc2(relu(fc1(x)))`.
#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Block {
    /// First projection.
    pub fc1: Linear,
    /// Second projection (the adapted one).
    pub fc2: Linear,
}

/// A stack of blocks; Hugging Face paths are `layers.{i}.fc{1,2}`.
#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Net {
    /// The blocks.
    pub layers: Vec<Block>,
}

impl Net {
    /// `[batch, seq, 4] -> [batch, seq, 3]`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.layers
            .iter()
            .fold(x, |x, b| b.fc2.forward(relu(b.fc1.forward(x))))
    }
}

/// `(d_in, d_hidden, d_out)` of each block; each block's `d_out` is the next one's `d_in`.
const BLOCKS: [(usize, usize, usize); 2] = [(4, 8, 6), (6, 5, 3)];

fn build_net(device: &Device) -> Net {
    let layers = BLOCKS
        .iter()
        .map(|&(d_in, d_hidden, d_out)| Block {
            fc1: LinearConfig::new(d_in, d_hidden).init(device),
            fc2: LinearConfig::new(d_hidden, d_out).init(device),
        })
        .collect();
    Net { layers }
}

fn ia3_fc2() -> Ia3Scale {
    Ia3Scale {
        target_modules: Some(["fc2"].into()),
        ..Default::default()
    }
}

/// Every base weight and bias, in order.
fn base_weights(net: &Net) -> Vec<TensorData> {
    let mut out = Vec::new();
    for block in &net.layers {
        for fc in [&block.fc1, &block.fc2] {
            out.push(fc.weight.val().into_data());
            out.push(
                fc.bias
                    .as_ref()
                    .expect("layers have biases")
                    .val()
                    .into_data(),
            );
        }
    }
    out
}

/// The `l` vector of every adapted site.
fn scales(net: &Net) -> Vec<Vec<f32>> {
    net.layers
        .iter()
        .map(|b| {
            assert_eq!(b.fc1.adapters.len(), 0, "fc1 is not targeted");
            assert_eq!(b.fc2.adapters.len(), 1, "fc2 carries one adapter");
            floats(&b.fc2.adapters[0].vectors[0].val().into_data())
        })
        .collect()
}

fn floats(data: &TensorData) -> Vec<f32> {
    data.try_to_vec::<f32>().expect("f32 data")
}

fn bits(data: &TensorData) -> Vec<u32> {
    floats(data).iter().map(|v| v.to_bits()).collect()
}

fn max_abs_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (floats(&a.into_data()), floats(&b.into_data()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A model with the `IA3_SCALE` adapter `default` on every `fc2`, trained one `AdamW` step.
struct Trained {
    peft: PeftModel<Net>,
    /// A clone of the base model taken before wrapping (same base weights, no adapter).
    base: Net,
    /// Base weights before training.
    weights_before: Vec<TensorData>,
    /// `l` vectors before training.
    scales_before: Vec<Vec<f32>>,
    /// A fixed input.
    input: Tensor<3>,
}

fn trained() -> Trained {
    let device = Device::flex().autodiff();
    device.seed(42);
    let net = build_net(&device);
    let base = net.clone();
    let weights_before = base_weights(&net);

    let mut peft = PeftModel::new(net);
    let report = peft
        .add_adapter("default", &ia3_fc2())
        .expect("inject IA3_SCALE");
    assert_eq!(report.adapted, ["layers.0.fc2", "layers.1.fc2"]);
    let expected_trainable: usize = BLOCKS.iter().map(|b| b.2).sum();
    let counts = peft.trainable_report();
    assert_eq!(counts.trainable, expected_trainable);
    let base_params: usize = BLOCKS.iter().map(|&(i, h, o)| i * h + h + h * o + o).sum();
    assert_eq!(counts.all, base_params + expected_trainable);

    let scales_before = scales(peft.model());
    assert!(
        scales_before.iter().flatten().all(|&v| v == 1.0),
        "init_ia3_weights = true starts at ones"
    );

    let input = Tensor::<3>::random([2, 3, 4], Distribution::Default, &device);
    // A no-op at start: the adapted model computes what the base model computes.
    assert_eq!(
        max_abs_diff(
            peft.model().forward(input.clone()),
            base.forward(input.clone())
        ),
        0.0
    );

    let target = Tensor::<3>::random([2, 3, 3], Distribution::Default, &device);
    let out = peft.model().forward(input.clone());
    let loss = (out - target).powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), peft.model());
    let mut optim = AdamWConfig::new().init();
    peft.update(|m| optim.step(1e-2, m, grads));

    Trained {
        peft,
        base,
        weights_before,
        scales_before,
        input,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn custom_method_registers_and_round_trips() {
    let registered = bundle::registered_methods();
    assert!(
        registered.iter().any(|m| m == "IA3_SCALE"),
        "{registered:?}"
    );
    assert!(registered.iter().any(|m| m == "LORA"), "{registered:?}");

    let t = trained();
    let peft = &t.peft;

    // One optimizer step moved the adapters and nothing else.
    let weights_after = base_weights(peft.model());
    assert_eq!(weights_after.len(), t.weights_before.len());
    for (i, (before, after)) in t.weights_before.iter().zip(&weights_after).enumerate() {
        assert_eq!(bits(before), bits(after), "base tensor #{i} changed");
    }
    let scales_after = scales(peft.model());
    for (before, after) in t.scales_before.iter().zip(&scales_after) {
        assert_eq!(before.len(), after.len());
        assert!(
            before.iter().zip(after).all(|(b, a)| b != a),
            "every entry of l should move: {before:?} -> {after:?}"
        );
    }

    // Save.
    let dir = tempfile::tempdir().expect("tempdir");
    peft.save_adapter(dir.path(), "default").expect("save");
    let config: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join(bundle::CONFIG_FILE)).expect("config written"),
    )
    .expect("config is JSON");
    assert_eq!(config["peft_type"], "IA3_SCALE");
    assert_eq!(config["init_ia3_weights"], true);
    assert_eq!(config["target_modules"], serde_json::json!(["fc2"]));

    let bytes = fs::read(dir.path().join(bundle::WEIGHTS_FILE)).expect("weights written");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(ToString::to_string).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "base_model.model.layers.0.fc2.ia3_l",
            "base_model.model.layers.1.fc2.ia3_l",
        ]
    );
    for (i, &(_, _, d_out)) in BLOCKS.iter().enumerate() {
        let view = st
            .tensor(&format!("base_model.model.layers.{i}.fc2.ia3_l"))
            .expect("tensor present");
        assert_eq!(view.shape(), [d_out]);
        let saved: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(saved, scales_after[i], "the file holds the trained l");
    }

    // Reload into a fresh wrapper of the same base weights.
    let mut loaded = PeftModel::new(t.base.clone());
    loaded.load_adapter(dir.path(), "default").expect("load");
    let method = loaded.adapter_config("default").expect("adapter exists");
    assert_eq!(peft_type_of(method), "IA3_SCALE");
    assert_eq!(loaded.active_adapters(), ["default"]);
    assert_eq!(loaded.trainable_report(), peft.trainable_report());
    for (a, b) in base_weights(loaded.model()).iter().zip(&weights_after) {
        assert_eq!(
            bits(a),
            bits(b),
            "the fresh model has the same base weights"
        );
    }
    assert_eq!(scales(loaded.model()), scales_after);

    let trained_out = peft.model().valid().forward(t.input.clone());
    let loaded_out = loaded.model().valid().forward(t.input.clone());
    let diff = max_abs_diff(trained_out.clone(), loaded_out);
    assert!(diff <= 1e-6, "reloaded output differs by {diff}");
    // And training did change the function.
    let base_out = t.base.valid().forward(t.input.clone());
    assert!(max_abs_diff(trained_out, base_out) > 1e-4);

    // A wrong-shaped file is refused with a typed error, leaving the model as it was.
    let bad = tempfile::tempdir().expect("tempdir");
    fs::copy(
        dir.path().join(bundle::CONFIG_FILE),
        bad.path().join(bundle::CONFIG_FILE),
    )
    .expect("copy config");
    let mut tensors = peft.adapter_tensors("default").expect("tensors");
    tensors.insert(
        "base_model.model.layers.1.fc2.ia3_l".into(),
        TensorData::new(vec![1.0f32; 4], [4]),
    );
    fs::write(
        bad.path().join(bundle::WEIGHTS_FILE),
        bundle::encode_safetensors(&tensors).expect("encode"),
    )
    .expect("write weights");
    let mut refused = PeftModel::new(t.base.clone());
    match refused.load_adapter(bad.path(), "default") {
        Err(PeftError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        }) => {
            assert_eq!(key, "base_model.model.layers.1.fc2.ia3_l");
            assert_eq!(expected, [3]);
            assert_eq!(found, [4]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert!(refused.adapter_names().is_empty());
    assert!(
        refused
            .model()
            .layers
            .iter()
            .all(|b| b.fc2.adapters.is_empty())
    );
}

#[test]
fn custom_method_merges() {
    let mut t = trained();
    let input = t.input.clone();
    let unmerged = t.peft.model().valid().forward(input.clone());

    t.peft.merge().expect("IA3_SCALE merges");
    let after_merge = base_weights(t.peft.model());
    assert!(
        after_merge
            .iter()
            .zip(&t.weights_before)
            .any(|(a, b)| bits(a) != bits(b)),
        "merge folds l into the fc2 weights"
    );
    let merged = t.peft.model().valid().forward(input.clone());
    let diff = max_abs_diff(unmerged.clone(), merged);
    assert!(diff <= 1e-5, "merged output differs by {diff}");

    // Unmerge restores the base weights (up to rounding) and the output.
    t.peft.unmerge().expect("unmerge");
    for (a, b) in base_weights(t.peft.model()).iter().zip(&t.weights_before) {
        let worst = floats(a)
            .iter()
            .zip(floats(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 1e-6, "unmerge left the base off by {worst}");
    }
    let diff = max_abs_diff(
        unmerged.clone(),
        t.peft.model().valid().forward(input.clone()),
    );
    assert!(diff <= 1e-5, "unmerged output differs by {diff}");

    let plain: Net = t.peft.merge_and_unload().expect("merge_and_unload");
    assert!(
        plain
            .layers
            .iter()
            .all(|b| b.fc1.adapters.is_empty() && b.fc2.adapters.is_empty()),
        "no adapter is left"
    );
    let diff = max_abs_diff(unmerged, plain.valid().forward(input));
    assert!(diff <= 1e-5, "merge_and_unload output differs by {diff}");
}

#[test]
fn unknown_peft_type_lists_registered_methods() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_bundle(dir.path(), &serde_json::json!({ "peft_type": "NOPE" }));

    let device = Device::flex();
    let mut peft = PeftModel::new(build_net(&device));
    match peft.load_adapter(dir.path(), "default") {
        Err(PeftError::UnknownPeftType {
            found, registered, ..
        }) => {
            assert_eq!(found, "NOPE");
            assert!(
                registered.iter().any(|m| m == "IA3_SCALE"),
                "{registered:?}"
            );
            assert!(registered.iter().any(|m| m == "LORA"), "{registered:?}");
        }
        other => panic!("expected UnknownPeftType, got {other:?}"),
    }
    assert!(peft.adapter_names().is_empty());

    // The same model then loads a bundle of the custom type (one targeted site, one tensor).
    let ok = tempfile::tempdir().expect("tempdir");
    write_bundle(
        ok.path(),
        &serde_json::json!({ "peft_type": "IA3_SCALE", "target_modules": ["layers.1.fc2"] }),
    );
    let tensors = std::collections::BTreeMap::from([(
        "base_model.model.layers.1.fc2.ia3_l".to_string(),
        TensorData::new(vec![2.0f32, 3.0, 4.0], [3]),
    )]);
    fs::write(
        ok.path().join(bundle::WEIGHTS_FILE),
        bundle::encode_safetensors(&tensors).expect("encode"),
    )
    .expect("write weights");
    peft.load_adapter(ok.path(), "default")
        .expect("IA3_SCALE bundle loads");
    let method = bundle::method_to_json(peft.adapter_config("default").expect("loaded"));
    assert_eq!(method["init_ia3_weights"], true, "serde default applies");
    assert_eq!(scales_at(peft.model(), 1), [2.0, 3.0, 4.0]);
}

fn scales_at(net: &Net, block: usize) -> Vec<f32> {
    floats(
        &net.layers[block].fc2.adapters[0].vectors[0]
            .val()
            .into_data(),
    )
}

/// Write `config` and an empty (but valid) safetensors file into `dir`.
fn write_bundle(dir: &Path, config: &serde_json::Value) {
    fs::write(dir.join(bundle::CONFIG_FILE), bundle::render_config(config)).expect("write config");
    let empty: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    let bytes = safetensors::serialize(empty, None).expect("empty safetensors");
    fs::write(dir.join(bundle::WEIGHTS_FILE), bytes).expect("write weights");
}
