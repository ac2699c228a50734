"""Control prompts, training seeds and paired statistics in the matrix: planning, one tiny-model run with controls
and two seeds, the summary's comparisons and report tables, ``cpt-bench compare``, and soft-prompt training that
never reads a test split."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench import corpus, stats
from cpt_bench.cli import main
from cpt_bench.matrix import paired, store
from cpt_bench.matrix.config import ConfigError, config_from_dict
from cpt_bench.matrix.plan import describe, make_plan, prompt_training
from cpt_bench.matrix.run import artifact_meta, build_prompt
from cpt_bench.recovery.artifact import read_prompt
from cpt_bench.recovery.soft import initial_prompt
from cpt_bench.report.recovery import format_comparison, format_gap
from cpt_bench.report.tables import format_entry
from tests.compress_helpers import _one_thread  # noqa: F401  (autouse)
from tests.test_matrix import TRAINING, run_under, tiny_config, writable_cache

# --- planning (no model) -----------------------------------------------------------------------------------------


def recovery_plan_config(**soft) -> dict:
    return {"name": "plan", "compression": {"specs": ["dense", "rtn-w4g32", "rtn-w3g32"]},
            "prompts": {"soft": {"sources": ["wikipedia", "shakespeare"], "trained_at": ["rtn-w4g32"], **soft}},
            "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 10}]}


def prompt_ids(plan, compression: str | None = None, task: str | None = None) -> list[str]:
    return list(dict.fromkeys(c.prompt.id for c in plan.cells if compression in (None, c.compression)
                              and task in (None, c.target.task)))


def test_seeds_and_controls_expand_to_their_cells():
    plan = make_plan(config_from_dict(recovery_plan_config(seeds=[0, 1], controls=["init", "random"])))
    learned = [f"soft-{source}@rtn-w4g32#s{seed}" for source in ("wikipedia", "shakespeare") for seed in (0, 1)]
    controls = ["init@rtn-w4g32", "random@rtn-w4g32#s0", "random@rtn-w4g32#s1"]  # vocab init: one for all seeds
    assert [p.id for p in plan.soft_prompts] == learned + controls + ["trivial"]
    assert prompt_ids(plan, "rtn-w4g32") == ["none", *learned, *controls, "trivial"]
    for level in ("dense", "rtn-w3g32"):  # controls only at their own level (trivial: at every level)
        assert prompt_ids(plan, level) == ["none", *learned, "trivial"]
    control_cells = [c for c in plan.cells if c.prompt.control and c.prompt.trained_at]
    assert len(control_cells) == 3 * 2 and {c.compression_relation for c in control_cells} == {"same"}
    assert [prompt_training(plan.config, p).seed for p in plan.soft_prompts] == [0, 1, 0, 1, 0, 0, 1, 0]
    cell = next(c for c in plan.cells if c.prompt.id == "soft-wikipedia@rtn-w4g32#s1" and c.target.task == "cpt_piqa"
                and c.compression == "rtn-w4g32")
    assert cell.id == "rtn-w4g32__soft-wikipedia@rtn-w4g32-s1__cpt_piqa"
    text = describe(plan)
    assert "4 soft prompts" in text and "4 control prompts (init@rtn-w4g32, random@" in text


def test_seeded_initialisation_gets_an_init_control_per_seed_and_one_seed_keeps_the_old_ids():
    training = {"init": "sample"}
    plan = make_plan(config_from_dict(recovery_plan_config(seeds=[3, 4], controls=["init"], training=training)))
    assert [p.id for p in plan.soft_prompts if p.control] == ["init@rtn-w4g32#s3", "init@rtn-w4g32#s4", "trivial"]
    single = make_plan(config_from_dict(recovery_plan_config(controls=["random"], training={"seed": 5})))
    assert [p.id for p in single.soft_prompts] == ["soft-wikipedia@rtn-w4g32", "soft-shakespeare@rtn-w4g32",
                                                   "random@rtn-w4g32", "trivial"]
    assert {prompt_training(single.config, p).seed for p in single.soft_prompts} == {5}


def test_controls_follow_the_targets_their_level_keeps():
    plan = make_plan(config_from_dict(recovery_plan_config(controls=["init"])
                                      | {"transfer": {"datasets": False}}))
    assert {c.target.task for c in plan.cells if c.prompt.control == "init"} == {"cpt_ppl_wikipedia"}


def _fake_records(plan, seed: int = 0) -> dict[str, dict]:
    """Stored-cell stand-ins with random per-example values: perplexity windows or 0 / 1 items."""
    rng = np.random.default_rng(seed)
    records = {}
    for cell in plan.cells:
        k = cell.target.limit
        block = {"doc_ids": list(range(k)), "doc_hashes": [f"{i:012x}" for i in range(k)]}
        if cell.target.is_perplexity:
            block.update(loglikelihood=(-rng.uniform(50, 80, k)).tolist(), n_tokens=[20] * k)
        else:
            block.update(scores=rng.integers(0, 2, k).astype(float).tolist())
        records[cell.id] = {"examples": block}
    return records


def test_comparisons_pair_each_cell_with_its_counterparts():
    config = config_from_dict(recovery_plan_config(seeds=[0, 1], controls=["init"],
                                                   trained_at=["rtn-w4g32", "rtn-w3g32"]))
    plan = make_plan(config)
    found = paired.cell_comparisons(plan, _fake_records(plan))

    def against(compression, prompt, task, key):
        block = found[f"{compression}__{prompt}__{task}"]
        return block[key]["against"] if key in block else None

    ppl, piqa = "cpt_ppl_wikipedia", "cpt_piqa"
    assert against("rtn-w4g32", "soft-shakespeare@rtn-w4g32-s0", ppl, "vs_in_domain") == \
        f"rtn-w4g32__soft-wikipedia@rtn-w4g32-s0__{ppl}"  # another corpus: the target's own
    assert against("rtn-w3g32", "soft-wikipedia@rtn-w4g32-s1", ppl, "vs_in_domain") == \
        f"rtn-w3g32__soft-wikipedia@rtn-w3g32-s1__{ppl}"  # another level: the prompt learned at this one
    assert against("rtn-w3g32", "soft-shakespeare@rtn-w4g32-s0", piqa, "vs_in_domain") == \
        f"rtn-w3g32__soft-shakespeare@rtn-w3g32-s0__{piqa}"  # zero-shot: the same corpus at this level
    assert against("rtn-w4g32", "soft-wikipedia@rtn-w4g32-s0", ppl, "vs_in_domain") is None  # in-domain itself
    assert against("rtn-w4g32", "soft-wikipedia@rtn-w4g32-s0", piqa, "vs_init") == f"rtn-w4g32__init@rtn-w4g32__{piqa}"
    assert against("rtn-w3g32", "soft-wikipedia@rtn-w4g32-s0", piqa, "vs_init") is None  # init only at its level
    assert against("dense", "soft-wikipedia@rtn-w4g32-s0", ppl, "vs_dense") == f"dense__none__{ppl}"
    assert "gap_closed" not in found[f"dense__soft-wikipedia@rtn-w4g32-s0__{ppl}"]  # dense has no gap
    assert "gap_closed" in found[f"rtn-w3g32__init@rtn-w3g32__{ppl}"]
    assert f"dense__none__{ppl}" not in found  # the reference of everything else
    for compression, prompt in (("dense", "soft-wikipedia@rtn-w4g32-s0"), ("rtn-w3g32", "init@rtn-w3g32")):
        assert against(compression, prompt, piqa, "vs_trivial") == f"{compression}__trivial__{piqa}"
    assert "gap_closed_vs_trivial" in found[f"rtn-w3g32__init@rtn-w3g32__{ppl}"]
    assert "gap_closed_vs_trivial" not in found[f"dense__soft-wikipedia@rtn-w4g32-s0__{ppl}"]  # dense has no gap
    trivial = found[f"rtn-w3g32__trivial__{ppl}"]
    assert "vs_trivial" not in trivial and "gap_closed_vs_trivial" not in trivial and "gap_closed" in trivial


@pytest.mark.parametrize(("soft", "message"), [
    ({"seeds": [0, 0]}, r"^prompts\.soft\.seeds\[1\]: 0 repeats seeds\[0\]; expected each once$"),
    ({"seeds": [1, 2], "training": {"seed": 3}},
     r"^prompts\.soft\.seeds: got \[1, 2\], expected either seeds or training\.seed, not both"),
    ({"controls": ["zero"]}, r"^prompts\.soft\.controls: got \['zero'\], expected control kinds out of "
                             r"init, random"),
    ({"sources": [], "trained_at": [], "controls": ["init"]},
     r"^prompts\.soft\.controls: got \['init'\], expected given only with soft prompts"),
])
def test_bad_seeds_and_controls_fail_with_their_key_path(soft, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(recovery_plan_config(**soft))


# --- one tiny-model run with controls and two seeds ----------------------------------------------------------------

def recovery_config(model: Path) -> dict:
    """dense, rtn-w4g32 x (none, 2 seeds of a wikipedia prompt at rtn-w4g32, its init and random controls, the
    trivial-prefix control) x a perplexity and a PIQA target: 4 + 4 + 6 + 4 = 18 cells."""
    return tiny_config(model, name="recovery",
                       prompts={"soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"], "training": TRAINING,
                                         "seeds": [0, 1], "controls": ["init", "random"]}},
                       transfer={"compression_levels": False, "compression_types": False},
                       targets=[{"task": "cpt_ppl_wikipedia", "limit": 3}, {"task": "cpt_piqa", "limit": 6}])


@pytest.fixture(scope="module")
def recovery_cache(_filled_fake_cache, tmp_path_factory) -> Path:
    return writable_cache(_filled_fake_cache, tmp_path_factory, "recovery-cache")


@pytest.fixture(scope="module")
def recovery_run(recovery_cache, tiny_model_dir, tmp_path_factory) -> Path:
    return run_under(recovery_cache, recovery_config(tiny_model_dir), tmp_path_factory.mktemp("recovery"))


def summary_cells(run: Path) -> dict[str, dict]:
    return {cell["id"]: cell for cell in json.loads((run / "summary.json").read_text())["cells"]}


SOFT = "rtn-w4g32__soft-wikipedia@rtn-w4g32-s1__cpt_ppl_wikipedia"
NONE = "rtn-w4g32__none__cpt_ppl_wikipedia"
INIT = "rtn-w4g32__init@rtn-w4g32__cpt_ppl_wikipedia"


def test_controls_are_prompt_artifacts_applied_like_soft_prompts(recovery_run, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    training = config_from_dict(recovery_config(tiny_model_dir)).prompts.soft.training
    init = read_prompt(recovery_run / "prompts" / "init@rtn-w4g32")
    assert init.meta["kind"] == "init" and init.meta["compression"] == "rtn-w4g32"
    # the untrained start (the compressed checkpoint stores the untouched embedding table in fp16)
    torch.testing.assert_close(init.embeddings, initial_prompt(model, tokenizer, training), rtol=1e-3, atol=1e-4)
    randoms = [read_prompt(recovery_run / "prompts" / f"random@rtn-w4g32-s{seed}") for seed in (0, 1)]
    row_norm = model.get_input_embeddings().weight.norm(dim=1).mean().item()
    for prompt, seed in zip(randoms, (0, 1), strict=True):
        assert prompt.meta["kind"] == "random" and prompt.meta["hyperparameters"]["seed"] == seed
        assert prompt.embeddings.shape == (TRAINING["n_virtual_tokens"], 32)
        assert prompt.embeddings.norm(dim=1) == pytest.approx(torch.full((3,), row_norm), rel=1e-3)
    assert not torch.equal(randoms[0].embeddings, randoms[1].embeddings)
    learned = [read_prompt(recovery_run / "prompts" / f"soft-wikipedia@rtn-w4g32-s{seed}") for seed in (0, 1)]
    assert [p.meta["hyperparameters"]["seed"] for p in learned] == [0, 1]
    assert not torch.equal(learned[0].embeddings, learned[1].embeddings)  # another data order
    cells = store.read_cells(recovery_run)
    block = cells[INIT]["prompt"]
    assert block["kind"] == "soft" and block["control"] == "init" and block["n_tokens"] == 3  # the cpt adapter's
    assert len(cells) == 18


def test_cells_keep_their_per_example_values(recovery_run):
    cells = store.read_cells(recovery_run)
    ppl = cells[SOFT]
    examples = ppl["examples"]
    assert examples["doc_ids"] == [0, 1, 2] and len(examples["doc_hashes"][0]) == paired.HASH_DIGITS
    value = math.exp(-sum(examples["loglikelihood"]) / sum(examples["n_tokens"]))
    assert value == pytest.approx(ppl["metric"]["value"])
    piqa = cells["rtn-w4g32__none__cpt_piqa"]
    assert len(piqa["examples"]["scores"]) == 6
    assert sum(piqa["examples"]["scores"]) / 6 == pytest.approx(piqa["metric"]["value"])
    hashes = {tuple(cells[i]["examples"]["doc_hashes"]) for i in (SOFT, NONE, INIT)}
    assert len(hashes) == 1  # every cell of a target scores the same windows


def test_summary_carries_every_comparison_a_table_makes(recovery_run):
    cells = summary_cells(recovery_run)
    soft = cells[SOFT]
    assert {"vs_none", "vs_dense", "vs_init", "gap_closed"} <= set(soft) and "vs_in_domain" not in soft
    assert soft["vs_none"]["against"] == NONE and soft["vs_init"]["against"] == INIT
    assert soft["vs_none"]["scale"] == "log_ppl" and soft["vs_none"]["n"] == 3
    records = store.read_cells(recovery_run)
    a, b = (paired.cell_examples(records[i]) for i in (NONE, SOFT))
    expected = stats.paired_log_ppl_change(a.values, a.counts, b.values, b.counts)
    assert soft["vs_none"]["estimate"] == pytest.approx(expected.estimate)
    assert soft["vs_none"]["ci"] == pytest.approx(list(expected.ci))
    value = {cell_id: cells[cell_id]["value"] for cell_id in (NONE, SOFT)}
    dense = cells["dense__none__cpt_ppl_wikipedia"]["value"]
    assert soft["gap_closed"]["estimate"] == pytest.approx((value[NONE] - value[SOFT]) / (value[NONE] - dense))
    assert soft["gap_closed"]["method"] == "paired bootstrap"
    assert "vs_init" not in cells[INIT] and "gap_closed" in cells[INIT]
    piqa = cells["rtn-w4g32__soft-wikipedia@rtn-w4g32-s0__cpt_piqa"]["vs_none"]
    assert piqa["scale"] == "difference" and "mcnemar_p" in piqa and len(piqa["discordant"]) == 2
    assert "vs_none" not in cells[NONE] and "vs_dense" in cells[NONE] and "vs_dense" not in cells[
        "dense__none__cpt_ppl_wikipedia"]
    prompts = {p["id"]: p for p in json.loads((recovery_run / "summary.json").read_text())["prompts"]}
    assert prompts["soft-wikipedia@rtn-w4g32#s1"]["seed"] == 1 and prompts["init@rtn-w4g32"]["control"] == "init"


def test_report_shows_paired_tables_seeds_and_the_significance_legend(recovery_run):
    report = (recovery_run / "report" / "report.md").read_text()
    assert "## Paired comparisons per compression level" in report and "## Training seeds" in report
    assert "* marks a difference whose paired 95% CI excludes zero" in report
    assert "### rtn-w4g32, cpt_ppl_wikipedia (token_perplexity): prompts compared pairwise, 95% CI" in report
    assert "| init@rtn-w4g32 " in report and "| random@rtn-w4g32#s1 " in report
    assert "soft:wikipedia@rtn-w4g32 over 2 training seeds" in report and "mean ± sd (2 seeds)" in report
    assert re.search(r"\| soft:wikipedia@rtn-w4g32#s0 \(in-domain\) +\| +\d+\.\d\d ± \d+\.\d\d \|", report)
    assert (recovery_run / "report" / "report.tex").read_text().count(r"\#s1") > 0


def test_entries_mark_differences_whose_ci_excludes_zero():
    target = {"task": "cpt_ppl_wikipedia", "metric": "token_perplexity", "higher_is_better": False}
    cell = {"value": 50.0, "stderr": 2.0, "delta": 30.0, "vs_dense": {"estimate": 0.9, "significant": True}}
    assert format_entry(cell, target, with_delta=True) == "50.00 ± 2.00 (Δ +30.00*)"
    cell["vs_dense"]["significant"] = False
    assert format_entry(cell, target, with_delta=True) == "50.00 ± 2.00 (Δ +30.00)"
    change = {"scale": "log_ppl", "estimate": math.log(0.5), "ci": [math.log(0.4), math.log(0.6)], "significant": True}
    assert format_comparison(change) == "-50.0% [-60.0%, -40.0%]*"
    accuracy = {"scale": "difference", "estimate": 0.02, "ci": [-0.01, 0.05], "significant": False}
    assert format_comparison(accuracy) == "+0.020 [-0.010, +0.050]"
    assert format_gap({"estimate": 0.344, "ci": [0.281, 0.402]}) == "34% [28%, 40%]"


def test_compare_prints_the_paired_and_unpaired_estimates(recovery_run, capsys):
    assert main(["compare", str(recovery_run), NONE, SOFT.replace("-s1", "#s1")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cpt_ppl_wikipedia (token_perplexity), 3 shared windows"
    stored = summary_cells(recovery_run)[SOFT]["vs_none"]
    paired_line = next(line for line in out if line.startswith("paired:"))
    assert f"change in log token_perplexity (B - A) = {stored['estimate']:+.4f}" in paired_line
    assert f"95% CI [{stored['ci'][0]:.4f}, {stored['ci'][1]:.4f}]" in paired_line and "perplexity ratio" in paired_line
    assert next(line for line in out if line.startswith("unpaired:"))
    piqa = ["rtn-w4g32__none__cpt_piqa", "rtn-w4g32__random@rtn-w4g32-s0__cpt_piqa"]
    assert main(["compare", str(recovery_run), *piqa]) == 0
    text = capsys.readouterr().out
    assert "6 shared items" in text and "difference in acc (B - A)" in text and "McNemar exact:" in text


def test_compare_refuses_unknown_runs_cells_and_mixed_tasks_in_one_line(recovery_run, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "nope"), NONE, SOFT], f"run folder {tmp_path / 'nope'} not found"),
        ([str(recovery_run), NONE, "rtn-w4g32__soft-milton@dense__cpt_piqa"],
         "cell 'rtn-w4g32__soft-milton@dense__cpt_piqa' is not a finished cell of run"),
        ([str(recovery_run), NONE, "rtn-w4g32__none__cpt_piqa"], "score different tasks"),
    ]
    for argv, message in cases:
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cpt-bench: error: ") and message in err and "\n" not in err


def test_compare_refuses_cells_written_before_examples_were_kept(recovery_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(recovery_run, old)
    record = store.read_cells(old)[SOFT]
    del record["examples"]
    store.write_cell(old, record)
    assert main(["compare", str(old), NONE, SOFT]) == 2
    assert "keeps no per-example values" in capsys.readouterr().err


# --- model selection on validation only ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["soft", "soft+kd", "lora"])
def test_training_reads_only_train_and_validation_splits(recovery_cache, tiny_model_dir, tmp_path, monkeypatch,
                                                         method):
    """Training (and choosing its best prompt or adapter) never reads a test split, which the perplexity targets
    score: for soft prompts, prompts imitating the dense model, and LoRA adapters."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(recovery_cache))
    soft = {"sources": ["wikipedia"], "trained_at": ["dense"], "training": TRAINING,
            "objectives": ["kd" if method == "soft+kd" else "lm"]}
    prompts = {"soft": soft} | ({"lora": {"rank": 1}} if method == "lora" else {})
    config = config_from_dict(tiny_config(tiny_model_dir, compression={"specs": ["dense"]}, prompts=prompts))
    read: list[str] = []
    original = corpus.load_split

    def recording(spec, split):
        read.append(split)
        return original(spec, split)

    monkeypatch.setattr("cpt_bench.tokens.load_split", recording)
    prompt = next(p for p in make_plan(config).soft_prompts if p.method == method)
    folder = Path(build_prompt(config, tmp_path, prompt, None))
    assert read and set(read) == {"train", "validation"}  # "test" is the perplexity targets' split
    meta = artifact_meta(folder, prompt.kind)
    selected = meta["best"]["selected_on"]  # val_loss (NLL) for lm, val_kl for kd: both on validation windows
    assert selected == ("val_kl" if method == "soft+kd" else "val_loss")
    assert meta["best"][selected] == min(r[selected] for r in meta["curve"])
