"""Measure the speed constants of ``cpt_bench.matrix.plan`` (the ``--dry-run`` time estimate) on this machine.

Each constant is measured through the code path the matrix runs, at the settings of ``configs/default.yaml``
(windows of 512 tokens, batch 8, calibration 16 x 512 tokens, prompt training batch 2 x 256 tokens), with the
embedded model on the CPU:

- ``EVAL_TOKENS_PER_SECOND``: two ``cpt_ppl_wikipedia`` cells (``matrix.run.evaluate_group``) of 2 and 8
  windows; the rate is the extra tokens over the extra seconds, so per-cell set-up cancels out;
- ``ITEM_SECONDS``: likewise two ``cpt_piqa`` cells of 10 and 40 items;
- ``CELL_OVERHEAD_SECONDS``: what the small cells took beyond their tokens / items at those rates (mean of the two);
- ``MODEL_LOAD_SECONDS``: a group's wall time less its cells' seconds (mean of a dense and an rtn-w4g64 group);
- ``CALIBRATION_TOKENS_PER_SECOND``: calibration tokens over the seconds of compressing to gptq-w4g64 (model load,
  Hessians, GPTQ, packing and writing: what the plan divides by this rate). Part of that time is fixed per layer,
  so fewer ``--calibration-windows`` finish sooner but understate the rate at the default 16;
- ``UNCALIBRATED_SECONDS``: seconds of compressing to rtn-w4g64;
- ``TRAIN_TOKENS_PER_SECOND``: soft-prompt training (``train_soft_prompt``) for 1 and for 4 steps; the extra
  training tokens over the extra training seconds (each run's one evaluation cancels out).

A warm-up cell of each task runs first (lm-eval's first use of a task reads its data). Prints the measured
values beside the constants in ``plan.py`` and their ratio, and the load average before and after (the figures
are only as good as the machine was quiet). About three minutes on 2 idle CPU cores, twenty with the cores
shared by five other jobs::

    CPT_BENCH_CACHE=... nice -n 10 .venv/bin/python benchmarks/plan_rates.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

PPL_TASK, ITEM_TASK = "cpt_ppl_wikipedia", "cpt_piqa"
PPL_LIMITS, ITEM_LIMITS = (2, 8), (10, 40)  # (small, large) cells
TRAIN_STEPS = (1, 4)
CALIBRATION = {"corpus": "wikipedia", "seqlen": 512, "seed": 0}  # n_windows: --calibration-windows
TRAINING = {"n_virtual_tokens": 20, "init": "vocab", "lr": 0.03, "batch_size": 2, "seqlen": 256, "eval_windows": 1,
            "seed": 0, "precision": "fp32"}


def matrix_config(model: str):
    """A config with the run settings of configs/default.yaml (its targets are replaced by the cells below)."""
    from cpt_bench.matrix.config import config_from_dict

    return config_from_dict({"name": "plan-rates", "model": model, "device": "cpu", "batch_size": 8,
                             "ppl_seqlen": 512, "compression": {"specs": ["dense", "rtn-w4g64"]},
                             "targets": [{"task": PPL_TASK, "limit": 2}, {"task": ITEM_TASK, "limit": 10}]})


def timed_group(config, run_dir: Path, compression: str, folder: str | None,
                limits: list[tuple[str, int]]) -> tuple[float, list[float]]:
    """Evaluate one (compression, no prompt) group of cells ``(task, limit)`` as the matrix does; returns the
    group's wall seconds and each cell's recorded seconds."""
    from cpt_bench.matrix import store
    from cpt_bench.matrix.config import Target
    from cpt_bench.matrix.plan import NO_PROMPT, Cell
    from cpt_bench.matrix.run import GroupJob, evaluate_group

    (run_dir / store.CELLS_DIR).mkdir(parents=True, exist_ok=True)
    cells = tuple(Cell(compression, NO_PROMPT, Target(task, limit), None, None) for task, limit in limits)
    seconds: list[float] = []

    def record(cell_id: str) -> None:  # read at once: cells of one task share an id and a file
        seconds.append(store.read_cell(store.cell_path(run_dir, cell_id))["seconds"])

    started = time.perf_counter()
    evaluate_group(GroupJob(config, run_dir, compression, NO_PROMPT, cells, folder, None), record)
    return time.perf_counter() - started, seconds


def compress_seconds(model: str, spec: str, out: Path, n_windows: int) -> float:
    """Wall seconds of compressing ``model`` to ``spec`` into ``out`` (the matrix's compression stage)."""
    from cpt_bench.compress.checkpoints import compress_to_folder
    from cpt_bench.compress.spec import CalibrationSettings, Spec

    started = time.perf_counter()
    compress_to_folder(model, Spec.parse(spec), CalibrationSettings(n_windows=n_windows, **CALIBRATION), out,
                       progress=False)
    return time.perf_counter() - started


def training_seconds(model: str, folder: Path) -> list[float]:
    """Recorded training seconds of soft prompts trained for each of ``TRAIN_STEPS`` steps (one evaluation each)."""
    from cpt_bench.models import load_model
    from cpt_bench.recovery.artifact import read_prompt
    from cpt_bench.recovery.soft import train_soft_prompt
    from cpt_bench.recovery.training import SoftPromptConfig

    loaded = load_model(model, device="cpu")
    lm, tokenizer, label = loaded.model, loaded.tokenizer, loaded.compression
    seconds = []
    for steps in TRAIN_STEPS:
        config = SoftPromptConfig(**TRAINING, steps=steps, eval_every=steps)
        out = train_soft_prompt(lm, tokenizer, config, "wikipedia", folder / f"prompt-{steps}", model_name=model,
                                compression=label)
        seconds.append(read_prompt(out).meta["train_seconds"])
    return seconds


def measure(model: str, workdir: Path, n_windows: int) -> dict[str, float]:
    """Every constant of ``plan.py``, measured (see the module docstring)."""
    from cpt_bench.matrix.run import task_manager

    config = matrix_config(model)
    task_manager(config)  # indexing lm-eval's task folders: once per run, not per cell
    gptq = compress_seconds(model, "gptq-w4g64", workdir / "gptq", n_windows)
    rtn_folder = workdir / "rtn"
    rtn = compress_seconds(model, "rtn-w4g64", rtn_folder, n_windows)
    warm_up = [(PPL_TASK, PPL_LIMITS[0]), (ITEM_TASK, ITEM_LIMITS[0])]
    cells = [(PPL_TASK, n) for n in PPL_LIMITS] + [(ITEM_TASK, n) for n in ITEM_LIMITS]
    dense_wall, dense_cells = timed_group(config, workdir / "run", "dense", None, warm_up + cells)
    rtn_wall, rtn_cells = timed_group(config, workdir / "run", "rtn-w4g64", str(rtn_folder), [(PPL_TASK, 2)])
    ppl_small, ppl_large, item_small, item_large = dense_cells[len(warm_up):]
    eval_rate = (PPL_LIMITS[1] - PPL_LIMITS[0]) * config.ppl_seqlen / (ppl_large - ppl_small)
    item_seconds = (item_large - item_small) / (ITEM_LIMITS[1] - ITEM_LIMITS[0])
    overhead = ((ppl_small - PPL_LIMITS[0] * config.ppl_seqlen / eval_rate)
                + (item_small - ITEM_LIMITS[0] * item_seconds)) / 2
    train_small, train_large = training_seconds(model, workdir)
    train_tokens = (TRAIN_STEPS[1] - TRAIN_STEPS[0]) * TRAINING["batch_size"] * TRAINING["seqlen"]
    return {
        "EVAL_TOKENS_PER_SECOND": eval_rate,
        "ITEM_SECONDS": item_seconds,
        "CALIBRATION_TOKENS_PER_SECOND": n_windows * CALIBRATION["seqlen"] / gptq,
        "UNCALIBRATED_SECONDS": rtn,
        "TRAIN_TOKENS_PER_SECOND": train_tokens / (train_large - train_small),
        "CELL_OVERHEAD_SECONDS": overhead,
        "MODEL_LOAD_SECONDS": ((dense_wall - sum(dense_cells)) + (rtn_wall - sum(rtn_cells))) / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--calibration-windows", type=int, default=16, help="GPTQ calibration windows of 512 tokens")
    args = parser.parse_args()
    from cpt_bench.matrix import plan

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cpt-plan-rates-") as tmp:
        measured = measure(args.model, Path(tmp), args.calibration_windows)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    rows = [[name, f"{getattr(plan, name):g}", f"{value:.3g}", f"{value / getattr(plan, name):.2f}"]
            for name, value in measured.items()]
    loads = [" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after)]
    print(f"model {args.model}, calibration {args.calibration_windows} x 512 tokens, {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}, {wall:.0f} s; "
          f"load average (1/5/15 min) before {loads[0]}, after {loads[1]}")
    print(tabulate(rows, headers=["constant", "plan.py", "measured", "measured / plan.py"], disable_numparse=True))


if __name__ == "__main__":
    main()
