"""The evaluation protocol of a run's target: what must be equal for two numbers to share a leaderboard column.

A protocol is the window length of perplexity tasks (``ppl_seqlen``) and the tokenizer that cut the windows (the
run's model: token perplexity counts that tokenizer's tokens, and its windows cover different text under another
tokenizer, so perplexities of models with different tokenizers never share a column), the number of windows or
items scored (``limit``, None: all), the few-shot count, where a prompt goes and the dtype the model ran in (a
bfloat16 model and its log-softmax round differently from a float32 one, so their numbers differ by more than the
last digit). Multiple-choice items are the same whatever the tokenizer: accuracies of different models do share a
column. The summary does not hold it, so it is read from the run folder: ``config.json`` (every default filled in)
or else ``config.yaml``; few-shot from ``submission.json`` (the ``n-shot`` lm-eval recorded in the cells of a
submitted run) or else from the task's definition in ``tasks/``. The matrix never overrides few-shot, so the task's
``num_fewshot`` is what ran (lm-eval's default is 0); for a task that is not ours it is unknown (None, shown as "task
default").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpt_bench.assets.model import model_label
from cpt_bench.lmeval.tasks import TASKS_DIR
from cpt_bench.matrix.config import PPL_TASK_PREFIX, ConfigError, MatrixConfig, config_from_dict
from cpt_bench.matrix.store import CONFIG_FILE, RunFolderError, read_run_config
from cpt_bench.report.tables import ReportError

CONFIG_YAML = "config.yaml"
# The cpt adapter puts every prompt (soft or hard) before the request's tokens, the only position it implements.
PROMPT_POSITION = "prompt before the input"
DEFAULT_DTYPE = MatrixConfig.dtype  # float32: the labels name other dtypes only
_LINE_KEY = re.compile(r"^(include|num_fewshot):\s*(\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Protocol:
    """How a target was scored: ``seqlen`` tokens per window of ``tokenizer`` (the model whose tokenizer cut them;
    both None for tasks that are not perplexity), ``limit`` windows or items (None: all), ``fewshot`` examples (None:
    the task's default, not recorded), the model in ``dtype`` (a matrix config's ``dtype``)."""

    seqlen: int | None
    limit: int | None
    fewshot: int | None
    tokenizer: str | None = None
    dtype: str = DEFAULT_DTYPE

    def label(self) -> str:
        """E.g. ``8 windows of 512 tokens of smollm2-135m-instruct, 0-shot, prompt before the input`` or
        ``100 items, ...``; the dtype is named where it is not the default float32 (``..., bfloat16``)."""
        count = "all" if self.limit is None else str(self.limit)
        scored = (f"{count} windows of {self.seqlen} tokens of {self.tokenizer}" if self.seqlen is not None
                  else f"{count} items")
        shots = "few-shot: task default" if self.fewshot is None else f"{self.fewshot}-shot"
        dtype = "" if self.dtype == DEFAULT_DTYPE else f", {self.dtype}"
        return f"{scored}, {shots}, {PROMPT_POSITION}{dtype}"


def run_config(folder: Path) -> MatrixConfig:
    """The config a run folder was made from (``config.json`` as ``store.read_run_config`` reads it, else
    ``config.yaml``); ``ReportError`` when absent."""
    if (folder / CONFIG_FILE).is_file():
        try:
            return read_run_config(folder)
        except RunFolderError as error:
            raise ReportError(str(error)) from None
    path = folder / CONFIG_YAML
    if path.is_file():
        try:
            return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (ValueError, yaml.YAMLError, ConfigError) as error:
            raise ReportError(f"{path}: not a usable matrix config ({error})") from None
    raise ReportError(f"{folder}: neither {CONFIG_FILE} nor {CONFIG_YAML} found (a run folder keeps the config it "
                      "was made from; the leaderboard reads the protocol from it)")


def task_fewshot(task: str) -> int | None:
    """``num_fewshot`` of one of our tasks (``tasks/<task>.yaml`` and what it includes; 0 when none sets it), None
    for a task that is not ours. Read line by line because the files use lm-eval's ``!function`` YAML tag."""
    path = TASKS_DIR / f"{task.split('@')[0]}.yaml"
    if not path.is_file():
        return None
    while path.is_file():
        keys = dict(_LINE_KEY.findall(path.read_text(encoding="utf-8")))
        if "num_fewshot" in keys:
            return int(keys["num_fewshot"])
        if "include" not in keys:
            return 0
        path = path.parent / keys["include"]
    return 0


def run_protocols(folder: Path, targets: list[dict[str, Any]], recorded: dict[str, int]) -> dict[str, Protocol]:
    """The protocol of each of a run's targets (summary ``targets`` entries), by task; ``recorded``: few-shot per
    task from the cells (a submission's ``fewshot``), else read from the task's definition."""
    config = run_config(folder)
    limits = {target.name: target.limit for target in config.targets}
    if missing := [t["task"] for t in targets if t["task"] not in limits]:
        raise ReportError(f"{folder}: the config has no target {', '.join(missing)} of its summary")
    tokenizer = model_label(config.model)
    protocols = {}
    for target in targets:
        task = target["task"]
        perplexity = task.startswith(PPL_TASK_PREFIX)
        protocols[task] = Protocol(config.ppl_seqlen if perplexity else None, limits[task],
                                   recorded.get(task, task_fewshot(task)), tokenizer if perplexity else None,
                                   config.dtype)
    return protocols
