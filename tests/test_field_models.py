"""Models nobody here wrote, tried as a new user would (docs/torch-scan.md, "Models checked"), and what that found:
BLOOM's MLP activation was no site, a saved ViT directory did not load under transformers 5, a comparison with
labels lost the model's own loss after the swap, T5 without decoder inputs failed with its decoder's message, and
the comparison's overall gradient ratio pooled sites whose gradients differ by orders of magnitude.

Every model is random-init from a small config (nothing downloaded), with dead, dormant and gradient-dead units
forced by construction where the test is about them, and checked against plain hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.torch.hf import load_pretrained  # noqa: E402

from . import hf_zoo as zoo  # noqa: E402
from .conftest import last_line, run_cli  # noqa: E402

STATES = zoo.STATES


def hook_reference(model: nn.Module, paths: list[str], data: list[dict]) -> list[dict[str, set[int]]]:
    """Per activation module (by path): dead, dormant and gradient-dead units over `data` (batches with labels,
    the model's own loss), from a forward pre-hook, a forward hook and a tensor hook; units on the last axis."""
    modules = dict(model.named_modules())
    seen: list[dict[str, torch.Tensor]] = [{} for _ in paths]

    def merge(k: int, key: str, value: torch.Tensor) -> None:
        seen[k][key] = value if key not in seen[k] else seen[k][key] | value

    def on_input(k: int):
        def hook(module, args):
            z = args[0]
            merge(k, "positive", (z.detach().reshape(-1, z.shape[-1]) > 0).any(0))
            z.register_hook(lambda g: merge(k, "grad", (g.reshape(-1, g.shape[-1]) != 0).any(0)))

        return hook

    def on_output(k: int):
        def hook(module, args, out):
            merge(k, "fired", (out.detach().reshape(-1, out.shape[-1]) != 0).any(0))

        return hook

    handles = []
    try:
        for k, path in enumerate(paths):
            handles.append(modules[path].register_forward_pre_hook(on_input(k)))
            handles.append(modules[path].register_forward_hook(on_output(k)))
        for batch in data:
            model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    flags = {"dead": "fired", "dormant": "positive", "grad_dead": "grad"}
    return [
        {state: set(torch.nonzero(~s[flag]).flatten().tolist()) for state, flag in flags.items()} for s in seen
    ]


# BLOOM: its MLP activation is transformers.models.bloom's own BloomGelu, not an ACT2FN module ---------------------
@pytest.fixture(scope="module")
def bloom():
    return zoo.build("bloom")


def test_bloom_gelu_is_a_site_and_finds_the_forced_units(bloom):
    data = zoo.batches("bloom")
    expected = zoo.reference(bloom, "bloom", data)
    for found, forced in zip(expected, zoo.FORCED["bloom"], strict=True):
        assert all(set(forced[state]) <= found[state] for state in STATES)
    report = deadneuron.scan(bloom, data)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("transformer.h.0.mlp.gelu_impl", "gelu_tanh"),
        ("transformer.h.1.mlp.gelu_impl", "gelu_tanh"),
    ]
    assert zoo.unit_sets(report) == [{state: layer[state] for state in STATES} for layer in expected]


# Saved directories that transformers 5 renames on loading (ViT) ------------------------------------------------
def _vit(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3,
    )
    model = tf.ViTForImageClassification(config).eval()
    with torch.no_grad():  # layer 0: units 0, 1 dead (GELU(0) = 0); layer 1: unit 7 gradient-dead (fc2 column 0)
        model.vit.layers[0].mlp.fc1.weight[[0, 1]] = 0.0
        model.vit.layers[0].mlp.fc1.bias[[0, 1]] = 0.0
        model.vit.layers[1].mlp.fc1.bias[7] = 1.0
        model.vit.layers[1].mlp.fc2.weight[:, 7] = 0.0
    return model


VIT_SITES = ["vit.layers.0.mlp.activation_fn", "vit.layers.1.mlp.activation_fn"]


def _pixels(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (n,), generator=generator)}


def test_a_saved_vit_directory_loads_through_the_renamed_keys(tmp_path):
    model = _vit()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:  # transformers 5 saves the old names
        names = set(saved.keys())
    if not any(".encoder.layer." in name for name in names):
        pytest.skip("this transformers saves ViT under its module names: no rename to test")
    loaded = load_pretrained(tmp_path)
    pixels = _pixels()["pixel_values"]
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.slow
def test_cli_scans_a_saved_vit_directory_like_the_hooks(tmp_path):
    model = _vit()
    model.save_pretrained(tmp_path / "vit")
    batch = _pixels(16)
    np.savez(tmp_path / "pixels.npz", **{key: value.numpy() for key, value in batch.items()})
    result = run_cli("scan", str(tmp_path / "vit"), "--data", str(tmp_path / "pixels.npz"), "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loss"] == "model" and [layer["name"] for layer in report["layers"]] == VIT_SITES
    expected = hook_reference(model, VIT_SITES, [batch])
    assert {0, 1} <= expected[0]["dead"] and 7 in expected[1]["grad_dead"]
    zoo.same_units(report["layers"], expected)


def test_random_inputs_of_an_image_model_follow_its_config():
    model = _vit()
    report = deadneuron.scan(model, samples=4, batch_size=2)
    assert report.samples == 4 and [layer.name for layer in report.layers] == VIT_SITES
    assert report.layers[0].dead_units == [0, 1]  # zero rows and bias: dead whatever the pixels


# A comparison with labels: the swapped copy computes its own loss too ------------------------------------------
def _lm_batches(n: int = 16, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = zoo.token_ids(n)
    labels = ids.clone()
    labels[:, ::3] = -100  # positions a masked or causal LM leaves out of its loss
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size]),
         "labels": labels[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def test_compare_with_token_labels_scans_the_swap_with_its_own_loss():
    opt = zoo.build("opt")
    data = _lm_batches()
    comparison = deadneuron.compare(opt, data)
    assert comparison.before.loss == comparison.after.loss == "model"
    paths = [path for path, _ in zoo.activations(opt, "opt")]
    assert zoo.unit_sets(comparison.before) == hook_reference(opt, paths, data)
    swapped = deadneuron.swap(opt)
    assert zoo.unit_sets(comparison.after) == hook_reference(swapped, paths, data)
    # the forced dead units (zero fc1 rows, bias -1) get a gradient through SineReLU; zero fc2 columns do not
    assert comparison.before.layers[0].dead_units == [0, 1] and comparison.after.layers[0].dead_units == []
    assert set(comparison.after.layers[0].grad_dead_units) >= {5}


def test_fine_tuning_with_token_labels_trains_on_the_models_own_loss():
    opt = zoo.build("opt")
    comparison = deadneuron.compare(opt, _lm_batches(), finetune_steps=2)
    revival = comparison.revival
    assert revival is not None and revival["formerly_dead"] == comparison.before.dead >= 3
    # a ReLU unit with zero incoming weights and bias -1 gets no gradient, so Adam never moves it: none revives
    assert revival["revived_relu"] == 0


def test_compare_of_a_classifier_with_labels_keeps_the_models_loss():
    comparison = deadneuron.compare(zoo.build("bert"), zoo.batches("bert"))
    assert comparison.before.loss == comparison.after.loss == "model"


# T5: an encoder-decoder needs decoder inputs or labels ---------------------------------------------------------
def _t5(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.T5Config(
        vocab_size=zoo.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
    )
    model = tf.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # bias-free: a zero wi row makes the pre-activation 0 (dead); a zero wo column mutes one
        model.encoder.block[0].layer[1].DenseReluDense.wi.weight[[2, 3]] = 0.0
        model.decoder.block[1].layer[2].DenseReluDense.wo.weight[:, 9] = 0.0
    return model


T5_SITES = [
    "encoder.block.0.layer.1.DenseReluDense.act",
    "encoder.block.1.layer.1.DenseReluDense.act",
    "decoder.block.0.layer.2.DenseReluDense.act",
    "decoder.block.1.layer.2.DenseReluDense.act",
]


def _t5_batch(n: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(3, zoo.VOCAB, (n, 10), generator=generator),
            "labels": torch.randint(3, zoo.VOCAB, (n, 6), generator=generator)}


def test_t5_with_labels_scans_and_compares_like_the_hooks():
    model = _t5()
    batch = _t5_batch()
    report = deadneuron.scan(model, [batch])
    assert [layer.name for layer in report.layers] == T5_SITES and report.loss == "model"
    expected = hook_reference(model, T5_SITES, [batch])
    assert {2, 3} <= expected[0]["dead"] and 9 in expected[3]["grad_dead"]
    assert zoo.unit_sets(report) == expected
    # predictions (no labels passed) run the decoder on the labels shifted right, as the model does itself
    comparison = deadneuron.compare(model, [batch])
    assert [entry["kind"] for entry in comparison.to_dict()["swapped"]] == ["relu"] * 4
    swapped = deadneuron.swap(model)
    with torch.no_grad():
        a, b = model(**batch).logits, swapped(**batch).logits
    assert comparison.agreement == pytest.approx(float((a.argmax(-1) == b.argmax(-1)).double().mean()))


def test_t5_given_token_ids_alone_reads_them_shifted_right_and_says_so():
    model = _t5()
    batch = _t5_batch()
    report = deadneuron.scan(model, [{"input_ids": batch["input_ids"]}])
    assert [layer.name for layer in report.layers] == T5_SITES and report.loss == "probe"
    assert any("its decoder read the same tokens shifted right" in warning for warning in report.warnings)
    # the same decoder input as the model builds from labels equal to the input ids
    expected = hook_reference(model, T5_SITES, [{"input_ids": batch["input_ids"], "labels": batch["input_ids"]}])
    for layer, want in zip(report.layers, expected, strict=True):
        assert set(layer.dead_units) == want["dead"] and set(layer.dormant_units) == want["dormant"]
    assert {2, 3} <= set(report.layers[0].dead_units)
    assert len(deadneuron.scan(model, samples=4).layers) == 4  # random token ids too
    ids = batch["input_ids"]
    report = deadneuron.scan(model, [{"input_ids": ids, "decoder_input_ids": ids[:, :5]}])
    assert report.warnings == []


def _whisper():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.WhisperConfig(
        vocab_size=zoo.VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
    )
    return tf.WhisperForConditionalGeneration(config).eval()


def test_an_encoder_decoder_without_decoder_input_says_what_it_needs():
    features = torch.randn(2, 8, 32)
    with pytest.raises(DeadNeuronError, match="WhisperForConditionalGeneration is an encoder-decoder model and its "
                       "decoder got no input; expected decoder_input_ids beside input_features"):
        deadneuron.scan(_whisper(), [{"input_features": features}])


def test_labels_a_model_refuses_are_named_with_what_it_takes():
    bert = zoo.build("bert")
    batch = {**zoo.batches("bert")[0]}
    batch["labels"] = batch["labels"] + zoo.NUM_LABELS
    with pytest.raises(DeadNeuronError, match=r"with labels it accepts \(class indices in \[0, 3\) for its "
                       r"classification head\)"):
        deadneuron.scan(bert, [batch])


def test_inputs_of_another_model_are_named():
    llama = zoo.build("llama")
    with pytest.raises(DeadNeuronError, match=r"LlamaForCausalLM takes input_ids \(its main input\), which the "
                       "batch lacks"):
        deadneuron.scan(llama, [{"pixel_values": torch.randn(2, 3, 16, 16)}])


@pytest.mark.slow
def test_cli_encoder_decoders_inspect_and_refuse_in_one_line(tmp_path):
    _t5().save_pretrained(tmp_path / "t5")
    result = run_cli("inspect", str(tmp_path / "t5"))
    assert result.returncode == 0, result.stderr
    assert all(site in result.stdout for site in T5_SITES)
    _whisper().save_pretrained(tmp_path / "whisper")
    np.savez(tmp_path / "features.npz", input_features=np.zeros((2, 8, 32), np.float32))
    result = run_cli("scan", str(tmp_path / "whisper"), "--data", str(tmp_path / "features.npz"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "encoder-decoder model" in last_line(result.stderr) and "decoder_input_ids" in result.stderr


# The overall gradient ratio: every formerly dead unit against the live units of its own site ------------------
def _two_scales() -> nn.Sequential:
    """Two ReLU sites whose gradients differ by about 1e4: fc2's weights are 1e-4 (its biases keep act2 alive), so
    dL/d(act1) is 1e-4 of dL/d(act2). Dead by construction: act1 units 0-3, act2 unit 0 (zero rows, bias -1)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(8, 16))
    model.add_module("act1", nn.ReLU())
    model.add_module("fc2", nn.Linear(16, 16))
    model.add_module("act2", nn.ReLU())
    model.add_module("out", nn.Linear(16, 3))
    with torch.no_grad():
        model.fc1.weight[:4] = 0.0
        model.fc1.bias[:4] = -1.0
        model.fc2.weight.mul_(1e-4)
        model.fc2.bias.uniform_(0.5, 1.0)
        model.fc2.weight[0] = 0.0
        model.fc2.bias[0] = -1.0
    return model.eval()


def test_overall_gradient_ratio_measures_each_unit_against_its_own_site():
    model = _two_scales()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    comparison = deadneuron.compare(model, (x, y), batch_size=16)
    assert [layer.dead_units for layer in comparison.before.layers] == [[0, 1, 2, 3], [0]]
    # The reference: mean |dL/dz| per unit of the swapped model under the summed cross-entropy, from tensor hooks.
    swapped = deadneuron.swap(model)
    grads: dict[str, list[torch.Tensor]] = {"act1": [], "act2": []}

    def watch(name: str):
        def hook(module, args) -> None:
            args[0].register_hook(lambda g: grads[name].append(g.abs()))

        return hook

    handles = [getattr(swapped, name).register_forward_pre_hook(watch(name)) for name in grads]
    try:
        for start in range(0, 64, 16):
            logits = swapped(x[start : start + 16])
            nn.functional.cross_entropy(logits, y[start : start + 16], reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
    scaled, per_site = [], []
    for name, dead in (("act1", [0, 1, 2, 3]), ("act2", [0])):
        mean = torch.cat(grads[name]).mean(0).double().numpy()
        live = np.delete(mean, dead)
        scaled.append(mean[dead] / np.median(live))
        per_site.append(np.median(mean[dead]) / np.median(live))
    assert [site.gradient_ratio for site in comparison.sites] == pytest.approx(per_site, rel=1e-4)
    assert comparison.gradient_ratio == pytest.approx(float(np.median(np.concatenate(scaled))), rel=1e-4)
    # pooling units across the two sites would set act1's dead units against act2's live ones: 1e4 smaller
    pooled = np.median(np.concatenate([torch.cat(grads["act1"]).mean(0)[:4].numpy(),
                                       torch.cat(grads["act2"]).mean(0)[:1].numpy()]))
    assert comparison.gradient_ratio > 100 * pooled / np.median(torch.cat(grads["act2"]).mean(0)[1:].numpy())
    assert json.loads(comparison.to_json())["formerly_dead_gradient_ratio"] == pytest.approx(comparison.gradient_ratio)


# The console at 80 columns: a transformers site path folds, the before -> after counts stay whole -----------------
def test_comparison_table_on_80_columns_keeps_counts_on_one_line():
    from deadneuron.report.text import render_text

    comparison = deadneuron.compare(zoo.build("bert"), zoo.batches("bert"))
    text = render_text(comparison, width=80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    rule = next(i for i, line in enumerate(lines) if line.startswith("━"))
    rows = [line for line in lines[rule + 1 :] if "->" in line]
    assert len(rows) == zoo.LAYERS + 1, text  # one line of counts per site, and the total
    assert all(line.count("->") == 3 for line in rows), text
    assert rows[0].startswith("bert.encoder.layer.") and rows[-1].startswith("total"), text


# Mixtures of experts: the fused experts' activation has no units of its own ----------------------------------
def _qwen2_moe(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Qwen2MoeConfig(
        vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2,
    )
    model = tf.Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():  # the shared expert is a plain gated MLP: zero gate rows are dead, a zero down column mutes
        for layer in model.model.layers:
            layer.mlp.shared_expert.gate_proj.weight[[0, 1]] = 0.0
            layer.mlp.shared_expert.down_proj.weight[:, 5] = 0.0
    return model


def test_fused_experts_are_not_observed_and_the_shared_expert_is_a_site():
    model = _qwen2_moe()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.ndim == 3  # transformers' fused layout: one tensor for all experts
    data = _lm_batches()
    report = deadneuron.scan(model, data)
    shared = [f"model.layers.{i}.mlp.shared_expert.act_fn" for i in range(2)]
    assert [layer.name for layer in report.layers] == shared
    assert [entry.split(" (")[0] for entry in report.unobserved] == [
        f"model.layers.{i}.mlp.experts.act_fn" for i in range(2)
    ]
    assert "unit j is a different neuron in each expert" in report.unobserved[0]
    expected = hook_reference(model, shared, data)
    assert all({0, 1} <= layer["dead"] and 5 in layer["grad_dead"] for layer in expected)
    assert zoo.unit_sets(report) == expected


def test_a_model_of_fused_experts_alone_says_its_sites_were_not_observed():
    import transformers as tf

    config = tf.MixtralConfig(
        vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )
    report = deadneuron.scan(tf.MixtralForCausalLM(config).eval(), [{"input_ids": zoo.token_ids(4)}])
    assert report.layers == [] and len(report.unobserved) == 1
    assert report.warnings == ["no activation site could be observed; see the 1 listed as not observed"]


# Padded batches: padding tokens (attention_mask 0) are no positions ----------------------------------------------
class PadFiring(nn.Module):
    """Token ids -> embedding -> fc1 -> ReLU -> masked mean -> 3 classes. By construction unit 0 fires on the
    padding token (id 0, embedding [1, 0, 0, 0]) and on no real token (their first coordinate is -1); unit 1 has
    zero incoming weights and bias -1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            self.embed.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
            self.embed.weight[1:, 0] = -1.0
            self.fc1.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
            self.fc1.bias[0] = 0.0
            self.fc1.weight[1] = 0.0
            self.fc1.bias[1] = -1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.fc2((h * mask).sum(1) / mask.sum(1))


def _padded(n: int = 8, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 10, (n, length), generator=generator)
    lengths = torch.randint(3, length + 1, (n,), generator=generator)
    lengths[0] = length  # one sequence unpadded
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask  # padding token 0 after each sequence


def test_a_unit_that_fires_only_on_padding_is_dead():
    model = PadFiring().eval()
    ids, mask = _padded()
    report = deadneuron.scan(model, [{"input_ids": ids, "attention_mask": mask}])
    # the reference: the pre-activation and the output at real tokens only, from plain hooks
    seen = {}
    model.act.register_forward_hook(lambda module, args, out: seen.update(z=args[0].detach(), a=out.detach()))
    with torch.no_grad():
        model(ids, mask)
    real = mask.bool()
    assert (seen["a"][~real][:, 0] > 0).all()  # unit 0 fires on every padding token
    dead = set(torch.nonzero((seen["a"][real] == 0).all(0)).flatten().tolist())
    dormant = set(torch.nonzero((seen["z"][real] <= 0).all(0)).flatten().tolist())
    assert {0, 1} <= dead
    layer = report.layers[0]
    assert layer.name == "act" and layer.unit_axis == 2
    assert set(layer.dead_units) == dead and set(layer.dormant_units) == dormant
    assert {0, 1} <= set(layer.grad_dead_units)  # a dead ReLU passes no gradient
    # the inactive fraction of each sample is over its real tokens: padding is neither firing nor at zero
    fractions = torch.stack([(seen["a"][i][real[i]] == 0).double().mean(0) for i in range(len(ids))])
    assert layer.inactive_rate == pytest.approx(float(fractions.mean()), rel=1e-9)
    np.testing.assert_allclose(layer.stats.inactive_sum, fractions.sum(0).numpy(), rtol=1e-6)


def test_a_padded_batch_scans_like_its_sequences_unpadded():
    opt = zoo.build("opt")
    ids, mask = _padded(8, zoo.SEQ)
    ids = torch.where(mask.bool(), zoo.token_ids(8), 0)  # OPT's pad id 0 after each sequence
    labels = ids.masked_fill(~mask.bool(), -100)
    report = deadneuron.scan(opt, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    lengths = mask.sum(1).tolist()
    alone = [
        {"input_ids": ids[i : i + 1, :k], "attention_mask": mask[i : i + 1, :k], "labels": labels[i : i + 1, :k]}
        for i, k in enumerate(lengths)
    ]
    paths = [path for path, _ in zoo.activations(opt, "opt")]
    assert zoo.unit_sets(report) == hook_reference(opt, paths, alone)
    # and the largest |output| per unit is that of the real tokens: padding is no position
    largest = [torch.zeros(zoo.FFN) for _ in paths]

    def track(k: int):
        def hook(module, args, out) -> None:
            largest[k] = torch.maximum(largest[k], out.detach().abs().amax(0))

        return hook

    handles = [module.register_forward_hook(track(k)) for k, (_, module) in enumerate(zoo.activations(opt, "opt"))]
    try:
        with torch.no_grad():
            for batch in alone:
                opt(**batch)
    finally:
        for handle in handles:
            handle.remove()
    for layer, want in zip(report.layers, largest, strict=True):
        assert layer.stats is not None
        np.testing.assert_allclose(layer.stats.max_abs, want.double().numpy(), rtol=1e-5)


def test_an_encoder_decoder_batch_is_not_masked_by_the_encoders_padding():
    # decoder inputs as long as the encoder's: the encoder's attention mask must not cut the decoder's positions
    model = _t5()
    ids, mask = _padded(8, 10)
    batch = {"input_ids": torch.where(mask.bool(), ids, 0), "attention_mask": mask, "decoder_input_ids": ids}
    report = deadneuron.scan(model, [batch], loss="none")
    seen = {}
    handle = dict(model.named_modules())[T5_SITES[2]].register_forward_hook(
        lambda module, args, out: seen.update(a=out.detach())
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    # the decoder site over every position, padding included: its largest |output| per unit and its dead units
    decoder = report.layers[2]
    assert decoder.stats is not None
    np.testing.assert_allclose(decoder.stats.max_abs, seen["a"].abs().amax((0, 1)).double().numpy(), rtol=1e-6)
    fired_anywhere = (seen["a"] != 0).any(0).any(0)
    assert set(decoder.dead_units) == set(torch.nonzero(~fired_anywhere).flatten().tolist())


def test_the_training_monitor_leaves_padding_out_as_the_scan_does():
    from deadneuron.torch import DeadNeuronMonitor

    model = PadFiring()
    batches = [dict(zip(("input_ids", "attention_mask"), _padded(seed=seed), strict=True)) for seed in range(3)]
    labels = torch.zeros(8, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the scan below sees the model trained on
    with DeadNeuronMonitor(model, every=1, window=3) as monitor:
        for batch in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(**batch), labels).backward()
            optimizer.step()
    watched = monitor.report().layers[0]
    scanned = deadneuron.scan(model.eval(), batches).layers[0]
    assert {0, 1} <= set(watched.dead_units) and watched.dead_units == scanned.dead_units
    assert watched.dormant_units == scanned.dormant_units
