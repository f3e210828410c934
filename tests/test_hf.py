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
from .conftest import ROOT  # noqa: E402

STATES = ("dead", "dormant", "grad_dead")


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def family(request):
    return request.param


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
