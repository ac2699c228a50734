"""Paired-comparison tables of a run summary (from the cells' comparisons, ``matrix.paired``).

- ``recovery_tables``: per compression level and target, every prompt applied there against no prompt at that
  level, the gap it closes, against its ``init`` control (learned prompts at their own level), for transfers
  against the prompt learned at this level on the target's own corpus, and against the trivial-prefix control with
  the gap closed over it: learned recovery versus any extra context.
- ``seed_tables``: per learned prompt trained with several seeds, each seed's value and paired comparisons, then
  their mean and spread (sample standard deviation) across seeds.
- ``method_tables``: per compression level that prompts or adapters were trained at, every recovery method applied
  there (hard prompt, controls, soft prompts per objective, LoRA and EoRA adapters, IDP) with its budget (trainable
  and stored parameters, added bytes, seconds and peak memory of its training or fit) beside what it buys: the gap
  closed on each perplexity target and the change on each other target against no prompt, each with its CI;
  methods trained with several seeds add a mean ± sd row.
- ``idp_tables``: per IDP prompt (a set and a rule), at each level and target it ran, how often each member was
  chosen, the IDP cell against each member alone and against the best single member in hindsight: the member whose
  own cell scored best on the same items, so chosen on the items compared (matrix targets have no validation split),
  an optimistic reference (``matrix.paired.idp_comparisons``).

Perplexity comparisons read as the change of token perplexity in percent, ``exp(Δ log ppl) - 1``; accuracy ones as
the per-item difference; gap closed in percent. Brackets hold the 95% CI; ``*`` marks a difference whose CI excludes
zero (McNemar's exact test decides where few items disagree, see ``matrix.paired``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.report.tables import (
    GAP_UNRESOLVED,
    MISSING,
    SIGNIFICANT_MARK,
    Summary,
    Table,
    format_bytes,
    format_entry,
    format_number,
    has_paired_statistics,
    is_learned,
    is_perplexity,
    method,
    prompt_label,
)

COMPARISON_COLUMNS = (("vs_none", "vs none"), ("gap_closed", "gap closed"), ("vs_init", "vs init"),
                      ("vs_in_domain", "vs in-domain"), ("vs_trivial", "vs trivial"),
                      ("gap_closed_vs_trivial", "gap closed vs trivial"))
SEED_COLUMNS = COMPARISON_COLUMNS[:3]
GAP_KEYS = ("gap_closed", "gap_closed_vs_trivial")
HINDSIGHT_HEADER = "vs best single prompt in hindsight (chosen on the same items: optimistic)"


def _percent_change(log_change: float) -> float:
    return (math.exp(log_change) - 1) * 100


def _comparison_number(comparison: dict[str, Any], value: float) -> str:
    if comparison.get("scale") == "log_ppl":
        return f"{_percent_change(value):+.1f}%"
    return f"{value + 0.0:+.3f}"


def format_comparison(comparison: dict[str, Any] | None) -> str:
    """``+x [lo, hi]*``: a paired comparison (perplexity: % change of perplexity; accuracy: difference), ``–`` if
    absent."""
    if comparison is None:
        return MISSING
    text = _comparison_number(comparison, comparison["estimate"])
    if comparison.get("ci"):
        low, high = (_comparison_number(comparison, bound) for bound in comparison["ci"])
        text += f" [{low}, {high}]"
    return text + (SIGNIFICANT_MARK if comparison.get("significant") else "")


def format_gap(gap: dict[str, Any] | None) -> str:
    """``34% [28%, 40%]``: the gap closed with its bootstrap CI, ``–`` if absent, ``n/s`` where the compression gap
    itself is not told from zero (a share of noise)."""
    if gap is None:
        return MISSING
    if gap.get("gap_significant") is False:
        return GAP_UNRESOLVED
    text = f"{gap['estimate'] * 100:.0f}%"
    return text + (f" [{gap['ci'][0] * 100:.0f}%, {gap['ci'][1] * 100:.0f}%]" if gap.get("ci") else "")


def _format(key: str, cell: dict[str, Any] | None) -> str:
    if cell is None:
        return MISSING
    return format_gap(cell.get(key)) if key in GAP_KEYS else format_comparison(cell.get(key))


def _without_empty_columns(headers: list[str], rows: list[list[str]], keep: int) -> tuple[list[str], list[list[str]]]:
    """Drop the value columns after the first ``keep`` that are ``–`` in every row."""
    used = [index for index in range(len(headers)) if index < keep or any(row[index] != MISSING for row in rows)]
    return [headers[i] for i in used], [[row[i] for i in used] for row in rows]


def recovery_tables(summary: Summary) -> list[Table]:
    """Per (compression level, target) with compared prompted cells: a row per prompt (module docstring)."""
    tables = []
    for compression in summary.compressions:
        spec = compression["spec"]
        for target in summary.targets:
            cells = [(p, summary.cell(spec, p["id"], target["task"])) for p in summary.prompts if p["kind"] != "none"]
            rows = [[prompt_label(p, target), format_entry(cell, target),
                     *(_format(key, cell) for key, _ in COMPARISON_COLUMNS)]
                    for p, cell in cells if cell is not None and any(key in cell for key, _ in COMPARISON_COLUMNS)]
            if not rows:
                continue
            headers, rows = _without_empty_columns(["prompt", "value ± stderr", *(h for _, h in COMPARISON_COLUMNS)],
                                                   rows, keep=2)
            title = f"{spec}, {target['task']} ({target['metric']}): prompts compared pairwise, 95% CI"
            tables.append(Table(title, headers, rows))
    return tables


BUDGET_HEADERS = ["trainable params", "stored params", "added bytes", "train or fit s", "peak MiB"]


def _budget(prompt: dict[str, Any]) -> list[str]:
    """``BUDGET_HEADERS`` of a method: parameters trained, values it stores on top of the compressed model and their
    bytes (``RecoveryKind.added_bytes``), and the seconds and peak MiB its training, or for EoRA its closed-form fit,
    took; ``0`` for what an untrained method does not have, ``–`` for what the run did not record."""
    added_bytes = RECOVERY_KINDS[prompt["kind"]].added_bytes(prompt)
    added = format_bytes(added_bytes)
    fitted = "fit_seconds" in prompt  # an EoRA adapter: fitted in closed form, nothing trained
    if not (is_learned(prompt) or fitted):
        return ["0", "0" if added_bytes == 0 else MISSING, added, "0", MISSING]
    trainable = prompt.get("trainable_parameters")
    stored = prompt.get("stored_parameters", trainable)
    seconds = prompt.get("fit_seconds" if fitted else "train_seconds")
    peak = prompt.get("fit_peak_memory_bytes" if fitted else "train_peak_memory_bytes")
    return [_count(trainable), _count(stored), added, MISSING if seconds is None else f"{seconds:.0f}",
            MISSING if peak is None else f"{peak / 2**20:.0f}"]


def _count(value: int | None) -> str:
    return MISSING if value is None else f"{value:,}"


def _effect_key(target: dict[str, Any]) -> str:
    return "gap_closed" if is_perplexity(target["metric"]) else "vs_none"


def _effect_header(target: dict[str, Any]) -> str:
    return f"gap closed, {target['task']}" if is_perplexity(target["metric"]) else f"vs none, {target['task']}"


def _effect_spread(cells: list[dict[str, Any] | None], target: dict[str, Any]) -> str:
    """Mean ± sd over seeds of a method's gap closed (perplexity) or change against no prompt (other metrics)."""
    found = [cell[_effect_key(target)] for cell in cells if cell and cell.get(_effect_key(target))]
    if _effect_key(target) == "gap_closed":
        return _spread([g["estimate"] * 100 for g in found], lambda v: f"{v:.0f}%")
    return _spread([c["estimate"] for c in found], lambda v: f"{v + 0.0:+.3f}")


def method_tables(summary: Summary) -> list[Table]:
    """Per level with trained prompts or adapters: a row per method applied there (module docstring); none for a
    summary written before cells carried paired comparisons (every effect would be ``–``)."""
    if not has_paired_statistics(summary):
        return []
    tables = []
    for spec in dict.fromkeys(p["trained_at"] for p in summary.learned):
        prompts = [p for p in summary.prompts if p["kind"] != "none" and (p.get("trained_at") or spec) == spec
                   and any(summary.cell(spec, p["id"], t["task"]) for t in summary.targets)]
        trivial_columns = [t for t in summary.targets if is_perplexity(t["metric"])]
        rows = []
        for prompt in prompts:
            cells = [summary.cell(spec, prompt["id"], t["task"]) for t in summary.targets]
            rows.append([prompt_label(prompt), *_budget(prompt),
                         *(_format(_effect_key(t), cell) for t, cell in zip(summary.targets, cells, strict=True)),
                         *(_format("gap_closed_vs_trivial", summary.cell(spec, prompt["id"], t["task"]))
                           for t in trivial_columns)])
        for (how, source, _), group in _seed_groups(summary).items():
            if group[0]["trained_at"] != spec:
                continue
            seconds = [p["train_seconds"] for p in group if p.get("train_seconds") is not None]
            effects = [_effect_spread([summary.cell(spec, p["id"], t["task"]) for p in group], t)
                       for t in summary.targets]
            rows.append([f"{how}:{source}@{spec}, mean ± sd ({len(group)} seeds)", *_budget(group[0])[:3],
                         _spread(seconds, lambda v: f"{v:.0f}"), MISSING, *effects,
                         *(MISSING for _ in trivial_columns)])
        headers = ["method", *BUDGET_HEADERS, *map(_effect_header, summary.targets),
                   *(f"gap closed vs trivial, {t['task']}" for t in trivial_columns)]
        headers, rows = _without_empty_columns(headers, rows, keep=1 + len(BUDGET_HEADERS) + len(summary.targets))
        domains = ", ".join(sorted({p["source"] for p in summary.learned if p["trained_at"] == spec}))
        title = (f"{spec}: recovery methods and their budget; trained on {domains} (in-domain where a target reads "
                 "it); gap closed or change against no prompt, 95% CI")
        tables.append(Table(title, headers, rows, label_columns=1))
    return tables


def _seed_groups(summary: Summary) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Learned prompts and adapters trained with several seeds, by (method, source, trained_at)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for prompt in summary.learned:
        if prompt.get("seed") is not None:
            groups.setdefault((method(prompt), prompt["source"], prompt["trained_at"]), []).append(prompt)
    return {key: prompts for key, prompts in groups.items() if len(prompts) > 1}


def _spread(values: list[float], render) -> str:
    """``mean ± sd`` over seeds (sd: sample standard deviation), ``–`` with fewer than two values."""
    if len(values) < 2:
        return MISSING
    return f"{render(statistics.mean(values))} ± {render(statistics.stdev(values)).lstrip('+')}"


def _mean_row(cells: list[dict[str, Any]], target: dict[str, Any]) -> list[str]:
    metric = target["metric"]
    row = [f"mean ± sd ({len(cells)} seeds)", _spread([c["value"] for c in cells], lambda v: format_number(v, metric))]
    for key, _ in SEED_COLUMNS:
        found = [c[key] for c in cells if c.get(key)]
        if key == "gap_closed":
            row.append(_spread([g["estimate"] * 100 for g in found], lambda v: f"{v:.0f}%"))
        elif found and found[0].get("scale") == "log_ppl":
            row.append(_spread([_percent_change(c["estimate"]) for c in found], lambda v: f"{v:+.1f}%"))
        else:
            row.append(_spread([c["estimate"] for c in found], lambda v: f"{v + 0.0:+.3f}"))
    return row


def seed_tables(summary: Summary) -> list[Table]:
    """Per learned prompt with several seeds: per (level applied at, target) a row per seed, then mean ± sd."""
    tables = []
    for (how, source, trained_at), prompts in _seed_groups(summary).items():
        rows = []
        for compression in summary.compressions:
            spec = compression["spec"]
            for target in summary.targets:
                found = [(p, summary.cell(spec, p["id"], target["task"])) for p in prompts]
                found = [(p, cell) for p, cell in found if cell is not None]
                if not found:
                    continue
                label = [spec, target["task"]]
                rows += [[*label, f"seed {p['seed']}", format_entry(cell, target),
                          *(_format(key, cell) for key, _ in SEED_COLUMNS)] for p, cell in found]
                rows.append([*label, *_mean_row([cell for _, cell in found], target)])
        headers = ["applied at", "target", "seed", "value ± stderr", *(h for _, h in SEED_COLUMNS)]
        headers, rows = _without_empty_columns(headers, rows, keep=4)
        title = f"{how}:{source}@{trained_at} over {len(prompts)} training seeds: each seed, then mean ± sd"
        tables.append(Table(title, headers, rows, label_columns=3))
    return tables


def idp_tables(summary: Summary) -> list[Table]:
    """Per IDP prompt with compared cells: a row per (level, target) it ran at (module docstring)."""
    tables = []
    for prompt in (p for p in summary.prompts if p["kind"] == "idp"):
        members = prompt["members"]
        rows = []
        for compression in summary.compressions:
            for target in summary.targets:
                cell = summary.cell(compression["spec"], prompt["id"], target["task"])
                if cell is None or "idp" not in cell:
                    continue
                block = cell["idp"]
                chosen = " / ".join(f"{member} {count}" for member, count in (block.get("chosen") or {}).items())
                best = block.get("best_in_hindsight")
                rows.append([compression["spec"], target["task"], format_entry(cell, target), chosen or MISSING,
                             *(format_comparison(block["vs_members"].get(member)) for member in members),
                             MISSING if best is None else f"{best['member']}: {format_comparison(best)}"])
        if rows:
            title = (f"{prompt_label(prompt)}: IDP ({prompt['rule']}) against each prompt of its set alone, paired, "
                     "95% CI")
            tables.append(Table(title, ["level", "target", "value ± stderr", "documents chosen per prompt",
                                        *(f"vs {member}" for member in members), HINDSIGHT_HEADER], rows,
                                label_columns=2))
    return tables
