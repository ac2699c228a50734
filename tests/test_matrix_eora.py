"""EoRA adapters in the transfer matrix (``prompts.eora``): planned per compressed level and rank at their own level
only, fitted as ``cpt-bench eora`` fits them, resumed without refitting, refused in one line when misconfigured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cpt_bench.cli import main
from cpt_bench.matrix import store
from cpt_bench.matrix.config import ConfigError, config_from_dict
from cpt_bench.matrix.plan import describe, estimate_seconds, make_plan, shard_plan
from cpt_bench.matrix.run import run_matrix
from cpt_bench.recovery.lora import PEFT_WEIGHTS
from cpt_bench.report.tables import format_bytes
from tests.compress_helpers import _one_thread  # noqa: F401  (autouse)
from tests.test_matrix import TRAINING, run_under, tiny_config, writable_cache, write_config

CALIBRATION = {"corpus": "wikipedia", "n_windows": 3, "seqlen": 24, "seed": 0}
LEVEL = "rtn-w3g32"
RANK = 2
EORA_ID = f"eora-r{RANK}@{LEVEL}"
TARGETS = [{"task": "cpt_ppl_wikipedia", "limit": 2}, {"task": "cpt_piqa", "limit": 4}]


ON_EORA_ID = f"eora-r{RANK}+soft-wikipedia@{LEVEL}"
SOFT = {"sources": ["wikipedia"], "trained_at": [LEVEL], "training": TRAINING}
NO_LEVEL_TRANSFER = {"compression_levels": False, "compression_types": False}


def eora_config(model: str | Path = "embedded", **overrides) -> dict:
    """dense and one compressed level x (none, EoRA r2, the trivial-prefix control) x 2 targets: 10 cells."""
    return tiny_config(model, name="eora", compression={"specs": ["dense", LEVEL], "calibration": CALIBRATION},
                       prompts={"eora": {"ranks": [RANK]}}, targets=TARGETS) | overrides


def eora_soft_config(model: str | Path = "embedded") -> dict:
    """``eora_config`` plus a soft prompt and a soft prompt trained on EoRA r2, both at the compressed level only:
    dense x (none, trivial) + the level x (none, soft, EoRA, EoRA + soft, trivial), on perplexity: 7 cells (kept
    small: the planning tests above cover several targets)."""
    return eora_config(model, prompts={"soft": SOFT, "eora": {"ranks": [RANK], "soft": [RANK]}},
                       transfer=NO_LEVEL_TRANSFER, targets=TARGETS[:1])


# --- planning (no model) -----------------------------------------------------------------------------------------

def test_eora_adapters_are_planned_per_level_and_rank_at_their_own_level_only():
    config = config_from_dict(eora_config(compression={"specs": ["dense", "rtn-w4g32", LEVEL]},
                                          prompts={"hard": ["paper"], "eora": {"ranks": [2, 4]}}))
    plan = make_plan(config)
    eora = [p for p in plan.soft_prompts if p.kind == "eora"]
    assert [p.id for p in eora] == ["eora-r2@rtn-w4g32", "eora-r4@rtn-w4g32", "eora-r2@rtn-w3g32",
                                    "eora-r4@rtn-w3g32"]
    cells = {(c.compression, c.prompt.id, c.target.task): c for c in plan.cells}
    for prompt in eora:  # every target at its own level, no other level (not dense, not the other quantization)
        assert {(c, t) for c, p, t in cells if p == prompt.id} == {(prompt.trained_at, t["task"]) for t in TARGETS}
    cell = cells[LEVEL, "eora-r4@rtn-w3g32", "cpt_piqa"]
    assert (cell.dataset_relation, cell.compression_relation) == (None, "same")
    assert cell.id == "rtn-w3g32__eora-r4@rtn-w3g32__cpt_piqa"
    assert ("dense", "trivial", "cpt_piqa") in cells  # EoRA alone puts the trivial-prefix control beside it
    text = describe(plan)
    assert "4 EoRA adapters (eora-r2@rtn-w4g32" in text and "does not transfer across levels" in text
    assert "rtn-w3g32: 10 cells; prompts none, hard-paper, eora-r2@rtn-w3g32, eora-r4@rtn-w3g32, trivial" in text
    fewer = make_plan(config_from_dict(eora_config(compression={"specs": ["dense", "rtn-w4g32", LEVEL]},
                                                   prompts={"eora": {"ranks": [2], "levels": [LEVEL]}})))
    assert [p.id for p in fewer.soft_prompts if p.kind == "eora"] == ["eora-r2@rtn-w3g32"]
    assert estimate_seconds(plan)["eora"] == pytest.approx(4 * estimate_seconds(fewer)["eora"])


def test_a_soft_prompt_on_eora_has_its_own_id_and_is_scored_with_its_adapter_at_its_level():
    config = config_from_dict(eora_config(compression={"specs": ["dense", "rtn-w4g32", LEVEL]},
                                          prompts={"soft": {**SOFT, "seeds": [0, 1]},
                                                   "eora": {"ranks": [2, 4], "soft": [4]}}))
    plan = make_plan(config)
    on_eora = [p for p in plan.soft_prompts if p.eora_base is not None]
    assert [p.id for p in on_eora] == ["eora-r4+soft-wikipedia@rtn-w3g32#s0", "eora-r4+soft-wikipedia@rtn-w3g32#s1"]
    assert on_eora[0].eora_base.id == "eora-r4@rtn-w3g32" and on_eora[0].is_learned
    ids = [p.id for p in plan.soft_prompts]  # the adapter is built before the prompts trained on it
    assert ids.index("eora-r4@rtn-w3g32") < ids.index("eora-r4+soft-wikipedia@rtn-w3g32#s0")
    levels = {c.compression for c in plan.cells if c.prompt in on_eora}
    assert levels == {LEVEL}  # never transferred, though the plain soft prompts are (transfers default to on)
    assert {c.compression for c in plan.cells if c.prompt.id == "soft-wikipedia@rtn-w3g32#s0"} == {
        "dense", "rtn-w4g32", LEVEL}
    assert "rtn-w3g32__eora-r4+soft-wikipedia@rtn-w3g32-s1__cpt_piqa" in {c.id for c in plan.cells}
    shard = next(s for s in (shard_plan(plan, i, 9) for i in range(9)) if any(c.prompt in on_eora for c in s.cells))
    assert any(p.id == "eora-r4@rtn-w3g32" for p in shard.soft_prompts)  # a shard gets the adapter it needs


BAD = [
    ("no_ranks", {"ranks": []}, r"^prompts\.eora\.ranks: got \[\], expected a non-empty list of positive integers"),
    ("zero_rank", {"ranks": [8, 0]}, r"^prompts\.eora\.ranks: got \[8, 0\], expected a non-empty list of positive"),
    ("rank_text", {"ranks": ["16"]}, r"^prompts\.eora\.ranks\[0\]: got str '16', expected int$"),
    ("rank_twice", {"ranks": [8, 8]}, r"^prompts\.eora\.ranks\[1\]: 8 repeats ranks\[0\]; expected each once$"),
    ("dense_level", {"ranks": [8], "levels": ["dense"]},
     r"^prompts\.eora\.levels\[0\]: got 'dense', expected a compressed level \(dense has no compression error"),
    ("level_not_run", {"ranks": [8], "levels": ["rtn-w4g32"]},
     r"^prompts\.eora\.levels\[0\]: got 'rtn-w4g32', expected a compressed level of compression\.specs "
     r"\(rtn-w3g32\)$"),
    ("bad_level", {"ranks": [8], "levels": ["gptq-w5"]}, r"^prompts\.eora\.levels\[0\]: invalid compression spec"),
    ("unknown_key", {"rank": 8}, r"^prompts\.eora\.rank: unknown key; expected one of levels, ranks, soft$"),
    ("soft_rank_not_fitted", {"ranks": [8], "soft": [16]}, r"^prompts\.eora\.soft\[0\]: got 16, expected one of "
     r"ranks \(8\)$"),
    ("soft_without_soft_prompts", {"ranks": [8], "soft": [8]}, r"^prompts\.eora\.soft: got \[8\], but no level both "
     r"trains soft prompts \(prompts\.soft\.trained_at: \[\]\) and has EoRA \(rtn-w3g32\); expected one that does$"),
]


@pytest.mark.parametrize("eora, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_eora_settings_are_refused_in_one_line(eora, message):
    with pytest.raises(ConfigError, match=message) as caught:
        config_from_dict(eora_config(prompts={"eora": eora}))
    assert "\n" not in str(caught.value)


def test_eora_needs_a_compressed_level_and_simulated_kernels():
    with pytest.raises(ConfigError, match=r"^prompts\.eora: given, but compression\.specs has no compressed level"):
        config_from_dict(eora_config(compression={"specs": ["dense"]}))
    with pytest.raises(ConfigError, match=r"^kernels: got 'real', expected simulated with prompts\.eora"):
        config_from_dict(eora_config(kernels="real"))


# --- a run on the tiny model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eora_cache(_filled_fake_cache, tmp_path_factory) -> Path:
    return writable_cache(_filled_fake_cache, tmp_path_factory, "eora-matrix-cache")


@pytest.fixture(scope="module")
def eora_run(eora_cache, tiny_model_dir, tmp_path_factory) -> Path:
    return run_under(eora_cache, eora_soft_config(tiny_model_dir), tmp_path_factory.mktemp("eora-run"))


def test_eora_cells_record_rank_bytes_fitting_and_the_memory_account(eora_run):
    cells = store.read_cells(eora_run)
    assert len(cells) == 7
    record = cells[f"{LEVEL}__{EORA_ID}__cpt_ppl_wikipedia"]
    prompt, adapter = record["prompt"], record["prompt"]["adapter_memory"]
    assert prompt["kind"] == "eora" and prompt["rank"] == RANK and prompt["path"] == f"prompts/{EORA_ID}"
    assert prompt["trainable_parameters"] == 0 and prompt["stored_parameters"] == adapter["adapter_parameters"] > 0
    assert prompt["stored_bytes"] == adapter["adapter_bytes"] == 2 * adapter["adapter_parameters"]  # fp16
    assert prompt["fit_seconds"] > 0 and prompt["fit_peak_memory_bytes"] > 0
    assert adapter["compressed_bits_per_weight_with_adapter"] == pytest.approx(
        adapter["compressed_bits_per_weight"] + 8 * adapter["adapter_bytes"] / adapter["compressed_layer_weights"])
    assert adapter["checkpoint_stored_bytes"] == record["compression"]["memory"]["stored_bytes"]
    summary = json.loads((eora_run / "summary.json").read_text())
    entry = next(p for p in summary["prompts"] if p["id"] == EORA_ID)
    assert (entry["kind"], entry["rank"], entry["trained_at"]) == ("eora", RANK, LEVEL)
    assert entry["bits_per_weight_with_adapter"] == adapter["compressed_bits_per_weight_with_adapter"]
    flat = {c["id"]: c for c in summary["cells"]}
    eora_cell = flat[f"{LEVEL}__{EORA_ID}__cpt_ppl_wikipedia"]
    none_cell = flat[f"{LEVEL}__none__cpt_ppl_wikipedia"]
    assert eora_cell["vs_none"]["against"] == none_cell["id"] and "gap_closed" in eora_cell
    assert eora_cell["value"] != none_cell["value"]  # the adapter is applied
    assert method_row(eora_run, f"eora:r{RANK}@{LEVEL}")[1:6] == [  # its budget: fitted, nothing trained
        "0", f"{entry['stored_parameters']:,}", format_bytes(entry["stored_bytes"]), f"{entry['fit_seconds']:.0f}",
        f"{entry['fit_peak_memory_bytes'] / 2**20:.0f}"]


def method_row(run: Path, label: str) -> list[str]:
    """The cells of ``label``'s row in the report's "Recovery methods per compression level" tables."""
    methods = (run / "report" / "report.md").read_text().split("## Recovery methods per compression level")[1]
    row = next(line for line in methods.splitlines() if line.startswith(f"| {label} "))
    return [cell.strip() for cell in row.split("|")[1:-1]]


def test_the_matrix_adapter_is_the_one_cpt_bench_eora_fits_on_its_checkpoint(eora_run, eora_cache, tmp_path,
                                                                              monkeypatch, capsys):
    """Same code path (``fit_checkpoint_eora``), checkpoint and calibration windows, one torch thread: bit-identical
    fp16 tensors."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(eora_cache))
    checkpoint = store.read_cells(eora_run)[f"{LEVEL}__{EORA_ID}__cpt_ppl_wikipedia"]["compression"]["checkpoint"]
    out = tmp_path / "eora"
    flags = ["--corpus", CALIBRATION["corpus"], "--n-windows", str(CALIBRATION["n_windows"]), "--seqlen",
             str(CALIBRATION["seqlen"]), "--seed", str(CALIBRATION["seed"])]
    assert main(["eora", checkpoint, "--rank", str(RANK), "--out", str(out), *flags]) == 0
    assert f"EoRA r{RANK}" in capsys.readouterr().out
    mine, theirs = load_file(eora_run / "prompts" / EORA_ID / PEFT_WEIGHTS), load_file(out / PEFT_WEIGHTS)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert all(mine[key].equal(theirs[key]) for key in mine)
    cli_record = json.loads((out / "lora.json").read_text())["eora"]
    assert cli_record["calibration"] == json.loads((eora_run / "prompts" / EORA_ID / "lora.json").read_text())[
        "eora"]["calibration"] and cli_record["fitting"]["wall_seconds"] > 0


def test_resume_does_not_refit_an_eora_adapter(eora_run, eora_cache, tiny_model_dir, tmp_path, monkeypatch):
    """A resumed run whose adapter is complete evaluates its missing cells with it and never fits again."""
    import cpt_bench.recovery.eora as eora_module
    import cpt_bench.recovery.soft as soft_module

    monkeypatch.setenv("CPT_BENCH_CACHE", str(eora_cache))
    resumed = tmp_path / "resumed"
    shutil.copytree(eora_run, resumed)
    for path in [*(resumed / "cells").glob(f"*{EORA_ID}*.json"), *(resumed / "cells").glob(f"*{ON_EORA_ID}*.json")]:
        path.unlink()
    (resumed / "summary.json").unlink()
    adapter = resumed / "prompts" / EORA_ID / PEFT_WEIGHTS
    before = adapter.read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("the EoRA adapter was fitted again")

    monkeypatch.setattr(eora_module, "fit_checkpoint_eora", refuse)
    monkeypatch.setattr(soft_module, "train_soft_prompt", refuse)
    assert run_matrix(write_config(tmp_path, eora_soft_config(tiny_model_dir)), resumed, resume=True) == resumed
    assert adapter.read_bytes() == before
    again, before_cells = store.read_cells(resumed), store.read_cells(eora_run)
    for cell_id in (f"{LEVEL}__{EORA_ID}__cpt_ppl_wikipedia", f"{LEVEL}__{ON_EORA_ID}__cpt_ppl_wikipedia"):
        assert store.comparable(again[cell_id]) == store.comparable(before_cells[cell_id])


def test_a_soft_prompt_on_eora_is_trained_and_scored_on_the_corrected_model(eora_run):
    from cpt_bench.recovery.artifact import read_prompt

    cells = store.read_cells(eora_run)
    record = cells[f"{LEVEL}__{ON_EORA_ID}__cpt_ppl_wikipedia"]
    prompt = record["prompt"]
    assert prompt["kind"] == "soft" and prompt["on_eora"] == RANK and prompt["n_tokens"] == TRAINING["n_virtual_tokens"]
    assert prompt["corrected_by"]["kind"] == "eora" and prompt["corrected_by"]["rank"] == RANK
    assert prompt["corrected_by"]["path"] == f"prompts/{EORA_ID}" == prompt["path"].replace(ON_EORA_ID, EORA_ID)
    assert prompt["trained_on"] == f"{LEVEL} + EoRA r{RANK}"
    assert record["memory"]["adapter_bytes"] == cells[f"{LEVEL}__{EORA_ID}__cpt_ppl_wikipedia"]["memory"][
        "adapter_bytes"] > 0  # the adapter's tensors, resident under the prompt
    on_eora = read_prompt(eora_run / "prompts" / ON_EORA_ID)
    plain = read_prompt(eora_run / "prompts" / f"soft-wikipedia@{LEVEL}")
    assert on_eora.meta["compression"] == f"{LEVEL} + EoRA r{RANK}" and plain.meta["compression"] == LEVEL
    assert not on_eora.embeddings.equal(plain.embeddings)  # same start and data, another model under it
    values = {prompt_id: cells[f"{LEVEL}__{prompt_id}__cpt_ppl_wikipedia"]["metric"]["value"]
              for prompt_id in (ON_EORA_ID, EORA_ID, f"soft-wikipedia@{LEVEL}")}
    assert len(set(values.values())) == 3
    summary = json.loads((eora_run / "summary.json").read_text())
    entry = next(p for p in summary["prompts"] if p["id"] == ON_EORA_ID)
    assert entry["on_eora"] == RANK and entry["source"] == "wikipedia" and entry["trained_at"] == LEVEL
    assert entry["bits_per_weight_with_adapter"] == prompt["adapter_memory"]["compressed_bits_per_weight_with_adapter"]
    assert entry["stored_bytes"] == prompt["adapter_memory"]["adapter_bytes"] + 4 * entry["trainable_parameters"]
    assert entry["stored_parameters"] == prompt["adapter_memory"]["adapter_parameters"] + entry["trainable_parameters"]
    assert method_row(eora_run, f"eora-r{RANK}+soft:wikipedia@{LEVEL}")[1:4] == [  # the prompt trained, both stored
        f"{entry['trainable_parameters']:,}", f"{entry['stored_parameters']:,}", format_bytes(entry["stored_bytes"])]


@pytest.mark.parametrize("args, named", [({"eora": "e", "lora": "l"}, "eora and lora"),
                                         ({"lora": "l", "soft_prompt": "p"}, "lora and soft_prompt"),
                                         ({"eora": "e", "soft_prompt": "p", "hard_prompt": "paper"},
                                          "eora and soft_prompt and hard_prompt"),
                                         ({"eora": "e", "idp": "paper;paper_long"}, "eora and idp")])
def test_the_cpt_model_combines_eora_with_one_prompt_only(tiny_model_dir, args, named):
    """EoRA + a prompt (hard or soft, not an IDP set) is the one pair the adapter applies (the matrix's EoRA + soft
    cells above); any other pair is refused in one line before anything loads."""
    from cpt_bench.lmeval.adapter import CptLM, PromptAdapterError

    with pytest.raises(PromptAdapterError,
                       match=f"^give one of hard_prompt, soft_prompt, lora, eora and idp, not {named}$"):
        CptLM(pretrained=str(tiny_model_dir), **args)
