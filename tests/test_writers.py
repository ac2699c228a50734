"""No writer deletes or replaces what a user put there.

Every command that writes a folder refuses, in one line (exit 2) and before any work starts, a folder holding a file
of the user's, a file where its folder goes, and an output of another kind (a prompt folder); the user's bytes are
unchanged afterwards. A re-run over the writer's own earlier output replaces it. Work is a function patched to fail
the test if it runs before the refusal (``Writer.work``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench.cli import main
from cpt_bench.files import EXPORT_MARKER, OutputKind, OutputPathError, ensure_replaceable
from cpt_bench.matrix import store
from tests.compress_helpers import _one_thread  # noqa: F401  (autouse)
from tests.prompt_helpers import save_random_prompt
from tests.test_leaderboard import _results_with, config_with, make_run_folder
from tests.test_matrix import tiny_config

USER_BYTES = b"my own notes, not cpt_bench's \x00\xff\n"


@dataclass(frozen=True)
class Inputs:
    """What the writers' command lines read: the tiny model, a soft prompt folder, a matrix config, a run folder."""

    tmp: Path
    model: Path
    prompt: Path
    config: Path
    run: Path


@dataclass(frozen=True)
class Writer:
    """A command that writes an output folder: ``argv(inputs, target)``, the ``module:function`` doing its work, and
    an output of another kind (an ``Inputs`` field)."""

    argv: Callable[[Inputs, Path], list[str]]
    work: str
    other_kind: str = "prompt"  # a soft prompt folder is none of the other writers' outputs


WRITERS = {
    "compress --out": Writer(lambda i, out: ["compress", "--model", str(i.model), "--spec", "rtn-w8", "--out",
                                             str(out)], "cpt_bench.compress.checkpoints:load_causal_lm"),
    "compress --export-gptq": Writer(lambda i, out: ["compress", "--model", str(i.model), "--spec", "rtn-w4g32",
                                                     "--out", str(i.tmp / "checkpoint"), "--export-gptq", str(out)],
                                     "cpt_bench.compress.checkpoints:load_causal_lm"),
    "prompt export-peft": Writer(lambda i, out: ["prompt", "export-peft", str(i.prompt), str(out)],
                                 "cpt_bench.recovery.artifact:read_prompt"),
    "corpus --export": Writer(lambda i, out: ["corpus", "shakespeare", "--export", str(out)],
                              "cpt_bench.corpus:load_split"),
    "matrix --out": Writer(lambda i, out: ["matrix", str(i.config), "--out", str(out)],
                           "cpt_bench.matrix.run:validate_plan"),
    "merge OUT": Writer(lambda i, out: ["merge", str(out), str(i.run)], "cpt_bench.matrix.store:merge"),
    "report --out": Writer(lambda i, out: ["report", str(i.run), "--out", str(out)],
                           "cpt_bench.report.plots:write_plots"),
    "case-study --out": Writer(lambda i, out: ["case-study", str(i.run), "--out", str(out)],
                               "cpt_bench.report.case_study:build_case_study"),
    "prompt train --out": Writer(lambda i, out: ["prompt", "train", "--model", str(i.model), "--source", "wikipedia",
                                                 "--out", str(out), "--n-virtual-tokens", "2", "--steps", "1",
                                                 "--eval-every", "1", "--seqlen", "16", "--eval-windows", "1",
                                                 "--device", "cpu"],
                                 "cpt_bench.models:load_model", other_kind="run"),
    "evaluate --out": Writer(lambda i, out: ["evaluate", "--model", str(i.model), "--tasks", "cpt_ppl_wikipedia",
                                             "--out", str(out)], "cpt_bench.evaluate:run_evaluation"),
}


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, filled_fake_cache) -> Inputs:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = save_random_prompt(tmp_path / "prompt", model, AutoTokenizer.from_pretrained(tiny_model_dir))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir)), encoding="utf-8")
    return Inputs(tmp_path, tiny_model_dir, prompt, config, make_run_folder(tmp_path / "run", config_with()))


def _forbid(monkeypatch, work: str) -> None:
    module, name = work.split(":")

    def ran(*_args, **_kwargs):
        raise AssertionError(f"{work} ran before the output path was checked")

    monkeypatch.setattr(f"{module}.{name}", ran)


def _refused(argv: list[str], target: Path, capsys) -> str:
    """Run ``argv``; assert exit 2 with one line naming ``target``; the line."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(target) in error and "Traceback" not in error, error
    return error


def _user_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(USER_BYTES)
    return folder


@pytest.mark.parametrize("writer", WRITERS)
def test_a_folder_of_the_users_files_is_refused_before_any_work(writer, inputs, monkeypatch, capsys):
    folder = _user_folder(inputs.tmp)
    _forbid(monkeypatch, WRITERS[writer].work)
    error = _refused(WRITERS[writer].argv(inputs, folder), folder, capsys)
    assert "notes.txt" in error and "choose an empty or new folder" in error
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_bytes() == USER_BYTES


@pytest.mark.parametrize("writer", WRITERS)
def test_a_file_in_place_of_the_folder_is_refused_before_any_work(writer, inputs, monkeypatch, capsys):
    file = inputs.tmp / "mine"
    file.write_bytes(USER_BYTES)
    _forbid(monkeypatch, WRITERS[writer].work)
    assert "is a file, not a folder" in _refused(WRITERS[writer].argv(inputs, file), file, capsys)
    assert file.read_bytes() == USER_BYTES


@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_of_another_kind_is_refused(writer, inputs, monkeypatch, capsys):
    other = inputs.tmp / "other"
    shutil.copytree(getattr(inputs, WRITERS[writer].other_kind), other)
    before = {path: path.read_bytes() for path in other.rglob("*") if path.is_file()}
    _forbid(monkeypatch, WRITERS[writer].work)
    assert "holds files that are not a" in _refused(WRITERS[writer].argv(inputs, other), other, capsys)
    assert {path: path.read_bytes() for path in other.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("writer", WRITERS)
def test_an_out_path_that_cannot_be_created_is_one_line_naming_it(writer, inputs, monkeypatch, capsys):
    (inputs.tmp / "a-file").write_bytes(USER_BYTES)
    target = inputs.tmp / "a-file" / "x"
    _forbid(monkeypatch, WRITERS[writer].work)
    assert "cannot create the folder" in _refused(WRITERS[writer].argv(inputs, target), target, capsys)
    assert (inputs.tmp / "a-file").read_bytes() == USER_BYTES


def test_compress_and_its_gptq_export_rerun_over_their_own_output(inputs, capsys):
    out, export = inputs.tmp / "checkpoint", inputs.tmp / "gptq"
    argv = WRITERS["compress --export-gptq"].argv(inputs, export)
    assert main(argv) == 0 and main(argv) == 0
    assert json.loads((out / "compression.json").read_text())["spec"] == "rtn-w4g32"
    assert json.loads((export / EXPORT_MARKER).read_text())["spec"] == "rtn-w4g32"
    assert main(["compress", "--model", str(inputs.model), "--spec", "rtn-w8", "--out", str(out)]) == 0
    assert json.loads((out / "compression.json").read_text())["spec"] == "rtn-w8"
    capsys.readouterr()  # each is the other's "another kind"
    _refused(["compress", "--model", str(inputs.model), "--spec", "rtn-w8", "--out", str(export)], export, capsys)
    _refused(argv[:-1] + [str(out)], out, capsys)


@pytest.mark.parametrize("writer", ["prompt export-peft", "corpus --export", "report --out", "prompt train --out"])
def test_a_rerun_replaces_its_own_earlier_output(writer, inputs, capsys):
    out = inputs.tmp / "out"
    argv = WRITERS[writer].argv(inputs, out)
    assert main(argv) == 0
    first = sorted(path.relative_to(out) for path in out.rglob("*"))
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == first


def test_an_empty_folder_is_written_into(inputs):
    out = inputs.tmp / "empty"
    out.mkdir()
    assert main(WRITERS["prompt export-peft"].argv(inputs, out)) == 0
    assert (out / "adapter_config.json").is_file()


def test_a_run_folder_is_recognised_for_resume_even_with_a_stale_lock(tmp_path):
    run = make_run_folder(tmp_path / "run", config_with())
    (run / "run.lock").write_text("{}")
    ensure_replaceable(run, store.RUN_FOLDER_KIND, "--out")
    only_lock = tmp_path / "killed"
    only_lock.mkdir()
    (only_lock / "run.lock").write_text("{}")
    ensure_replaceable(only_lock, store.RUN_FOLDER_KIND, "--out")


def test_a_marker_must_hold_its_kind_fields(tmp_path):
    kind = OutputKind("thing", "thing.json", (("format", "cpt_bench.thing/1"),))
    for text in ('{"format": "cpt_bench.thing/2"}', "[]", "not json", '{"format": "cpt_bench.thing/1"'):
        (tmp_path / "thing.json").write_text(text)
        with pytest.raises(OutputPathError, match="thing.json"):
            ensure_replaceable(tmp_path, kind, "--out")
    (tmp_path / "thing.json").write_text('{"format": "cpt_bench.thing/1", "more": 1}')
    ensure_replaceable(tmp_path, kind, "--out")


def test_large_outputs_of_its_own_are_recognised(tmp_path):
    """A leaderboard page or report of many runs, or the per-layer record of a large model, runs to megabytes: the
    size of its own marker never makes a writer refuse to replace it."""
    page = OutputKind("a page", "page.md", contains="# Title\n")
    (tmp_path / "page.md").write_text("# Title\n" + "row\n" * 200_000)  # 800 kB, the title first
    ensure_replaceable(tmp_path, page, "--out")
    record = OutputKind("a record", "record.json", (("format", "cpt_bench.record/1"),))
    layers = {f"model.layers.{index}.mlp.down_proj": {"bits": 4, "group_size": 128} for index in range(20_000)}
    (tmp_path / "page.md").unlink()
    (tmp_path / "record.json").write_text(json.dumps({"format": "cpt_bench.record/1", "layers": layers}))
    assert (tmp_path / "record.json").stat().st_size > 1 << 20
    ensure_replaceable(tmp_path, record, "--out")


# --- the leaderboard writes two pages into a results folder that holds other things too -----------------------

def test_leaderboard_refuses_pages_it_did_not_write_and_a_file_as_results(tmp_path, capsys):
    results = _results_with(tmp_path, config_with(name="committed"))
    (results / "notes.txt").write_bytes(USER_BYTES)  # anything else in a results folder is left alone
    assert main(["leaderboard", "--results", str(results)]) == 0
    assert main(["leaderboard", "--results", str(results)]) == 0  # its own pages: replaced
    assert (results / "notes.txt").read_bytes() == USER_BYTES
    run = make_run_folder(tmp_path / "elsewhere", config_with())
    for page in ("LEADERBOARD.md", "LEADERBOARD.html"):
        (results / page).write_bytes(USER_BYTES)
        error = _refused(["leaderboard", "--results", str(results), "--add", str(run)], results, capsys)
        assert page in error and (results / page).read_bytes() == USER_BYTES
        assert not (results / "submitted").exists()  # refused before the run was copied in
        (results / page).unlink()
    file = tmp_path / "results-file"
    file.write_bytes(USER_BYTES)
    assert "is a file, not a folder" in _refused(["leaderboard", "--results", str(file)], file, capsys)
    assert file.read_bytes() == USER_BYTES
