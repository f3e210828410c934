"""Hugging Face transformers models as users have them: random-init models from configs (nothing downloaded) with
dead, dormant and gradient-dead FFN units forced by construction (tests/hf_zoo.py), checked against an independent
hook reference; saved directories loaded without running code from them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.torch.hf import load_pretrained  # noqa: E402

from . import hf_zoo as zoo  # noqa: E402
from .conftest import ROOT, last_line, run_cli, run_cli_without  # noqa: E402

STATES = zoo.STATES


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def opt():
    return zoo.build("opt")


@pytest.fixture(scope="module")
def built(family):
    return zoo.build(family)


@pytest.fixture(scope="module")
def saved(family, built, tmp_path_factory):
    path = tmp_path_factory.mktemp(family)
    built.save_pretrained(path)
    return path


def test_the_reference_finds_exactly_the_forced_units(family, built):
    # The zoo's construction and the checker agree: on a random-init model nothing else is silent.
    found = zoo.reference(built, family, zoo.batches(family))
    expected = [{state: set(units) for state, units in layer.items()} for layer in zoo.FORCED[family]]
    assert [{state: layer[state] for state in STATES} for layer in found] == expected


def test_a_saved_directory_loads_with_the_same_outputs(family, built, saved):
    loaded = load_pretrained(saved)
    assert type(loaded) is type(built) and not loaded.training
    batch = zoo.batches(family)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, built(**batch).logits)


def test_a_sharded_directory_loads(tmp_path):
    model = zoo.build("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    batch = zoo.batches("gpt2")[0]
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(**batch).logits, model(**batch).logits)


def _edit_config(path, **changes):
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.fixture
def gpt2_dir(tmp_path):
    zoo.build("gpt2").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_remote_code_is_refused_and_never_run(gpt2_dir):
    marker = gpt2_dir / "ran"
    (gpt2_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(gpt2_dir, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    with pytest.raises(DeadNeuronError, match="auto_map.*remote code.*never runs"):
        load_pretrained(gpt2_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["EvilModel"]}, "names the model class 'EvilModel', which transformers .* does not ship"),
        ({"architectures": ["os.system"]}, "names the model class 'os.system'"),
        ({"architectures": ["GPT2Config"]}, "names the model class 'GPT2Config'"),
        ({"architectures": None}, "does not name one model class"),
        ({"model_type": "no_such_type"}, "model_type 'no_such_type', which transformers .* does not know"),
        ({"n_embd": 48}, "do not fit its config"),
    ],
)
def test_configs_that_do_not_describe_a_shipped_model_are_refused(gpt2_dir, changes, message):
    _edit_config(gpt2_dir, **changes)
    with pytest.raises(DeadNeuronError, match=message):
        load_pretrained(gpt2_dir)


def test_directories_that_are_not_safe_transformers_models_are_refused(gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeadNeuronError, match="folder without config.json; expected a transformers model"):
        load_pretrained(empty)
    (gpt2_dir / "config.json").write_text("{not json")
    with pytest.raises(DeadNeuronError, match="not valid JSON"):
        load_pretrained(gpt2_dir)
    (gpt2_dir / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(DeadNeuronError, match="expected a transformers config of at most"):
        load_pretrained(gpt2_dir)


def test_pickled_or_missing_weights_are_refused(tmp_path):
    model = zoo.build("opt")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(DeadNeuronError, match="pytorch_model.bin, which is refused.*safe_serialization"):
        load_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(DeadNeuronError, match="no weights; expected model.safetensors"):
        load_pretrained(tmp_path)


def test_a_shard_index_cannot_point_outside_the_directory(tmp_path):
    zoo.build("gpt2").save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(DeadNeuronError, match="expected .safetensors file names inside"):
        load_pretrained(tmp_path)


def test_missing_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    zoo.build("llama").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]  # not tied in Llama: a real gap
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(DeadNeuronError, match=r"do not match LlamaForCausalLM \(missing lm_head.weight\)"):
        load_pretrained(tmp_path)


def test_without_transformers_the_message_says_what_to_install(gpt2_dir):
    # A fresh interpreter in which `import transformers` fails, as on a machine without the extra.
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from deadneuron import DeadNeuronError\n"
        "from deadneuron.torch.hf import load_pretrained\n"
        "try:\n"
        f"    load_pretrained({str(gpt2_dir)!r})\n"
        "except DeadNeuronError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("pip install 'deadneuron[hf]'"), result.stdout


KINDS = {"opt": "relu", "gpt2": "gelu_tanh", "bert": "gelu", "llama": "silu"}


def _check_against_reference(report, model, family, data):
    expected = zoo.reference(model, family, data)
    assert [layer.name for layer in report.layers] == [path for path, _ in zoo.activations(model, family)]
    assert {layer.kind for layer in report.layers} == {KINDS[family]}
    assert report.samples == sum(len(batch["input_ids"]) for batch in data)
    for layer, want in zip(report.layers, expected, strict=True):
        assert (layer.units, layer.unit_axis) == (zoo.FFN, 2)
        assert set(layer.dead_units) == want["dead"], layer.name
        assert set(layer.dormant_units) == want["dormant"], layer.name
        assert set(layer.grad_dead_units) == want["grad_dead"], layer.name
        # per-sample quantities are per sequence, also where OPT folds the tokens into the rows
        np.testing.assert_allclose(layer.stats.firing_rate, want["firing_rate"])
    assert not report.unobserved


def test_scan_of_mapping_batches_matches_the_reference(family, built):
    data = zoo.batches(family)
    report = deadneuron.scan(built, data)
    assert report.loss == ("model" if family == "bert" else "probe")
    _check_against_reference(report, built, family, data)


def test_scan_of_token_ids_alone(family, built):
    ids = torch.cat([batch["input_ids"] for batch in zoo.batches(family)])
    report = deadneuron.scan(built, ids, batch_size=8, loss="probe")
    _check_against_reference(report, built, family, zoo.batches(family))


def test_activation_classes_are_looked_up_never_imported():
    code = (
        "import sys, torch, deadneuron\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))\n"
        "report = deadneuron.scan(model, torch.randn(16, 4))\n"
        "print(len(report.layers), 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "False"]


def _save_ids(path, data):
    """The batches as one .npz of named arrays (input_ids, attention_mask, labels), as a user would save them."""
    arrays = {key: torch.cat([batch[key] for batch in data]).numpy() for key in data[0]}
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_cli_scans_a_saved_directory_with_named_arrays(family, built, saved, tmp_path):
    data = zoo.batches(family)
    ids = _save_ids(tmp_path / "ids.npz", data)
    result = run_cli("scan", str(saved), "--data", str(ids), "--batch-size", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loss"] == ("model" if family == "bert" else "probe")
    expected = zoo.reference(built, family, data)
    assert [layer["name"] for layer in report["layers"]] == [path for path, _ in zoo.activations(built, family)]
    zoo.same_units(report["layers"], expected)


@pytest.mark.slow
def test_cli_scans_and_inspects_a_directory_with_random_token_ids(tmp_path):
    model = zoo.build("opt")
    model.save_pretrained(tmp_path / "opt")
    result = run_cli("scan", str(tmp_path / "opt"), "--samples", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 8 and len(report["layers"]) == zoo.LAYERS
    # forced units are found whatever the inputs: [0, 1] dead in layer 0, 3 in layer 1
    assert [layer["dead_units"] for layer in report["layers"]] == [[0, 1], [3]]
    result = run_cli("inspect", str(tmp_path / "opt"))
    assert result.returncode == 0, result.stderr
    assert "model.decoder.layers.1.activation_fn" in result.stdout


def test_random_inputs_of_a_token_model_are_token_ids(built, family):
    report = deadneuron.scan(built, samples=4, batch_size=2)
    assert report.samples == 4 and len(report.layers) == zoo.LAYERS


@pytest.mark.slow
def test_cli_user_errors_exit_2_with_one_line(gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("scan", str(empty), "--samples", "4")
    assert result.returncode == 2
    assert "is a folder without config.json; expected a model file or a transformers model directory" in (
        last_line(result.stderr)
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 3)), target=np.zeros(4))
    result = run_cli("scan", str(gpt2_dir), "--data", str(bad))
    assert result.returncode == 2
    assert "has no array named 'x' (it has: image, target)" in last_line(result.stderr)
    _edit_config(gpt2_dir, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    result = run_cli("inspect", str(gpt2_dir))
    assert result.returncode == 2
    assert "remote code" in last_line(result.stderr) and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_without_transformers_exits_2_naming_the_extra(gpt2_dir):
    result = run_cli_without("transformers", "scan", str(gpt2_dir), "--samples", "4", timeout=120)
    assert result.returncode == 2, result.stderr
    assert last_line(result.stderr).endswith("pip install 'deadneuron[hf]'")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_mapping_without_known_keys_is_refused(opt):
    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(DeadNeuronError, match=r"a batch is a mapping with keys 'tokens'; expected 'x' .*input_ids"):
        deadneuron.scan(opt, [batch])
    with pytest.raises(DeadNeuronError, match=r"the data is a mapping with keys 'tokens'; expected 'x'"):
        deadneuron.scan(opt, batch)


def test_loss_model_needs_a_model_that_takes_labels(opt):
    data = [{"input_ids": batch["input_ids"]} for batch in zoo.batches("opt")]
    with pytest.raises(DeadNeuronError, match="loss='model' takes the loss the model computes"):
        deadneuron.scan(opt, data, loss="model")


def test_compare_agreement_is_per_token(opt):
    data = zoo.batches("opt")
    comparison = deadneuron.compare(opt, data)
    assert [entry["kind"] for entry in comparison.to_dict()["swapped"]] == ["relu", "relu"]
    swapped = deadneuron.swap(opt)
    with torch.no_grad():
        same = torch.cat([opt(**b).logits.argmax(-1) == swapped(**b).logits.argmax(-1) for b in data])
    assert same.shape == (16, zoo.SEQ)
    assert comparison.agreement == pytest.approx(float(same.double().mean()))
    assert 0 < comparison.agreement < 1


def test_compare_of_a_model_without_relu_swaps_nothing():
    comparison = deadneuron.compare(zoo.build("gpt2"), zoo.batches("gpt2"))
    assert comparison.to_dict()["swapped"] == []
    assert comparison.agreement == 1.0
    assert comparison.verdict()[0].startswith("Nothing was swapped for sinerelu; left alone: 2 gelu_tanh sites")


def _reference_sets(model, family):
    return [{state: layer[state] for state in STATES} for layer in zoo.reference(model, family, zoo.batches(family))]


@pytest.fixture(scope="module")
def bert():
    return zoo.build("bert")


def test_batches_as_users_hold_them_agree(bert):
    from torch.utils.data import DataLoader

    data = zoo.batches("bert")
    whole = {key: torch.cat([batch[key] for batch in data]) for key in data[0]}
    expected = _reference_sets(bert, "bert")
    rows = [{key: value[i] for key, value in whole.items()} for i in range(len(whole["input_ids"]))]
    forms = {
        "mapping of tensors": whole,
        "mapping of arrays": {key: value.numpy() for key, value in whole.items()},
        "DataLoader of mappings": DataLoader(rows, batch_size=8),  # default_collate stacks the dicts
        "((inputs...), labels) pairs": [((b["input_ids"], b["attention_mask"]), b["labels"]) for b in data],
    }
    for what, form in forms.items():
        report = deadneuron.scan(bert, form, batch_size=8, loss="ce")
        assert report.samples == 16, what
        assert zoo.unit_sets(report) == expected, what
    # keyword inputs with labels: the model's own loss; positional inputs cannot take labels=, so ce from 'auto'
    assert deadneuron.scan(bert, whole, batch_size=8).loss == "model"
    assert deadneuron.scan(bert, forms["((inputs...), labels) pairs"]).loss == "ce"


@pytest.mark.slow
def test_a_config_key_that_names_layers_without_counting_them_is_not_refused(tmp_path):
    """Qwen2's max_window_layers (28 by default) is a threshold, not a count of built layers: a one-layer Qwen2
    (15 tensors) was refused as a config that describes more layers than its weights hold."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )
    assert config.max_window_layers == 28
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    result = run_cli("inspect", str(tmp_path / "qwen2"))
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.act_fn" in result.stdout
