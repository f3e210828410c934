"""The crafted corpus (tests/safety_corpus.py): every file is refused in one line (exit 2) or loads cleanly
(exit 0) without its payload running; no marker appears and no file changes. Bombs stay within twice the peak
memory of a normal scan of the same model, measured in a child process."""

from __future__ import annotations

import re
import sys

import pytest

pytest.importorskip("torch")

from deadneuron.cli import main  # noqa: E402

from . import safety_corpus as corpus  # noqa: E402


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, {case.label: case for case in corpus.build(folder, bombs=False)}


def _check(folder, case, code, lines):
    assert not (folder / corpus.MARKER).exists(), f"{case.label}: the payload ran"
    assert (folder / corpus.VICTIM).read_bytes() == corpus.VICTIM_TEXT, f"{case.label}: a file was overwritten"
    assert code == case.expect, (case.label, lines)
    if case.expect == 2:
        assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), (case.label, lines)
        assert re.search(case.message, lines[0]), (case.label, lines[0])


def test_crafted_files_run_nothing_and_fail_in_one_line(cases, capsys, monkeypatch):
    folder, table = cases
    monkeypatch.syspath_prepend(str(folder))  # payload modules lying next to the files are importable
    assert len(table) >= 12
    for case in table.values():
        code = main([case.args[0], str(case.path), *case.args[1:]])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        _check(folder, case, code, lines)
        assert "corpus_payload" not in sys.modules, case.label
        if case.expect == 0:  # a clean load: the report came out
            assert "activation sites" in captured.out, (case.label, captured.out)


@pytest.mark.slow
def test_bombs_in_fresh_processes_stay_within_twice_a_normal_scan(tmp_path):
    bombs = [c for c in corpus.build(tmp_path, bombs=True) if c.bomb]
    assert bombs
    baselines: dict[tuple[str, ...], int] = {}
    for case in bombs:
        code, lines, peak = corpus.run_child([case.args[0], str(case.path), *case.args[1:]])
        _check(tmp_path, case, code, lines)
        key = tuple(case.baseline)
        if key not in baselines:
            baselines[key] = corpus.run_child(case.baseline)[2]
        assert peak <= 2 * baselines[key], (case.label, peak, baselines[key])
