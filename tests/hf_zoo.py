"""Small random-init Hugging Face transformers models with dead, dormant and gradient-dead FFN units forced by
construction, and an independent reference that finds those units with plain hooks.

Nothing is downloaded: every model is built from a config (hidden 32, FFN 64, 2 layers, vocabulary 97). Per FFN
layer the construction forces (unit indices in `FORCED[family][layer]`):

- dead: zero incoming weights; with a bias of -1 (ReLU: the pre-activation is -1, the output 0) or, for the
  smooth activations, a bias of 0 (the pre-activation is exactly 0 and GELU(0) = SiLU(0) = 0);
- dormant but not dead (smooth activations with a bias): zero incoming weights and a bias of -3 (GELU(-3) is
  about -0.004: never 0, never positive);
- gradient-dead but alive: zero outgoing weights (the unit's column of fc2 / c_proj / output.dense / down_proj),
  plus a bias of +1 where there is one so the unit fires on every token;
- gated FFN (Llama, bias-free like the released models): the site is the gate activation SiLU(gate_proj x).
  Zero gate rows make the gate's pre-activation exactly 0, hence dead (SiLU(0) = 0) and dormant; a dormant-only
  gate cannot be built without a bias. A zero up_proj row makes the gate gradient-dead without being dead
  (dL/dgate = dL/dh * up * SiLU'(gate), and up is 0); so does a zero down_proj column.

`reference(model, family, batches)` is the checker the tests hold the scan to: a forward pre-hook and a forward
hook on each FFN activation module and a tensor hook on its input, over the same batches, with the model's own
loss when the batch has labels and a random-cotangent probe on the logits otherwise. A unit is dead when every
output element is exactly 0, dormant when every input element is <= 0, gradient-dead when every gradient element
is exactly 0, over all rows (batch x tokens) of all batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FAMILIES = ("opt", "gpt2", "bert", "llama")
# Built the same way, used by tests/test_field_models.py only: BLOOM's MLP activation is its own module (BloomGelu).
FIELD_FAMILIES = ("bloom",)
STATES = ("dead", "dormant", "grad_dead")
VOCAB = 97
HIDDEN = 32
FFN = 64
LAYERS = 2
SEQ = 12
NUM_LABELS = 3

# Per family, per FFN layer: the units forced into each state (a subset of what the reference finds, since random
# init may leave a few more units silent on a small batch).
FORCED: dict[str, list[dict[str, list[int]]]] = {
    "opt": [
        {"dead": [0, 1], "dormant": [0, 1], "grad_dead": [0, 1, 5]},
        {"dead": [3], "dormant": [3], "grad_dead": [3, 7]},
    ],
    "gpt2": [
        {"dead": [0], "dormant": [0, 2], "grad_dead": [5]},
        {"dead": [4], "dormant": [4, 6], "grad_dead": [9]},
    ],
    "bert": [
        {"dead": [0], "dormant": [0, 2], "grad_dead": [5]},
        {"dead": [4], "dormant": [4, 6], "grad_dead": [9]},
    ],
    "llama": [
        {"dead": [0, 1], "dormant": [0, 1], "grad_dead": [5, 8]},
        {"dead": [3], "dormant": [3], "grad_dead": [7, 10]},
    ],
    "bloom": [
        {"dead": [0], "dormant": [0, 2], "grad_dead": [5]},
        {"dead": [4], "dormant": [4, 6], "grad_dead": [9]},
    ],
}

# The FFN activation module of layer `i`, as a dotted path.
ACTIVATION_PATH = {
    "opt": "model.decoder.layers.{i}.activation_fn",
    "gpt2": "transformer.h.{i}.mlp.act",
    "bert": "bert.encoder.layer.{i}.intermediate.intermediate_act_fn",
    "llama": "model.layers.{i}.mlp.act_fn",
    "bloom": "transformer.h.{i}.mlp.gelu_impl",
}


def _config(family: str) -> Any:
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=HIDDEN, activation_function="relu", **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=4, n_positions=64,
            activation_function="gelu_new", **common,
        )
    if family == "bert":
        return tf.BertConfig(
            hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
            max_position_embeddings=64, num_labels=NUM_LABELS, hidden_act="gelu", **common,
        )
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, hidden_act="silu", mlp_bias=False, **common,
        )
    if family == "bloom":  # the MLP is 4 x hidden wide: hidden 16 gives FFN units
        return tf.BloomConfig(hidden_size=FFN // 4, n_layer=LAYERS, n_head=4, **common)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + FIELD_FAMILIES}")


def _model_class(family: str) -> Any:
    import transformers as tf

    return {
        "opt": tf.OPTForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertForSequenceClassification,
        "llama": tf.LlamaForCausalLM,
        "bloom": tf.BloomForCausalLM,
    }[family]


def _ffn(model: nn.Module, family: str, i: int) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(incoming layer, outgoing layer, up projection or None) of FFN layer `i`."""
    if family == "opt":
        layer = model.model.decoder.layers[i]
        return layer.fc1, layer.fc2, None
    if family == "gpt2":
        mlp = model.transformer.h[i].mlp
        return mlp.c_fc, mlp.c_proj, None
    if family == "bert":
        block = model.bert.encoder.layer[i]
        return block.intermediate.dense, block.output.dense, None
    if family == "bloom":
        mlp = model.transformer.h[i].mlp
        return mlp.dense_h_to_4h, mlp.dense_4h_to_h, None
    mlp = model.model.layers[i].mlp
    return mlp.gate_proj, mlp.down_proj, mlp.up_proj


def _zero_incoming(layer: nn.Module, units: list[int], bias: float | None) -> None:
    if type(layer).__name__ == "Conv1D":
        layer.weight[:, units] = 0.0
    else:
        layer.weight[units] = 0.0
    if bias is not None:
        layer.bias[units] = bias


def _zero_outgoing(layer: nn.Module, units: list[int]) -> None:
    if type(layer).__name__ == "Conv1D":
        layer.weight[units, :] = 0.0
    else:
        layer.weight[:, units] = 0.0


def build(family: str, seed: int = 0) -> nn.Module:
    """A random-init model of `family` (in eval mode) with `FORCED[family]` applied."""
    torch.manual_seed(seed)
    model = _model_class(family)(_config(family))
    model.eval()
    with torch.no_grad():
        for i, forced in enumerate(FORCED[family]):
            incoming, outgoing, up = _ffn(model, family, i)
            dead = forced["dead"]
            dormant_only = [u for u in forced["dormant"] if u not in dead]
            if family == "opt":
                incoming.bias.add_(0.05)  # most random units fire on some token
                _zero_incoming(incoming, dead, -1.0)
                muted = [u for u in forced["grad_dead"] if u not in dead]
                _zero_incoming(incoming, muted, 1.0)  # always firing, so gradient-dead only through fc2
                _zero_outgoing(outgoing, muted)
            elif family in ("gpt2", "bert", "bloom"):
                _zero_incoming(incoming, dead, 0.0)
                _zero_incoming(incoming, dormant_only, -3.0)
                _zero_incoming(incoming, forced["grad_dead"], 1.0)
                _zero_outgoing(outgoing, forced["grad_dead"])
            else:  # llama: bias-free gated FFN
                assert up is not None
                _zero_incoming(incoming, dead, None)
                by_down, by_up = forced["grad_dead"]
                _zero_outgoing(outgoing, [by_down])
                up.weight[by_up] = 0.0
    return model


def activations(model: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of each FFN activation, in layer order."""
    found = dict(model.named_modules())
    return [(ACTIVATION_PATH[family].format(i=i), found[ACTIVATION_PATH[family].format(i=i)]) for i in range(LAYERS)]


def batches(family: str, n: int = 16, batch_size: int = 8, seq: int = SEQ, seed: int = 0) -> list[dict[str, Any]]:
    """Mappings of model inputs as a tokenizer and a collator would give them; BERT's carry `labels`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=generator)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=generator)
    out = []
    for start in range(0, n, batch_size):
        batch: dict[str, Any] = {
            "input_ids": ids[start : start + batch_size],
            "attention_mask": torch.ones_like(ids[start : start + batch_size]),
        }
        if family == "bert":
            batch["labels"] = labels[start : start + batch_size]
        out.append(batch)
    return out


def reference(model: nn.Module, family: str, data: list[dict[str, Any]], seed: int = 1) -> list[dict[str, Any]]:
    """Per FFN activation: the dead, dormant and gradient-dead units on `data` (sets), found with plain hooks, and
    `firing_rate`, the fraction of samples (sequences) on which each unit is nonzero at some token."""
    sites = activations(model, family)
    state = [
        {
            "fired": torch.zeros(FFN, dtype=torch.bool),
            "positive": torch.zeros(FFN, dtype=torch.bool),
            "grad": torch.zeros(FFN, dtype=torch.bool),
            "fired_samples": torch.zeros(FFN),
        }
        for _ in sites
    ]

    def on_input(k: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0]
            state[k]["positive"] |= (z.detach().reshape(-1, z.shape[-1]) > 0).any(0)

            def on_grad(g: torch.Tensor) -> None:
                state[k]["grad"] |= (g.reshape(-1, g.shape[-1]) != 0).any(0)

            z.register_hook(on_grad)

        return hook

    def on_output(k: int):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            nonzero = out.detach().reshape(samples, -1, out.shape[-1]) != 0  # OPT's rows are batch-major
            state[k]["fired"] |= nonzero.flatten(0, 1).any(0)
            state[k]["fired_samples"] += nonzero.any(1).sum(0)

        return hook

    handles = []
    samples = total = 0
    generator = torch.Generator().manual_seed(seed)
    try:
        for k, (_, module) in enumerate(sites):
            handles.append(module.register_forward_pre_hook(on_input(k)))
            handles.append(module.register_forward_hook(on_output(k)))
        for batch in data:
            samples = int(batch["input_ids"].shape[0])
            total += samples
            out = model(**batch)
            if "labels" in batch:
                loss = out.loss
            else:
                loss = (torch.randn(out.logits.shape, generator=generator) * out.logits).sum()
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)

    def units(mask: torch.Tensor) -> set[int]:
        return set(torch.nonzero(~mask).flatten().tolist())

    return [
        {
            "dead": units(s["fired"]),
            "dormant": units(s["positive"]),
            "grad_dead": units(s["grad"]),
            "firing_rate": (s["fired_samples"] / total).numpy(),
        }
        for s in state
    ]


def token_ids(n: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, batch: dict[str, Any], path: Any, dynamic: bool = True) -> Any:
    """The recipe docs/torch-scan.md gives for a `.pt2` of a transformers model, followed exactly: eval mode, no
    KV cache (`use_cache=False`), the batch's keyword inputs as the example (with `labels` when the model should
    compute its own loss), a dynamic batch dimension; saved with torch.export.save."""
    model.eval()
    model.config.use_cache = False
    batch_dim = torch.export.Dim("batch")
    shapes = {key: {0: batch_dim} for key in batch} if dynamic else None
    program = torch.export.export(model, (), kwargs=dict(batch), dynamic_shapes=shapes)
    torch.export.save(program, path)
    return program


def same_units(layers: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Each report layer (as JSON) has exactly the units `reference` found in each state."""
    for layer, want in zip(layers, expected, strict=True):
        for state in STATES:
            assert set(layer[f"{state}_units"]) == want[state], (layer["name"], state)


def unit_sets(report: Any) -> list[dict[str, set[int]]]:
    """Per layer of a Report: its dead, dormant and gradient-dead units as sets, as `reference` gives them."""
    return [{state: set(getattr(layer, f"{state}_units")) for state in STATES} for layer in report.layers]
