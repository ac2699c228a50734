"""The transfer matrix on the tiny model and the fake cache: config validation, planning, runs that are
killed and resumed, shards and merge, the Ray executor, and the summary the reports read."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cpt_bench.cli import main
from cpt_bench.matrix import store
from cpt_bench.matrix.config import ConfigError, config_from_dict, load_config
from cpt_bench.matrix.plan import PromptChoice, make_plan, shard_plan
from cpt_bench.matrix.run import check_prompt_trained, merge_runs, run_matrix
from cpt_bench.recovery.training import SoftPromptError
from cpt_bench.report import write_run_report
from cpt_bench.report.tables import prompt_label
from tests.compress_helpers import _one_thread  # noqa: F401  (autouse)

TRAINING = {"n_virtual_tokens": 3, "steps": 2, "batch_size": 1, "seqlen": 16, "eval_every": 2, "eval_windows": 2,
            "lr": 0.03}


def tiny_config(model: str | Path = "embedded", **overrides) -> dict:
    """A small matrix: 2 levels x (none, hard, one soft prompt, the trivial-prefix control) x 2 targets = 16 cells in
    8 groups."""
    config = {
        "name": "tiny", "model": str(model), "device": "cpu", "ppl_seqlen": 32, "batch_size": 4,
        "compression": {"specs": ["dense", "rtn-w4g32"]},
        "prompts": {"hard": ["paper"], "soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"],
                                               "training": TRAINING}},
        "targets": [{"task": "cpt_ppl_wikipedia", "limit": 2}, {"task": "cpt_piqa", "limit": 4}],
    }
    config.update(overrides)
    return config


def write_config(folder: Path, config: dict) -> Path:
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_under(cache: Path, config: dict, folder: Path) -> Path:
    """Run ``config`` into ``folder/run`` with ``cache`` as the cache (for module-scoped fixtures) and write its
    report, as ``cpt-bench matrix`` does; the run folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPT_BENCH_CACHE", str(cache))
        run_dir = run_matrix(write_config(folder, config), folder / "run")
        write_run_report(run_dir)
        return run_dir


# --- config validation and planning (no model) -----------------------------------------------------------------

def ids(plan) -> set[tuple[str, str, str]]:
    return {(cell.compression, cell.prompt.id, cell.target.task) for cell in plan.cells}


def planning_config(**transfer) -> dict:
    return {
        "name": "plan",
        "compression": {"specs": ["dense", "rtn-w4g32", "rtn-w3g32", "magnitude-50"]},
        "prompts": {"hard": ["paper"], "soft": {"sources": ["wikipedia", "shakespeare"], "trained_at": ["rtn-w4g32"]}},
        "transfer": transfer,
        "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 10}],
    }


def test_planner_expands_every_cell_and_shares_artifacts():
    plan = make_plan(config_from_dict(planning_config()))
    specs = ["dense", "rtn-w4g32", "rtn-w3g32", "magnitude-50"]
    prompts = ["none", "hard-paper", "soft-wikipedia@rtn-w4g32", "soft-shakespeare@rtn-w4g32", "trivial"]
    tasks = ["cpt_ppl_wikipedia", "cpt_piqa"]
    assert ids(plan) == {(s, p, t) for s in specs for p in prompts for t in tasks}
    assert len(plan.cells) == 40 and len(plan.groups()) == 20
    assert plan.compressed == ("rtn-w4g32", "rtn-w3g32", "magnitude-50")
    assert [p.id for p in plan.soft_prompts] == ["soft-wikipedia@rtn-w4g32", "soft-shakespeare@rtn-w4g32", "trivial"]
    relations = {(c.compression, c.prompt.id, c.target.task): (c.dataset_relation, c.compression_relation)
                 for c in plan.cells}
    assert relations["rtn-w4g32", "soft-wikipedia@rtn-w4g32", "cpt_ppl_wikipedia"] == ("in-domain", "same")
    assert relations["rtn-w3g32", "soft-wikipedia@rtn-w4g32", "cpt_piqa"] == ("cross-dataset", "cross-level")
    assert relations["magnitude-50", "soft-shakespeare@rtn-w4g32", "cpt_ppl_wikipedia"] == ("cross-dataset",
                                                                                              "cross-type")
    assert relations["dense", "none", "cpt_piqa"] == (None, None)
    assert relations["magnitude-50", "trivial", "cpt_piqa"] == (None, None)


def test_trivial_prefix_control_is_planned_by_default_at_every_level_and_can_be_turned_off():
    """The trivial-prefix control: one artifact of no level (the EOS token, written from the dense model), applied
    at every level on every target, with or without other prompts; ``prompts.trivial_prefix: false`` drops it."""
    unprompted = {"name": "bare", "compression": {"specs": ["dense", "rtn-w4g32"]},
                  "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 10}]}
    assert {p for _, p, _ in ids(make_plan(config_from_dict(unprompted)))} == {"none"}  # no prompt to set it beside
    hard = unprompted | {"prompts": {"hard": ["text:The"]}}
    plan = make_plan(config_from_dict(hard))
    assert ids(plan) == {(s, p, t) for s in ("dense", "rtn-w4g32") for p in ("none", "hard-text3", "trivial")
                         for t in ("cpt_ppl_wikipedia", "cpt_piqa")}
    (trivial,) = plan.soft_prompts
    assert (trivial.kind, trivial.control, trivial.trained_at, trivial.is_learned) == ("soft", "trivial", None, False)
    assert plan.compressed == ("rtn-w4g32",)  # the control needs no checkpoint of its own
    off = config_from_dict(hard | {"prompts": {"hard": ["text:The"], "trivial_prefix": False}})
    assert {p for _, p, _ in ids(make_plan(off))} == {"none", "hard-text3"} and not make_plan(off).soft_prompts
    shipped = make_plan(load_config(Path(__file__).parents[1] / "configs" / "default.yaml"))
    assert {(c.compression, c.target.task) for c in shipped.cells if c.prompt.id == "trivial"} == {
        (spec, target.task) for spec in shipped.config.compression.specs for target in shipped.config.targets}


def test_planner_without_transfers_keeps_only_in_domain_prompts_and_drops_unused_artifacts():
    config = config_from_dict(planning_config(datasets=False, compression_levels=False, compression_types=False))
    plan = make_plan(config)
    soft = {(c.compression, c.prompt.id, c.target.task) for c in plan.cells if c.prompt.is_learned}
    assert soft == {("rtn-w4g32", "soft-wikipedia@rtn-w4g32", "cpt_ppl_wikipedia")}
    assert [p.id for p in plan.soft_prompts] == ["soft-wikipedia@rtn-w4g32", "trivial"]  # shakespeare's: no cell
    assert len(plan.cells) == 4 * 3 * 2 + 1  # (none, hard, trivial) everywhere, the soft prompt in-domain


def test_hard_prompts_by_name_text_and_file(tmp_path):
    """A name keeps its label; a ``file:`` prompt is read into ``text:`` its content (a run folder's config does not
    depend on the file) and labelled ``text<n>`` like a ``text:`` one; the same text twice is refused."""
    path = tmp_path / "prompt.txt"
    path.write_text("Answer carefully, then check.\n", encoding="utf-8")
    config = config_from_dict(planning_config() | {"prompts": {"hard": ["paper", f"file:{path}", "text:Go on."]}})
    assert config.prompts.hard == ["paper", "text:Answer carefully, then check.\n", "text:Go on."]
    assert [p.id for p in dict.fromkeys(c.prompt for c in make_plan(config).cells) if p.kind == "hard"] == [
        "hard-paper", "hard-text30", "hard-text6"]
    assert config_from_dict(config.to_dict()) == config  # what a run folder stores reads back the same
    assert prompt_label({"kind": "hard", "name": "text:Answer carefully, then check.\n"}) == "hard:text30"
    assert prompt_label({"kind": "hard", "name": "paper"}) == "hard:paper"
    with pytest.raises(ConfigError, match=r"^prompts\.hard\[1\]: 'text:Answer carefully, then check\.\\n' repeats "
                                          r"hard\[0\] 'file:.*prompt\.txt' \(both text30\); expected each once$"):
        config_from_dict(planning_config() | {"prompts": {"hard": [f"file:{path}", "text:Answer carefully, then "
                                                                   "check.\n"]}})


def test_planner_levels_but_not_types():
    plan = make_plan(config_from_dict(planning_config(compression_types=False)))
    soft_levels = {c.compression for c in plan.cells if c.prompt.is_learned}
    assert soft_levels == {"rtn-w4g32", "rtn-w3g32"}  # not dense, not magnitude (other families)


def test_shards_are_disjoint_whole_groups_covering_the_plan():
    plan = make_plan(config_from_dict(planning_config()))
    shards = [shard_plan(plan, i, 3) for i in range(3)]
    cells = [cell.id for shard in shards for cell in shard.cells]
    assert sorted(cells) == sorted(cell.id for cell in plan.cells)
    for shard in shards:
        for key in shard.groups():
            assert shard.groups()[key] == plan.groups()[key]
        needed = {c.compression for c in shard.cells} | {p.trained_at for p in shard.soft_prompts}
        assert set(shard.compressed) == needed - {"dense", None}  # None: the trivial control's (no level)


def test_shipped_configs_validate_and_plan(capsys):
    shipped = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {path.stem for path in shipped} >= {"default", "paper", "paper-opt"}
    for path in shipped:
        assert make_plan(load_config(path)).cells
    assert main(["matrix", str(Path(__file__).parents[1] / "configs" / "default.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "60 cells in 20 (compression, prompt) groups" in out and "estimated time" in out


def test_dry_run_estimate_scales_with_the_models_size():
    """The estimate is the embedded model's rates scaled by parameter count, and says so."""
    from cpt_bench.matrix.plan import CELL_OVERHEAD_SECONDS, REFERENCE_PARAMETERS, describe, estimate_seconds

    plan = make_plan(config_from_dict(planning_config()))
    small, large = estimate_seconds(plan), estimate_seconds(plan, 8 * REFERENCE_PARAMETERS)
    overhead = CELL_OVERHEAD_SECONDS * len(plan.cells)  # lm-eval's per-cell set-up does not scale
    assert large["compression"] == pytest.approx(8 * small["compression"])
    assert large["cells"] - overhead == pytest.approx(8 * (small["cells"] - overhead))
    assert "scaled to 1076M parameters" in describe(plan, 8 * REFERENCE_PARAMETERS)


@pytest.mark.parametrize("name, model", [("paper", "huggyllama/llama-7b"), ("paper-opt", "facebook/opt-6.7b")])
def test_paper_configs_state_the_papers_protocol(name, model, capsys):
    """The plan of the paper's protocol, printed without the model or the Hub (``tox -e paper``)."""
    assert main(["matrix", str(Path(__file__).parents[1] / "configs" / f"{name}.yaml"), "--plan-only"]) == 0
    out = capsys.readouterr().out
    for protocol in (f"model {model} (bfloat16, cuda", "calibration: 128 x 2048 tokens of c4 (train)",
                     "gptq-w3-actorder, gptq-w4-actorder, sparsegpt-50, sparsegpt-75, sparsegpt-50+gptq-w4",
                     "soft-c4@gptq-w3-actorder, soft-c4@sparsegpt-75, soft-c4@sparsegpt-50+gptq-w4",
                     "100 tokens, init vocab, AdamW lr 0.001 weight decay 1e-05, 500 warmup then linear decay, "
                     "30000 steps of batch 2 x 1024 tokens, clip 1.0",
                     "targets (perplexity windows of 1024 tokens): cpt_ppl_corpus@wikitext2 (token_perplexity, limit "
                     "None), cpt_ppl_corpus@ptb (token_perplexity, limit None), cpt_ppl_corpus@c4 (token_perplexity, "
                     "limit 256)", "not checked"):
        assert protocol in out, protocol


BAD_CONFIGS = [
    ("unknown_key", {"colour": "red"}, r"^colour: unknown key; expected one of .*batch_size"),
    ("nested_unknown_key", {"compression": {"specs": ["dense"], "calib": {}}},
     r"^compression\.calib: unknown key; expected one of calibration, specs"),
    ("wrong_type", {"batch_size": "eight"}, r"^batch_size: got str 'eight', expected int"),
    ("bad_spec", {"compression": {"specs": ["dense", "gptq-w5g64"]}},
     r"^compression\.specs\[1\]: invalid compression spec 'gptq-w5g64': bits 5 is not one of 2, 3, 4, 8"),
    ("trained_at_not_a_level", {"prompts": {"soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w3g64"]}}},
     r"^prompts\.soft\.trained_at\[0\]: got 'rtn-w3g64', expected one of compression\.specs \(dense\)"),
    ("unknown_source", {"prompts": {"soft": {"sources": ["klingon"], "trained_at": ["dense"]}}},
     r"^prompts\.soft\.sources\[0\]: corpus 'klingon' is not a corpus spec: expected a built-in corpus \(wikipedia"),
    ("zero_steps", {"prompts": {"soft": {"sources": ["wikipedia"], "trained_at": ["dense"],
                                         "training": {"steps": 0}}}},
     r"^prompts\.soft\.training: soft prompt setting steps must be a positive integer"),
    ("limit_one", {"targets": [{"task": "cpt_piqa", "limit": 1}]},
     r"^targets\[0\]\.limit: got 1, expected an integer >= 2"),
    ("no_targets", {"targets": []}, r"^targets: got \[\], expected a non-empty list"),
    ("negative_calibration", {"compression": {"specs": ["dense"], "calibration": {"n_windows": -1}}},
     r"^compression\.calibration: calibration setting n_windows must be a positive integer, got -1"),
    ("targets_not_a_list", {"targets": "cpt_piqa"}, r"^targets: got str 'cpt_piqa', expected a list"),
    # a list that names one thing twice would run the same cells twice (and fail over its own summary)
    ("repeated_source", {"prompts": {"soft": {"sources": ["wikipedia", "milton", "wikipedia"],
                                              "trained_at": ["dense"]}}},
     r"^prompts\.soft\.sources\[2\]: 'wikipedia' repeats sources\[0\]; expected each once$"),
    ("repeated_level", {"compression": {"specs": ["dense", "rtn-w4g64"]},
                        "prompts": {"soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g64", "rtn-w4g64"]}}},
     r"^prompts\.soft\.trained_at\[1\]: 'rtn-w4g64' repeats trained_at\[0\]; expected each once$"),
    ("repeated_spec", {"compression": {"specs": ["dense", "rtn-w4g64", "rtn-w4g64"]}},
     r"^compression\.specs\[2\]: 'rtn-w4g64' repeats specs\[1\]; expected each once$"),
    ("repeated_target", {"targets": [{"task": "cpt_piqa", "limit": 4}, {"task": "cpt_piqa"}]},
     r"^targets\[1\]: 'cpt_piqa' repeats targets\[0\]; expected each once$"),
    ("repeated_hard_prompt", {"prompts": {"hard": ["paper", "paper"]}},
     r"^prompts\.hard\[1\]: 'paper' repeats hard\[0\]; expected each once$"),
    ("hard_prompts_of_one_label", {"prompts": {"hard": ["text:Read on.", "text:Go ahead"]}},
     r"^prompts\.hard\[1\]: 'text:Go ahead' repeats hard\[0\] 'text:Read on\.' \(both text8\); expected each once$"),
    ("hard_prompt_misspelt", {"prompts": {"hard": ["paper", "papr"]}},
     r"^prompts\.hard\[1\]: unknown hard prompt 'papr' \(did you mean 'paper'\?\); expected a registered name "
     r"\(paper, paper_long\), text:TEXT or file:PATH$"),
    ("hard_prompt_literal_text_without_form", {"prompts": {"hard": ["Read on."]}},
     r"^prompts\.hard\[0\]: unknown hard prompt 'Read on\.'; expected a registered name"),
    ("hard_prompt_file_missing", {"prompts": {"hard": ["file:no/such/prompt.txt"]}},
     r"^prompts\.hard\[0\]: hard prompt file no/such/prompt\.txt not found; expected file:PATH of a UTF-8 text "
     r"file$"),
    ("hard_prompt_text_empty", {"prompts": {"hard": ["text:"]}},
     r"^prompts\.hard\[0\]: hard prompt 'text:' is empty: expected text:TEXT with some text$"),
    ("repeated_lora_module", {"prompts": {"soft": {"sources": ["wikipedia"], "trained_at": ["dense"]},
                                          "lora": {"target_modules": ["q_proj", "v_proj", "q_proj"]}}},
     r"^prompts\.lora\.target_modules\[2\]: 'q_proj' repeats lora\.target_modules\[0\]; expected each once$"),
    ("require_improvement_not_a_flag", {"prompts": {"soft": {"require_improvement": "yes"}}},
     r"^prompts\.soft\.require_improvement: got str 'yes', expected bool"),
]


@pytest.mark.parametrize("overrides, message", [case[1:] for case in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_with_its_key_path(overrides, message):
    base = {"name": "bad", "targets": [{"task": "cpt_piqa", "limit": 4}]}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**base, **overrides})


def test_malformed_yaml_and_missing_file_fail_in_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntargets: [\n", encoding="utf-8")
    assert main(["matrix", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cpt-bench: error: config {path}: malformed YAML at line") and "\n" not in err
    assert main(["matrix", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (f"cpt-bench: error: config file {tmp_path / 'nope.yaml'} not found; "
                                               "expected a YAML file such as configs/default.yaml")


# --- runs on the tiny model ----------------------------------------------------------------------------------

def writable_cache(filled: Path, tmp_path_factory, name: str) -> Path:
    """A writable copy of the filled fake cache ``filled`` in a fresh folder named after ``name`` (runs add
    compressed checkpoints and adapters to it)."""
    root = tmp_path_factory.mktemp(name) / "cache"
    shutil.copytree(filled, root)
    return root


@pytest.fixture(scope="module")
def matrix_cache(_filled_fake_cache, tmp_path_factory) -> Path:
    return writable_cache(_filled_fake_cache, tmp_path_factory, "matrix-cache")


@pytest.fixture
def matrix_env(matrix_cache, monkeypatch) -> Path:
    monkeypatch.setenv("CPT_BENCH_CACHE", str(matrix_cache))
    return matrix_cache


@pytest.fixture(scope="module")
def reference_run(matrix_cache, tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted local run of the tiny config."""
    return run_under(matrix_cache, tiny_config(tiny_model_dir), tmp_path_factory.mktemp("reference"))


def comparable_cells(run_dir: Path) -> dict[str, dict]:
    return {cell_id: store.comparable(record) for cell_id, record in store.read_cells(run_dir).items()}


def test_run_writes_every_cell_summary_and_report(reference_run):
    cells = store.read_cells(reference_run)
    assert len(cells) == 16
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["format"] == "cpt_bench.matrix_summary/1" and len(summary["cells"]) == 16
    by_id = {cell["id"]: cell for cell in summary["cells"]}
    ppl = by_id["rtn-w4g32__soft-wikipedia@rtn-w4g32__cpt_ppl_wikipedia"]
    assert ppl["value"] > 1 and ppl["stderr"] > 0 and ppl["dense_value"] > 1
    assert ppl["dataset_relation"] == "in-domain" and ppl["compression_relation"] == "same"
    assert all(cell["stderr"] is not None for cell in summary["cells"])
    rtn = next(c for c in summary["compressions"] if c["spec"] == "rtn-w4g32")
    assert 0 < rtn["ratio_to_dense"] < 1
    record = cells["rtn-w4g32__none__cpt_piqa"]
    assert record["lm_eval"]["results"]["cpt_piqa"]["acc,none"] == record["metric"]["value"]
    assert record["memory"]["peak_memory_bytes"] > 0 and record["compression"]["kernel_mode"] == "simulated"
    environment = json.loads((reference_run / "environment.json").read_text())["sessions"][0]
    assert environment["seeds"]["random_seed"] == 0 and "torch" in environment["versions"]
    assert environment["git"] and environment["hardware"]["cpu_count"]
    report = reference_run / "report"
    assert {"report.md", "report.tex", "report.html"} <= {p.name for p in report.iterdir()}
    assert any(p.suffix == ".png" for p in report.iterdir())


def test_trivial_prefix_control_is_the_eos_token_compared_with_every_prompt(reference_run, tiny_model_dir):
    """The control's folder holds the EOS token's embedding as a one-token prompt at the prompts' position; every
    prompted cell is compared with it at its level, and the compressed level's gap closed is taken over it too."""
    from transformers import AutoModelForCausalLM

    from cpt_bench.assets.model import load_tokenizer
    from cpt_bench.recovery.artifact import read_prompt
    from cpt_bench.recovery.position import resolve_position

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = read_prompt(reference_run / "prompts" / "trivial")
    eos = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight[tokenizer.eos_token_id]
    assert prompt.embeddings.shape == (1, eos.shape[0]) and torch.equal(prompt.embeddings[0], eos.detach().float())
    assert prompt.meta["kind"] == "trivial" and prompt.meta["hyperparameters"]["n_virtual_tokens"] == 1
    assert prompt.meta["prompt_position"] == resolve_position(None, tokenizer)
    cells = {cell["id"]: cell for cell in json.loads((reference_run / "summary.json").read_text())["cells"]}
    soft = cells["rtn-w4g32__soft-wikipedia@rtn-w4g32__cpt_ppl_wikipedia"]
    assert soft["vs_trivial"]["against"] == "rtn-w4g32__trivial__cpt_ppl_wikipedia"
    assert soft["gap_closed_vs_trivial"]["method"] == "paired bootstrap"
    assert cells["dense__hard-paper__cpt_piqa"]["vs_trivial"]["against"] == "dense__trivial__cpt_piqa"
    trivial = cells["rtn-w4g32__trivial__cpt_ppl_wikipedia"]
    assert "vs_trivial" not in trivial and "gap_closed_vs_trivial" not in trivial and "gap_closed" in trivial
    report = (reference_run / "report" / "report.md").read_text()
    assert "| trivial " in report and "gap closed vs trivial" in report


def test_trivial_prefix_warning_names_the_figures_when_the_control_moves_the_dense_model():
    def summary(trivial_value: float) -> dict:
        cell = {"metric": "token_perplexity", "stderr": 1.2, "compression": "dense", "task": "cpt_ppl_wikipedia"}
        return {"targets": [{"task": "cpt_ppl_wikipedia", "domain": "wikipedia"}, {"task": "cpt_piqa", "domain": None}],
                "cells": [{**cell, "prompt": "none", "value": 36.0},
                          {**cell, "prompt": "trivial", "value": trivial_value}]}

    (warning,) = store.trivial_prefix_warnings(summary(20.7))
    assert warning.startswith("on cpt_ppl_wikipedia the trivial prefix alone moves the dense model's token_perplexity "
                              "from 36.00 to 20.70 (-42.5%), more than its standard error 1.20")
    assert store.trivial_prefix_warnings(summary(35.0)) == []  # within one standard error
    assert store.trivial_prefix_warnings({"targets": summary(20.7)["targets"], "cells": []}) == []  # no control


def test_second_identical_run_gives_identical_cells(reference_run, matrix_env, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cpt_bench.assets import model as assets_model

    reads = []
    read = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: reads.append(a) or read(*a, **k))
    assets_model._tokenizer_of.cache_clear()
    run_dir = run_matrix(write_config(tmp_path, tiny_config(tiny_model_dir)), tmp_path / "again")
    assert comparable_cells(run_dir) == comparable_cells(reference_run)
    # every artifact, group and target shares one tokenizer (Gemma 3's takes seconds to read): read once
    assert len(reads) == 1, reads


def test_two_shards_merged_equal_one_full_run(reference_run, matrix_env, tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_config(tiny_model_dir))
    shards = [run_matrix(config, tmp_path / f"shard{i}", shard=f"{i}/2") for i in range(2)]
    assert all(0 < len(store.read_cells(shard)) < 16 for shard in shards)
    assert merge_runs(tmp_path / "merged", shards) is not None
    assert comparable_cells(tmp_path / "merged") == comparable_cells(reference_run)


def test_ray_executor_equals_local(reference_run, matrix_env, tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CPT_BENCH_CACHE": str(matrix_env), "OMP_NUM_THREADS": "1"}})
    try:
        run_dir = run_matrix(write_config(tmp_path, tiny_config(tiny_model_dir)), tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    assert comparable_cells(run_dir) == comparable_cells(reference_run)


def test_resume_refuses_a_run_folder_of_another_config(reference_run, matrix_env, tiny_model_dir, tmp_path, capsys):
    other = write_config(tmp_path, tiny_config(tiny_model_dir, batch_size=2))
    before = {p.name: p.read_bytes() for p in (reference_run / "cells").iterdir()}
    assert main(["matrix", str(other), "--out", str(reference_run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cpt-bench: error: --resume: run folder {reference_run} was made from another config (differs "
                   f"at batch_size); resume it with its own config ({reference_run / 'config.yaml'}) or choose "
                   "another --out")
    assert main(["matrix", str(other), "--out", str(reference_run)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (reference_run / "cells").iterdir()} == before


def test_run_outside_git_prints_no_git_errors_and_each_warning_once(matrix_env, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capfd, caplog):
    """Outside a git checkout lm-eval's git lookup fails on every cell: nothing of git's reaches the output, and
    each third-party warning (lm-eval's repeat per cell) is shown once."""
    from cpt_bench.lmeval import quiet

    monkeypatch.setattr(quiet, "_seen_warnings", set())  # as in a new process: earlier tests saw the warnings
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-git"))  # git fails here, as outside any checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    config = tiny_config(tiny_model_dir, name="outside-git", compression={"specs": ["dense"]},
                         prompts={"hard": ["paper"]}, targets=[{"task": "cpt_piqa", "limit": 2}])  # 2 groups, 1 task
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        run_matrix(write_config(tmp_path, config), tmp_path / "run")
    out, err = capfd.readouterr()
    assert "fatal:" not in out + err
    shown = [(r.name, r.getMessage()) for r in caplog.records if not r.name.startswith("cpt_bench")]
    assert shown, "no third-party warning at all: the check below could not fail"
    assert len(shown) == len(set(shown)), f"repeated warnings: {sorted(shown)}"


def _start(config: Path, out: Path, env: dict, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cpt_bench.cli", "matrix", str(config), "--out", str(out)]
    return subprocess.Popen(argv + (["--resume"] if resume else []), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_runner_killed_at_random_points_resumes_to_the_uninterrupted_result(reference_run, matrix_env,
                                                                            tiny_model_dir, tmp_path):
    """Fault injection: SIGKILL the runner three times at random moments after it starts writing (while
    prompts train, cells evaluate or files are written), resume each time, and compare with the reference."""
    config = write_config(tmp_path, tiny_config(tiny_model_dir))
    out = tmp_path / "killed"
    env = {**os.environ, "CPT_BENCH_CACHE": str(matrix_env), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for attempt in range(3):
        process = _start(config, out, env, resume=attempt > 0)
        cells_before = len(list((out / "cells").glob("*.json"))) if (out / "cells").is_dir() else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:  # wait until this session does work
            started = (out / "plan.txt").is_file() and (out / "run.lock").is_file()
            if started and (attempt == 0 or len(list((out / "cells").glob("*.json"))) > cells_before):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    final = _start(config, out, env, resume=True)
    assert final.wait(timeout=300) == 0
    assert not list(out.rglob(".*.tmp"))  # temp files of killed writes were cleared, never read as results
    assert comparable_cells(out) == comparable_cells(reference_run)
    assert json.loads((out / "summary.json").read_text())["sessions"] == 4


# --- soft prompts that never beat their initialisation -----------------------------------------------------------

UNTRAINED_CHOICE = PromptChoice("soft", source="wikipedia", trained_at="dense")
UNTRAINED_PROMPT = UNTRAINED_CHOICE.id  # soft-wikipedia@dense


def untrained_config(model: Path, **soft) -> dict:
    """dense x (none, a soft prompt whose lr is far below float32 resolution) x one target: 2 cells."""
    training = {**TRAINING, "lr": 1e-30, "steps": 1, "eval_every": 1}
    return tiny_config(model, name="untrained", compression={"specs": ["dense"]},
                       prompts={"soft": {"sources": ["wikipedia"], "trained_at": ["dense"], "training": training,
                                         **soft}},
                       targets=[{"task": "cpt_ppl_wikipedia", "limit": 2}])


@pytest.fixture(scope="module")
def untrained_run(matrix_cache, tiny_model_dir, tmp_path_factory) -> Path:
    return run_under(matrix_cache, untrained_config(tiny_model_dir), tmp_path_factory.mktemp("untrained"))


def test_untrained_prompt_is_flagged_in_its_cells_summary_and_report(untrained_run):
    cells = store.read_cells(untrained_run)
    soft = cells[f"dense__{UNTRAINED_PROMPT}__cpt_ppl_wikipedia"]["prompt"]
    assert soft["untrained"] is True and soft["best_step"] == 0
    assert "untrained" not in cells["dense__none__cpt_ppl_wikipedia"]["prompt"]
    summary = json.loads((untrained_run / "summary.json").read_text())
    assert next(p for p in summary["prompts"] if p["id"] == UNTRAINED_PROMPT)["untrained"] is True
    report = (untrained_run / "report" / "report.md").read_text()
    assert "soft:wikipedia@dense (untrained)" in report and "never beat its initialisation" in report


def test_untrained_prompt_check_warns_or_fails_in_one_line(untrained_run, caplog):
    folder = untrained_run / "prompts" / UNTRAINED_PROMPT
    with caplog.at_level("WARNING", logger="cpt_bench.matrix.run"):
        assert check_prompt_trained(folder, UNTRAINED_CHOICE, required=False) is False
    assert f"soft prompt {UNTRAINED_PROMPT} (source wikipedia, trained at dense) never beat" in caplog.text
    with pytest.raises(SoftPromptError, match=r"validation ppl \d+\.\d\d at step 0 stayed the best; "
                                              r"prompts\.soft\.require_improvement is set") as caught:
        check_prompt_trained(folder, UNTRAINED_CHOICE, required=True)
    assert "\n" not in str(caught.value)


def test_require_improvement_stops_the_run_at_an_untrained_prompt(matrix_env, tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, untrained_config(tiny_model_dir, require_improvement=True))
    assert main(["matrix", str(config), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith(f"cpt-bench: error: soft prompt {UNTRAINED_PROMPT} (source wikipedia, trained at dense) "
                            "never beat its initialisation: validation ppl ")
    assert not list((tmp_path / "run" / "cells").glob("*.json"))


def test_a_run_folder_from_before_a_new_setting_still_resumes(untrained_run, matrix_env, tiny_model_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(untrained_run, old)
    stored = json.loads((old / "config.json").read_text())
    for key in ("require_improvement", "seeds", "controls"):  # as written before the settings existed
        del stored["prompts"]["soft"][key]
    del stored["prompts"]["trivial_prefix"]
    (old / "config.json").write_text(json.dumps(stored))
    shutil.rmtree(old / "prompts" / "trivial")  # and before the trivial-prefix control
    for path in (old / "cells").glob("*__trivial__*.json"):
        path.unlink()
    assert store.read_run_config(old).prompts.trivial_prefix is False  # as it ran
    soft_cell = f"dense__{UNTRAINED_PROMPT}__cpt_ppl_wikipedia"
    record = store.read_cells(old)[soft_cell]
    del record["examples"], record["cell"]["prompt_choice"]["seed"], record["cell"]["prompt_choice"]["control"]
    store.write_cell(old, record)  # a cell as written before per-example values were kept
    (old / "summary.json").unlink()
    config = write_config(tmp_path, untrained_config(tiny_model_dir))
    assert run_matrix(config, old, resume=True) == old and (old / "summary.json").is_file()
    cells = {cell["id"]: cell for cell in json.loads((old / "summary.json").read_text())["cells"]}
    assert "vs_none" not in cells[soft_cell] and "vs_dense" not in cells[soft_cell]  # nothing to pair it with
    # resumed, a run from before the trivial-prefix control gains its cells, and its config.json records it
    assert "dense__trivial__cpt_ppl_wikipedia" in cells and store.read_run_config(old).prompts.trivial_prefix
