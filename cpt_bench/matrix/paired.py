"""Paired comparisons of matrix cells: the per-example values a cell keeps, the comparisons the tables make, and the
text of ``cpt-bench compare`` (estimators: ``cpt_bench.stats``).

A cell record's ``examples`` block (``examples_record``, from lm-eval's logged samples) holds per window / item, in
lm-eval's document order: ``doc_ids``; ``doc_hashes``, the first ``HASH_DIGITS`` hex digits of lm-eval's hash of
the document, so that pairing checks that two cells scored the same text; and ``loglikelihood`` + ``n_tokens``
(perplexity targets: summed log-likelihood in nats and tokens per window) or ``scores`` (the target metric per
item, e.g. 0 / 1 for ``acc``). Two cells are paired over the documents they share.

The summary's comparisons of a cell (``cell_comparisons``), each against a cell of the same task:

- ``vs_none``: a prompted cell against the unprompted cell of its level;
- ``vs_dense``: every cell but the dense unprompted one against the dense unprompted cell (the tables' Δ);
- ``vs_init``: a learned soft prompt at its own level against its ``init`` control (``plan.control_for``; a LoRA
  adapter's initialisation is the unprompted model, ``vs_none``);
- ``vs_in_domain``: a transferred learned prompt or adapter (trained on another corpus, or at another level) against
  the one of its method learned at this level on the target's own corpus (zero-shot targets, which have none: on the
  same corpus), with the same seed;
- ``vs_trivial``: a prompted cell against the trivial-prefix control of its level (``plan.TRIVIAL_PREFIX``);
- ``gap_closed``: a prompted cell at a compressed level: ``(C - P) / (C - D)`` with its paired-bootstrap CI and
  ``gap_significant`` (whether C - D itself is told from zero; a share of a gap within noise is not shown);
- ``gap_closed_vs_trivial``: the same with the trivial-prefix control's cells as the baselines, ``(T_C - P) /
  (T_C - T_D)`` (T_C, T_D: the control at this level and on the dense model): the share of the gap left once both
  models have a neutral token before the window, i.e. what the prompt adds to any one-token prefix.

IDP cells (``idp_comparisons``, the summary's ``idp`` block of a cell): the rule, the set's ``members`` and how
often each was ``chosen``; ``vs_members``: the IDP cell against each member's own cell at its level on its target;
``best_in_hindsight``: against the member whose own cell scored best on the items the cells share, chosen on those
same items (``member``, ``values`` per member, ``selection``): matrix targets have no validation split to choose it
on, so the comparison flatters that member (``optimistic``: true).

A comparison (``comparison``): ``against`` (the other cell's id), ``scale`` (``log_ppl``: the change of log token
perplexity, this cell minus the other; ``difference``: of the per-item metric), ``estimate``, ``stderr``, ``ci``,
``n`` (shared examples) and ``significant``; for 0 / 1 metrics also ``discordant`` ([right only in the other, right
only in this]) and ``mcnemar_p``. ``significant``: the 95% CI excludes zero, except for 0 / 1 metrics with fewer
than ``stats.SMALL_DISCORDANT`` discordant items, where McNemar's exact p < 0.05 decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from cpt_bench import stats
from cpt_bench.errors import UserError
from cpt_bench.matrix.config import Target
from cpt_bench.matrix.plan import NO_PROMPT, TRIVIAL_PREFIX, Cell, Plan, PromptChoice, artifacts_of, control_for
from cpt_bench.recovery.controls import CONTROL_PROMPT_KIND

HASH_DIGITS = 12
INPUT_CHARS = 600  # characters of a generative item's context kept in its cell (the tail: the question is last)
ALPHA = 0.05
COMPARISON_KEYS = ("vs_none", "vs_dense", "vs_init", "vs_in_domain", "vs_trivial")
GAP_CLOSED_KEY = "gap_closed"
GAP_CLOSED_VS_TRIVIAL_KEY = "gap_closed_vs_trivial"
IDP_KEY = "idp"
HINDSIGHT_SELECTION = "on the same items (no validation split: optimistic)"


class PairingError(UserError):
    """Two cells that cannot be paired (other tasks, no shared documents, no kept examples); one-line message."""


@dataclass(frozen=True)
class Examples:
    """A cell's per-example values: ``values`` are summed log-likelihoods with token ``counts`` (perplexity) or
    per-item scores (``counts`` None), aligned with ``doc_ids`` and ``doc_hashes``."""

    doc_ids: list[int]
    doc_hashes: list[str]
    values: list[float]
    counts: list[float] | None

    @property
    def is_perplexity(self) -> bool:
        return self.counts is not None


def examples_record(samples: list[dict[str, Any]], target: Target, generative: bool = False) -> dict[str, Any] | None:
    """The compact ``examples`` block of a cell from lm-eval's logged ``samples`` of its task (those of the metric's
    filter, ``none`` unless the metric names one); None when the metric has no numeric per-sample value.

    ``generative``: the task generated text; the block then also holds ``generations`` (``generations_record``)."""
    key, _, filter_name = target.metric.partition(",")
    samples = [s for s in samples if s.get("filter", "none") == (filter_name or "none")]
    record: dict[str, Any] = {"doc_ids": [int(s["doc_id"]) for s in samples],
                              "doc_hashes": [str(s.get("doc_hash", ""))[:HASH_DIGITS] for s in samples]}
    if target.is_perplexity:
        record["loglikelihood"] = [float(s[key][0]) for s in samples]
        record["n_tokens"] = [int(s[key][1]) for s in samples]
        return record
    scores = [s.get(key) for s in samples]
    if not all(isinstance(score, int | float) for score in scores):
        return None
    record["scores"] = [float(score) for score in scores]
    if generative:
        record["generations"] = generations_record(samples)
    return record


def generations_record(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What a generative cell keeps of each item, aligned with ``doc_ids``: ``responses`` (the model's answer after
    the metric's filter), ``answers`` (the gold answer or answers, lm-eval's target as the task gives it) and
    ``inputs`` (the request's context string, its last ``INPUT_CHARS`` characters behind ``…`` when longer: the
    story of a CoQA item runs to kilobytes and is the same in every cell); ``input_chars`` records that cut."""
    def tail(text: str) -> str:
        return text if len(text) <= INPUT_CHARS else "…" + text[-INPUT_CHARS:]

    def response(sample: dict[str, Any]) -> str:
        filtered = sample.get("filtered_resps") or [""]
        first = filtered[0]
        return first if isinstance(first, str) else str(first[0] if isinstance(first, list) and first else first)

    return {"responses": [response(s) for s in samples],
            "answers": [_json_value(s.get("target")) for s in samples],
            "inputs": [tail(str(s["arguments"][0][0])) for s in samples],
            "input_chars": INPUT_CHARS}


def _json_value(value: Any) -> Any:
    """A target as JSON keeps it: strings and numbers as they are, lists element-wise, anything else as text."""
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def cell_examples(record: dict[str, Any]) -> Examples | None:
    """The ``Examples`` of a stored cell record, None for cells written before they were kept."""
    block = record.get("examples")
    if not block:
        return None
    if "loglikelihood" in block:
        return Examples(block["doc_ids"], block["doc_hashes"], block["loglikelihood"], block["n_tokens"])
    return Examples(block["doc_ids"], block["doc_hashes"], block["scores"], None)


def align(*examples: Examples) -> list[Examples]:
    """The examples restricted to the documents all of them share, in the first one's order.

    Raises ``PairingError`` when a shared document id carries different texts (hashes) or none is shared.
    """
    maps = [dict(zip(e.doc_ids, range(len(e.doc_ids)), strict=True)) for e in examples]
    shared = [doc for doc in examples[0].doc_ids if all(doc in m for m in maps[1:])]
    if not shared:
        raise PairingError("the cells share no windows or items (different limits or tasks)")
    aligned = []
    for e, positions in zip(examples, maps, strict=True):
        index = [positions[doc] for doc in shared]
        aligned.append(Examples(shared, [e.doc_hashes[i] for i in index], [e.values[i] for i in index],
                                None if e.counts is None else [e.counts[i] for i in index]))
    for e in aligned[1:]:
        for doc, mine, theirs in zip(shared, aligned[0].doc_hashes, e.doc_hashes, strict=True):
            if mine and theirs and mine != theirs:
                raise PairingError(f"document {doc} differs between the cells (hash {mine} vs {theirs}): they scored "
                                   "different texts")
    return aligned


def paired_estimate(a: Examples, b: Examples) -> stats.Estimate:
    """B - A over aligned examples: change of log perplexity, or mean per-item difference."""
    if a.is_perplexity:
        return stats.paired_log_ppl_change(a.values, a.counts, b.values, b.counts)
    return stats.paired_difference(a.values, b.values)


def unpaired_estimate(a: Examples, b: Examples) -> stats.Estimate:
    """B - A as if the two cells had scored independent samples (for contrast)."""
    if a.is_perplexity:
        return stats.unpaired_log_ppl_change(a.values, a.counts, b.values, b.counts)
    return stats.unpaired_difference(a.values, b.values)


def comparison(a: Examples, b: Examples, against: str) -> dict[str, Any]:
    """The stored comparison of cell B (these examples ``b``) against cell ``against`` (examples ``a``)."""
    a, b = align(a, b)
    estimate = paired_estimate(a, b)
    record: dict[str, Any] = {"against": against, "scale": "log_ppl" if a.is_perplexity else "difference",
                              **_estimate_fields(estimate), "significant": estimate.excludes_zero}
    counts = None if a.is_perplexity else stats.discordant(a.values, b.values)
    if counts is not None:
        p = stats.mcnemar_exact(*counts)
        record.update(discordant=list(counts), mcnemar_p=p)
        if sum(counts) < stats.SMALL_DISCORDANT:
            record["significant"] = p < ALPHA
    return record


def gap_closed(compressed: Examples, prompted: Examples, dense: Examples) -> dict[str, Any] | None:
    """The stored gap closed by ``prompted`` at the level of ``compressed``, relative to ``dense``; None when the
    level has no gap on these examples. ``gap_significant``: whether the gap itself (compressed against dense,
    paired, as ``comparison`` judges it) differs from zero; where it does not, the share is a ratio over noise and
    its bootstrap CI, whose denominator crosses zero, means nothing (reports print ``n/s``)."""
    compressed, prompted, dense = align(compressed, prompted, dense)
    counts = compressed.counts
    if counts is not None and (prompted.counts != counts or dense.counts != counts):
        return None  # token counts differ: the windows are not the same text
    estimate = stats.gap_closed(compressed.values, prompted.values, dense.values, counts)
    if estimate is None:
        return None
    return {**_estimate_fields(estimate), "method": "paired bootstrap", "resamples": stats.BOOTSTRAP_RESAMPLES,
            "seed": stats.BOOTSTRAP_SEED, "gap_significant": comparison(dense, compressed, "dense")["significant"]}


def _estimate_fields(estimate: stats.Estimate) -> dict[str, Any]:
    return {"estimate": estimate.estimate, "stderr": estimate.stderr,
            "ci": None if estimate.ci is None else list(estimate.ci), "n": estimate.n}


def _in_domain_reference(cell: Cell) -> PromptChoice | None:
    """The learned prompt a transferred learned prompt's cell is compared with (module docstring), or None."""
    prompt = cell.prompt
    if not prompt.is_learned or (cell.dataset_relation != "cross-dataset" and cell.compression_relation == "same"):
        return None
    reference = replace(prompt, source=cell.target.domain or prompt.source, trained_at=cell.compression)
    return None if reference == prompt else reference


def _counterparts(plan: Plan, cell: Cell) -> dict[str, tuple[str, PromptChoice]]:
    """The (compression, prompt) that each comparison of ``cell`` is made against, where it has one."""
    found = {}
    if cell.prompt != NO_PROMPT:
        found["vs_none"] = (cell.compression, NO_PROMPT)
    if (cell.compression, cell.prompt) != ("dense", NO_PROMPT):
        found["vs_dense"] = ("dense", NO_PROMPT)
    if cell.prompt.is_learned and cell.prompt.kind == CONTROL_PROMPT_KIND and cell.compression_relation == "same":
        found["vs_init"] = (cell.compression, control_for(plan.config, cell.prompt, "init"))
    reference = _in_domain_reference(cell)
    if reference is not None:
        found["vs_in_domain"] = (cell.compression, reference)
    if cell.prompt not in (NO_PROMPT, TRIVIAL_PREFIX):
        found["vs_trivial"] = (cell.compression, TRIVIAL_PREFIX)
    return found


def cell_comparisons(plan: Plan, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell id, the comparisons of the module docstring that its run holds (cells with kept examples only)."""
    examples = {cell.id: cell_examples(records[cell.id]) for cell in plan.cells if cell.id in records}
    index = {(cell.compression, cell.prompt, cell.target.name): cell.id for cell in plan.cells
             if examples.get(cell.id) is not None}
    found: dict[str, dict[str, Any]] = {}
    for cell in plan.cells:
        mine, task = examples.get(cell.id), cell.target.name
        if mine is None:
            continue
        block = {}
        for key, (compression, prompt) in _counterparts(plan, cell).items():
            if (other := index.get((compression, prompt, task))) is not None:
                block[key] = comparison(examples[other], mine, other)
        if cell.prompt != NO_PROMPT and cell.compression != "dense":
            for key, baseline in ((GAP_CLOSED_KEY, NO_PROMPT), (GAP_CLOSED_VS_TRIVIAL_KEY, TRIVIAL_PREFIX)):
                compressed, dense = index.get((cell.compression, baseline, task)), index.get(("dense", baseline, task))
                if cell.prompt != baseline and compressed and dense:
                    gap = gap_closed(examples[compressed], mine, examples[dense])
                    if gap is not None:
                        block[key] = gap
        if block:
            found[cell.id] = block
    return found


def idp_comparisons(plan: Plan, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per IDP cell id with kept examples, its ``idp`` block (module docstring); members of a user's folder have no
    cell of their own and are compared with nothing."""
    found: dict[str, dict[str, Any]] = {}
    for cell in plan.cells:
        record = records.get(cell.id)
        if cell.prompt.members is None or record is None or (mine := cell_examples(record)) is None:
            continue
        block: dict[str, Any] = {"rule": cell.prompt.rule, "members": list(cell.prompt.members),
                                 "chosen": record["prompt"].get("chosen"), "vs_members": {}}
        alone = {}
        for member in artifacts_of(plan.config, cell.prompt):
            other = Cell(cell.compression, member, cell.target, None, None).id
            if other in records and (theirs := cell_examples(records[other])) is not None:
                alone[member.id] = (other, theirs)
                block["vs_members"][member.id] = comparison(theirs, mine, other)
        if len(alone) >= 2:
            block["best_in_hindsight"] = _best_in_hindsight(mine, alone, record["metric"].get("higher_is_better"))
        found[cell.id] = block
    return found


def _best_in_hindsight(mine: Examples, alone: dict[str, tuple[str, Examples]],
                       higher_is_better: bool | None) -> dict[str, Any]:
    """The IDP cell (``mine``) against the member whose cell scores best (mean per-item metric; ties to the first
    member) on the items all the cells share: that choice is made on the items compared (``HINDSIGHT_SELECTION``)."""
    aligned = align(mine, *(examples for _, examples in alone.values()))
    means = {member: sum(e.values) / len(e.values) for member, e in zip(alone, aligned[1:], strict=True)}
    sign = -1.0 if higher_is_better is False else 1.0
    best = max(means, key=lambda member: sign * means[member])
    return {"member": best, "values": means, "selection": HINDSIGHT_SELECTION, "optimistic": True,
            **comparison(alone[best][1], mine, alone[best][0])}


# --- cpt-bench compare --------------------------------------------------------------------------------------------

def _interval(ci: tuple[float, float] | None, transform=float, digits: int = 4) -> str:
    return "n/a" if ci is None else f"[{transform(ci[0]):.{digits}f}, {transform(ci[1]):.{digits}f}]"


def _line(label: str, what: str, estimate: stats.Estimate) -> str:
    stderr = "n/a" if estimate.stderr is None else f"{estimate.stderr:.4f}"
    return f"{label}{what} = {estimate.estimate:+.4f}, stderr {stderr}, 95% CI {_interval(estimate.ci)}"


def describe_comparison(record_a: dict[str, Any], record_b: dict[str, Any]) -> str:
    """The text ``cpt-bench compare`` prints for cells A and B (stored records): paired and unpaired B - A."""
    cell_a, cell_b = record_a["cell"], record_b["cell"]
    if cell_a["task"] != cell_b["task"]:
        raise PairingError(f"cells {cell_a['id']} and {cell_b['id']} score different tasks ({cell_a['task']} vs "
                           f"{cell_b['task']}); expected two cells of one task")
    examples = []
    for cell, record in ((cell_a, record_a), (cell_b, record_b)):
        found = cell_examples(record)
        if found is None:
            raise PairingError(f"cell {cell['id']} keeps no per-example values (written by an older cpt_bench); "
                               "delete its file and --resume the run to evaluate it again")
        examples.append(found)
    a, b = align(*examples)
    metric = record_b["metric"]["name"]
    unit = "windows" if a.is_perplexity else "items"
    what = f"change in log {metric} (B - A)" if a.is_perplexity else f"difference in {metric} (B - A)"
    paired, unpaired = paired_estimate(a, b), unpaired_estimate(a, b)
    lines = [f"{cell_b['task']} ({metric}), {len(a.doc_ids)} shared {unit}",
             f"  A {cell_a['id']}: {record_a['metric']['value']:.4f}",
             f"  B {cell_b['id']}: {record_b['metric']['value']:.4f}"]
    stored = comparison(a, b, cell_a["id"])
    verdict = "differs at 95%" if stored["significant"] else "no difference at 95%"
    line = _line("paired:   ", what, paired)
    if a.is_perplexity:
        line += f"; perplexity ratio B / A {math.exp(paired.estimate):.4f} {_interval(paired.ci, math.exp)}"
    if "mcnemar_p" in stored:
        only_a, only_b = stored["discordant"]
        line += f"; McNemar exact: {only_a} right only in A, {only_b} only in B, p = {stored['mcnemar_p']:.4g}"
    lines += [f"{line}; {verdict}", _line("unpaired: ", what, unpaired) + " (as if the cells had independent samples)"]
    return "\n".join(lines)
