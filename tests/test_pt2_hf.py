"""`.pt2` files of transformers models, exported by the recipe of docs/torch-scan.md (`hf_zoo.export`): their
outputs are ModelOutput trees, loaded only as transformers' own ModelOutput classes (deadneuron/torch/pt2_specs.py);
the scan of the file finds the units forced dead by construction, as the scan of the model does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import deadneuron  # noqa: E402
from deadneuron import DeadNeuronError  # noqa: E402
from deadneuron.api import swap_file  # noqa: E402
from deadneuron.cli import main  # noqa: E402
from deadneuron.torch.pt2 import load  # noqa: E402

from . import hf_zoo as zoo  # noqa: E402
from . import safety_corpus as corpus  # noqa: E402
from .conftest import ROOT, last_line, run_cli, run_cli_without  # noqa: E402

STATES = zoo.STATES


@pytest.fixture(scope="module", params=["opt", "bert"])
def exported(request, tmp_path_factory):
    """(family, eager model, path of its .pt2, .npz of the batches with named arrays)."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"{family}_pt2")
    model = zoo.build(family)
    data = zoo.batches(family)
    zoo.export(model, data[0], folder / "model.pt2")
    arrays = {key: torch.cat([batch[key] for batch in data]).numpy() for key in data[0]}
    np.savez(folder / "ids.npz", **arrays)
    return family, model, folder / "model.pt2", folder / "ids.npz"


def test_the_program_returns_the_model_output_class(exported):
    family, model, path, _ = exported
    program = load(str(path))
    batch = zoo.batches(family)[0]
    out = program.module()(**batch)
    with torch.no_grad():
        want = model(**batch)
    assert type(out) is type(want)
    torch.testing.assert_close(out.logits, want.logits)


def test_the_file_scan_finds_what_the_model_scan_finds(exported):
    family, model, path, _ = exported
    data = zoo.batches(family)
    eager = deadneuron.scan(model, data)
    from_file = deadneuron.scan(load(str(path)), data)
    assert from_file.loss == eager.loss == ("model" if family == "bert" else "probe")
    assert [layer.name for layer in from_file.layers] == [layer.name for layer in eager.layers]
    for a, b in zip(from_file.layers, eager.layers, strict=True):
        assert (a.dead_units, a.dormant_units, a.grad_dead_units) == (b.dead_units, b.dormant_units, b.grad_dead_units)


@pytest.mark.slow
def test_cli_scan_of_the_file_finds_the_forced_units(exported):
    family, model, path, ids = exported
    result = run_cli("scan", str(path), "--data", str(ids), "--batch-size", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = zoo.reference(model, family, zoo.batches(family))
    assert [layer["name"] for layer in report["layers"]] == [name for name, _ in zoo.activations(model, family)]
    zoo.same_units(report["layers"], expected)


@pytest.mark.slow
def test_cli_random_inputs_inspect_and_compare_of_the_file(exported):
    family, _, path, ids = exported
    result = run_cli("scan", str(path), "--samples", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 8
    # forced dead units stay dead whatever the tokens
    assert [
        set(layer["dead_units"]) >= set(forced["dead"])
        for layer, forced in zip(report["layers"], zoo.FORCED[family], strict=True)
    ] == [True, True]
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert zoo.activations(zoo.build(family), family)[1][0] in result.stdout
    result = run_cli("compare", str(path), "--data", str(ids))
    assert result.returncode == 0, result.stderr


def test_a_swapped_file_keeps_the_output_class_and_loads_with_torch(exported, tmp_path):
    family, model, path, _ = exported
    swap_file(path, tmp_path / "swapped.pt2")
    batch = zoo.batches(family)[0]
    ours, theirs = load(str(tmp_path / "swapped.pt2")), torch.export.load(tmp_path / "swapped.pt2")
    out = theirs.module()(**batch)
    assert type(out) is type(ours.module()(**batch)) is type(model(**batch))


def test_data_may_leave_out_keywords_that_follow_their_example(exported):
    # the token ids alone: the attention mask of ones is filled in, as transformers does; BERT's labels too
    family, model, path, _ = exported
    ids = torch.cat([batch["input_ids"] for batch in zoo.batches(family)])
    from_file = deadneuron.scan(load(str(path)), ids, batch_size=8, loss="probe")
    eager = deadneuron.scan(model, ids, batch_size=8, loss="probe")
    assert from_file.samples == eager.samples == len(ids)
    for a, b in zip(from_file.layers, eager.layers, strict=True):
        assert (a.dead_units, a.dormant_units, a.grad_dead_units) == (b.dead_units, b.dormant_units, b.grad_dead_units)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(eager GPT-2, path of its .pt2 by the recipe, .npz of the batches): torch.export writes its gelu_new
    (`NewGELUActivation`, a tanh formula) out in primitive ops (pow, mul, add, tanh), with no activation op."""
    folder = tmp_path_factory.mktemp("gpt2_pt2")
    model = zoo.build("gpt2")
    data = zoo.batches("gpt2")
    program = zoo.export(model, data[0], folder / "model.pt2")
    assert not [n for n in program.graph.nodes if "gelu" in str(n.target)]  # the premise: no gelu op in the graph
    np.savez(folder / "ids.npz", **{key: torch.cat([batch[key] for batch in data]).numpy() for key in data[0]})
    return model, folder / "model.pt2", folder / "ids.npz"


def test_gpt2s_gelu_written_out_in_primitive_ops_is_one_site_per_module(gpt2):
    model, path, _ = gpt2
    data = zoo.batches("gpt2")
    report = deadneuron.scan(load(str(path)), data)
    eager = deadneuron.scan(model, data)
    assert report.unobserved == [] == eager.unobserved
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        (layer.name, layer.kind) for layer in eager.layers
    ] == [(name, "gelu_tanh") for name, _ in zoo.activations(model, "gpt2")]
    expected = zoo.reference(model, "gpt2", data)
    zoo.same_units([layer.to_dict() for layer in report.layers], expected)
    for layer, want in zip(report.layers, expected, strict=True):  # per sequence, as the hooks count it
        np.testing.assert_allclose(layer.stats.firing_rate, want["firing_rate"], atol=1e-6)
    # a comparison folds the program's scopes as the scan does: nothing to swap, both GELUs named as left alone
    comparison = deadneuron.compare(load(str(path)), data)
    assert comparison.verdict()[0].startswith("Nothing was swapped for sinerelu; left alone: 2 gelu_tanh sites")


@pytest.mark.slow
def test_cli_scan_of_the_gpt2_file_finds_the_forced_units(gpt2):
    model, path, ids = gpt2
    result = run_cli("scan", str(path), "--data", str(ids), "--batch-size", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    assert "not observed" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["unobserved"] == []
    assert [(layer["name"], layer["kind"]) for layer in report["layers"]] == [
        (name, "gelu_tanh") for name, _ in zoo.activations(model, "gpt2")
    ]
    expected = zoo.reference(model, "gpt2", zoo.batches("gpt2"))
    zoo.same_units(report["layers"], expected)
    for layer, forced in zip(report["layers"], zoo.FORCED["gpt2"], strict=True):
        for state in STATES:
            assert set(layer[f"{state}_units"]) >= set(forced[state]), (layer["name"], state)


def test_gpt2_exported_with_the_tanh_gelu_as_one_op_keeps_its_kind(tmp_path):
    # ACT2FN["gelu_pytorch_tanh"] is one aten.gelu(approximate="tanh") in the graph: a gelu_tanh site, as eager
    from transformers.activations import ACT2FN

    model = zoo.build("gpt2")
    data = zoo.batches("gpt2")
    for block in model.transformer.h:
        block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
    zoo.export(model, data[0], tmp_path / "gpt2.pt2")
    report = deadneuron.scan(load(str(tmp_path / "gpt2.pt2")), data)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        (name, "gelu_tanh") for name, _ in zoo.activations(model, "gpt2")
    ]
    zoo.same_units([layer.to_dict() for layer in report.layers], zoo.reference(model, "gpt2", data))


def test_a_static_batch_program_of_keyword_inputs_is_cut_into_its_batches(tmp_path):
    model = zoo.build("opt")
    data = zoo.batches("opt", n=12, batch_size=4)
    zoo.export(model, data[0], tmp_path / "static.pt2", dynamic=False)
    ids = {key: torch.cat([batch[key] for batch in data]) for key in data[0]}
    report = deadneuron.scan(load(str(tmp_path / "static.pt2")), ids, batch_size=5, loss="probe")
    eager = deadneuron.scan(model, ids, batch_size=5, loss="probe")
    assert report.samples == eager.samples == 12
    assert [layer.dead_units for layer in report.layers] == [layer.dead_units for layer in eager.layers]


def _edit_output_type(source, target, name):
    def edit(document):
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["out_spec"])
        spec[1]["type"] = name
        signature["out_spec"] = json.dumps(spec)

    return corpus.rewrite(source, target, corpus.edit_program(edit))


@pytest.mark.parametrize(
    "name, message",
    [
        ("transformers.modeling_outputs.ModelOutput", "not a ModelOutput class defined in"),  # the base, re-exported
        ("transformers.models.opt.modeling_opt.OPTForCausalLM", "not a ModelOutput class defined in"),
        ("transformers.models.opt.modeling_opt.CausalLMOutputWithPast", "not a ModelOutput class defined in"),
        ("transformers.models.no_such_model.modeling_no_such_model.Output", "has no module"),
        ("transformers.utils.import_utils.Thing", "which is not a transformers ModelOutput"),
    ],
)
def test_only_model_output_classes_of_transformers_are_admitted(exported, tmp_path, name, message):
    _, _, path, _ = exported
    crafted = _edit_output_type(path, tmp_path / "crafted.pt2", name)
    with pytest.raises(DeadNeuronError, match=message):
        load(str(crafted))


def test_names_outside_transformers_model_outputs_are_refused_before_any_import(tmp_path):
    # In a fresh process: refused, and the module the name points into was not imported.
    good = corpus.good_pt2(tmp_path)
    crafted = _edit_output_type(good, tmp_path / "crafted.pt2", "transformers.commands.serving.ServeCommand")
    code = (
        "import sys\nfrom deadneuron.cli import main\n"
        f"code = main(['scan', {str(crafted)!r}, '--samples', '4'])\n"
        "print(code, 'transformers.commands' in sys.modules, 'transformers.commands.serving' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr
    assert "not a transformers ModelOutput" in last_line(result.stderr)


@pytest.mark.slow
def test_without_transformers_the_cli_names_the_class_and_the_extra(exported):
    family, _, path, _ = exported
    result = run_cli_without("transformers", "scan", str(path), "--samples", "4")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    name = {"opt": "CausalLMOutputWithPast", "bert": "SequenceClassifierOutput"}[family]
    line = last_line(result.stderr)
    assert f"returns transformers.modeling_outputs.{name}, a transformers ModelOutput" in line, line
    assert line.endswith("pip install 'deadneuron[hf]'"), line


def test_what_torch_export_logged_is_in_the_error_and_under_debug(tmp_path, capsys):
    good = corpus.good_pt2(tmp_path)

    def edit(document):  # a warning from torch's deserializer, then a failure
        document["range_constraints"]["s99"] = {"min_val": 0, "max_val": 5}
        document["verifiers"] = ["no_such_dialect"]

    crafted = corpus.rewrite(good, tmp_path / "logged.pt2", corpus.edit_program(edit))
    for extra in ([], ["--debug"]):
        assert main(["scan", str(crafted), "--samples", "4", *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("deadneuron: error: cannot load")
        assert "no_such_dialect" in lines[-1]
        assert "torch.export logged: Symbol s99 did not appear in the graph" in lines[-1]
        if not extra:
            assert len(lines) == 1, lines
        else:
            assert "RuntimeError: torch.export logged:\nSymbol s99 did not appear" in err  # all of them, in the chain
