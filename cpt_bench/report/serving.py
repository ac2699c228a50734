"""What compression saves against what a prompt costs to serve: the paper's efficiency argument, in bytes.

Per compression level and prompt applied there (one row per method and length: the cost depends on them only):

- saved: the dense fp16 checkpoint's weight bytes minus the level's stored bytes (``compression.json``'s account),
  and, when the cells recorded it, the resident bytes of the loaded dense model minus the level's
  (``models.resident_bytes``: dequantized weights in simulated mode, packed codes with real kernels);
- cost: the prompt's own bytes (soft prompt embeddings, LoRA tensors) and its key/value cache, which every sequence
  served with the prompt holds: ``tokens x kv_values_per_token x 2`` bytes per sequence in an fp16 cache
  (``kv_values_per_token``: the keys' and values' scalars one position adds over all layers, measured by the ``cpt``
  adapter from the prefix cache it built), shown at batches of ``BATCHES`` sequences;
- break-even: how many concurrent sequences' prompt caches add up to the stored bytes saved;
- generation (``generation_tables``, for runs with generative targets): a sequence holds the prompt's cache through
  all its decode steps, and every step reads all of it: per generated sequence, the bytes held and the bytes read
  over ``max_gen_toks`` steps (the target's, else lm-eval's default), the latter against one step's read of the
  unprompted weights.

``serving_plot_data`` gives the same numbers for the plot (``plots.write_plots``): bytes against concurrent
sequences, one rising line per prompt length, one flat line per level's saving. Summaries whose cells predate the
memory record (no ``kv_values_per_token``) get neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.report.tables import MISSING, Summary, Table, method

FP16_BYTES = 2  # the cache dtype costs are shown in: the dense fp16 checkpoint's, which savings are counted against
BATCHES = (1, 32)
_MB = 1e6


@dataclass(frozen=True)
class PromptCost:
    """A prompt's serving cost: its label, tokens, own bytes and fp16 key/value cache bytes per sequence."""

    label: str
    tokens: int
    own_bytes: int
    kv_bytes_per_sequence: int


@dataclass(frozen=True)
class LevelSaving:
    """A compression level's weight bytes saved against the dense model (stored; resident when recorded)."""

    spec: str
    stored_saved: int
    resident_saved: int | None


def _prompt_costs(summary: Summary, spec: str) -> list[PromptCost]:
    """One cost per (method, length) of the prompts applied at ``spec`` whose cells know the cache's size."""
    costs: dict[str, PromptCost] = {}
    applied = {cell["prompt"] for cell in summary.raw["cells"] if cell["compression"] == spec}
    for prompt in summary.prompts:
        if prompt["id"] not in applied or prompt["kind"] == "none":
            continue
        if not RECOVERY_KINDS[prompt["kind"]].prefix:  # an adapter: its tensors, no cache
            label = f"{prompt['kind']} ({prompt.get('trainable_parameters') or 0:,} params)"
            costs.setdefault(label, PromptCost(label, 0, prompt.get("adapter_bytes") or 0, 0))
            continue
        values, tokens = prompt.get("kv_values_per_token"), prompt.get("n_tokens") or 0
        if values is None:
            continue
        kind = prompt.get("control") or method(prompt)
        label = f"{kind} ({tokens} tokens)"
        costs.setdefault(label, PromptCost(label, tokens, prompt.get("embedding_bytes") or 0,
                                           tokens * values * FP16_BYTES))
    return list(costs.values())


def _resident(summary: Summary, spec: str) -> int | None:
    """Resident bytes of the unprompted model at ``spec``, from its first cell that recorded them."""
    return next((cell["resident_bytes"] for cell in summary.raw["cells"]
                 if cell["compression"] == spec and cell["prompt"] == "none" and cell.get("resident_bytes")), None)


def level_savings(summary: Summary) -> list[LevelSaving]:
    """Bytes saved by each compressed level of the run (dense itself left out)."""
    dense_resident = _resident(summary, "dense")
    savings = []
    for compression in summary.compressions:
        dense_stored = compression.get("dense_fp16_bytes")
        if compression["spec"] == "dense" or dense_stored is None:
            continue
        resident = _resident(summary, compression["spec"])
        resident_saved = None if resident is None or dense_resident is None else dense_resident - resident
        savings.append(LevelSaving(compression["spec"], dense_stored - compression["weight_bytes"], resident_saved))
    return savings


def _mb(value: int | None) -> str:
    return MISSING if value is None else f"{value / _MB:.1f}"


def _kb(value: int) -> str:
    return f"{value / 1e3:.1f}"


def _break_even(saving: LevelSaving, cost: PromptCost) -> str:
    """Concurrent sequences whose prompt caches together take the stored bytes saved (``–`` when nothing is cached
    or nothing saved)."""
    if cost.kv_bytes_per_sequence == 0 or saving.stored_saved <= 0:
        return MISSING
    return f"{math.floor(saving.stored_saved / cost.kv_bytes_per_sequence):,}"


def serving_tables(summary: Summary) -> list[Table]:
    """One table of the run: saved bytes per level beside each of its prompts' serving costs (empty list when no
    prompted cell recorded its cache's size)."""
    rows = []
    for saving in level_savings(summary):
        for cost in _prompt_costs(summary, saving.spec):
            rows.append([saving.spec, cost.label, _mb(saving.stored_saved), _mb(saving.resident_saved),
                         _kb(cost.own_bytes), _kb(cost.kv_bytes_per_sequence),
                         *(_mb(batch * cost.kv_bytes_per_sequence) for batch in BATCHES), _break_even(saving, cost)])
    if not rows:
        return []
    headers = ["compression", "prompt", "stored MB saved", "resident MB saved", "prompt KB", "prompt KV KB / sequence",
               *(f"prompt KV MB at batch {batch}" for batch in BATCHES), "break-even sequences"]
    return [Table("Memory saved by compression vs memory the prompt costs", headers, rows, label_columns=2)]


def generation_tables(summary: Summary) -> list[Table]:
    """For each generative target of the run (``max_gen_toks`` in its summary record): the prompt's cache held by one
    generated sequence and read over its decode steps, per level and prompt (empty when none applies)."""
    tables = []
    for target in summary.targets:
        steps = target.get("max_gen_toks")
        if not steps:
            continue
        rows = [[saving.spec, cost.label, _kb(cost.kv_bytes_per_sequence),
                 _mb(BATCHES[-1] * cost.kv_bytes_per_sequence), _mb(steps * cost.kv_bytes_per_sequence)]
                for saving in level_savings(summary) for cost in _prompt_costs(summary, saving.spec)
                if cost.kv_bytes_per_sequence]
        if rows:
            headers = ["compression", "prompt", "prompt KV KB held / sequence",
                       f"prompt KV MB held at batch {BATCHES[-1]}", f"prompt KV MB read / sequence ({steps} steps)"]
            tables.append(Table(f"Prompt cache during generation on {target['task']} (up to {steps} new tokens)",
                                headers, rows, label_columns=2))
    return tables


def serving_plot_data(summary: Summary) -> tuple[list[LevelSaving], list[PromptCost]]:
    """The levels' savings and the distinct prompt costs (by label, over all levels) for the serving-cost plot."""
    savings = level_savings(summary)
    costs: dict[str, PromptCost] = {}
    for saving in savings:
        for cost in _prompt_costs(summary, saving.spec):
            if cost.kv_bytes_per_sequence:
                costs.setdefault(cost.label, cost)
    return savings, list(costs.values())
