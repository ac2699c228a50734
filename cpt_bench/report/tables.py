"""Tables of a transfer-matrix run summary (``summary.json``, format ``cpt_bench.matrix_summary/1``).

Layout choice: the main results are one table per target task (rows: compression levels with their stored size;
columns: one per prompt evaluated on that target). One table with a column per (target, prompt) pair outgrows a
page at more than two targets, and per target the "(in-domain)" marker of a soft prompt holds for a whole column.
Transfer matrices are ``Grid``s of summary cells, rendered both as tables here and as heatmaps in ``plots``.
Which prompt is in-domain or at its own level is derived from the prompts and targets (source == target domain,
trained_at == compression), so the cells' ``dataset_relation`` / ``compression_relation`` fields are not read.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import LATEX_ESCAPE_RULES, tabulate

from cpt_bench.errors import UserError
from cpt_bench.matrix.store import (
    SUMMARY_FORMAT,
    SUMMARY_KEYS_BY_PROMPT_KIND,
    SUMMARY_NUMBERS,
    SUMMARY_OPTIONAL_COMPARISONS,
    SUMMARY_OPTIONAL_FLAGS,
    SUMMARY_OPTIONAL_NUMBERS,
    SUMMARY_REQUIRED_KEYS,
)
from cpt_bench.recovery import LEARNED_KINDS
from cpt_bench.recovery.hard import TEXT_FORM
from cpt_bench.stats import SMALL_DISCORDANT

MISSING = "–"
GAP_UNRESOLVED = "n/s"  # a gap closed whose compression gap is within noise: its share is not shown
_EXPECTED = f"expected a {SUMMARY_FORMAT} summary written by the matrix runner"
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "×": r"$\times$", "↑": r"$\uparrow$",
                  "↓": r"$\downarrow$"}


class ReportError(UserError):
    """A summary (or results folder) that cannot be reported; the one-line message names the file."""


def _fail(origin: str, problem: str) -> None:
    raise ReportError(f"{origin}: {problem} ({_EXPECTED})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_entry(entry: Any, section: str, where: str, origin: str) -> None:
    """``entry`` is an object with the keys and numeric fields that ``section`` requires."""
    if not isinstance(entry, dict):
        _fail(origin, f"{where} is not an object")
    required = SUMMARY_REQUIRED_KEYS[section] + SUMMARY_KEYS_BY_PROMPT_KIND.get(entry.get("kind"), ())
    if missing := [key for key in required if key not in entry]:
        _fail(origin, f"{where} lacks {', '.join(map(repr, missing))}")
    numbers = [key for key in SUMMARY_NUMBERS.get(section, ()) if not _is_number(entry[key])]
    numbers += [key for key in SUMMARY_OPTIONAL_NUMBERS.get(section, ()) if entry.get(key) is not None
                and not _is_number(entry[key])]
    if numbers:
        _fail(origin, f"{where} has non-numeric {', '.join(map(repr, numbers))}")
    if flags := [key for key in SUMMARY_OPTIONAL_FLAGS.get(section, ()) if entry.get(key) not in (None, True, False)]:
        _fail(origin, f"{where} has non-boolean {', '.join(map(repr, flags))}")
    if bad := [key for key in SUMMARY_OPTIONAL_COMPARISONS.get(section, ()) if entry.get(key) is not None
               and not (isinstance(entry[key], dict) and _is_number(entry[key].get("estimate")))]:
        _fail(origin, f"{where} has {', '.join(map(repr, bad))} without a numeric 'estimate'")


def _unique(raw: dict[str, Any], section: str, key: str, origin: str) -> set[str]:
    """The ``key`` values of ``raw[section]``, which must not repeat."""
    values = [entry[key] for entry in raw[section]]
    if duplicates := sorted({str(v) for v in values if values.count(v) > 1}):
        _fail(origin, f"{section} repeat {key} {', '.join(duplicates)}")
    return set(values)


def validate_summary(raw: Any, origin: str) -> None:
    """Raise ``ReportError`` naming ``origin`` (a path or label) unless ``raw`` is a usable summary."""
    if not isinstance(raw, dict):
        _fail(origin, "not a JSON object")
    if raw.get("format") != SUMMARY_FORMAT:
        _fail(origin, f"format is {raw.get('format')!r}")
    _check_entry(raw, "summary", "the summary", origin)
    for section in ("compressions", "targets", "prompts", "cells"):
        if not isinstance(raw[section], list) or (section != "cells" and not raw[section]):
            _fail(origin, f"{section!r} is not a non-empty list")
        for index, entry in enumerate(raw[section]):
            _check_entry(entry, section, f"{section}[{index}]", origin)
    if kinds := sorted({str(p["kind"]) for p in raw["prompts"]} - set(SUMMARY_KEYS_BY_PROMPT_KIND)):
        _fail(origin, f"prompts have unknown kind {', '.join(kinds)}")
    known = {"compression": _unique(raw, "compressions", "spec", origin),
             "prompt": _unique(raw, "prompts", "id", origin), "task": _unique(raw, "targets", "task", origin)}
    learned = [(p["kind"], p.get("objective"), p["source"], p["trained_at"], p.get("seed"), p.get("control"),
                p.get("on_eora")) for p in raw["prompts"] if p["kind"] in LEARNED_KINDS]
    if len(set(learned)) != len(learned):
        _fail(origin, "two prompts share a (kind, objective, source, trained_at, seed, control, on_eora)")
    seen = set()
    for index, cell in enumerate(raw["cells"]):
        if unknown := [f"{k} {cell[k]!r}" for k in ("compression", "prompt", "task") if cell[k] not in known[k]]:
            _fail(origin, f"cells[{index}] names unknown {', '.join(unknown)}")
        key = (cell["compression"], cell["prompt"], cell["task"])
        if key in seen:
            _fail(origin, f"cells[{index}] repeats {' / '.join(key)}")
        seen.add(key)


def load_summary(path: Path) -> dict[str, Any]:
    """Read and validate a ``summary.json``; ``ReportError`` naming ``path`` when missing or malformed."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file ({_EXPECTED})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable JSON, {exc} ({_EXPECTED})") from None
    validate_summary(raw, str(path))
    return raw


class Summary:
    """A validated summary with its cells indexed by (compression spec, prompt id, task)."""

    def __init__(self, raw: dict[str, Any], origin: str = "summary") -> None:
        validate_summary(raw, origin)
        self.raw = raw
        self.compressions: list[dict[str, Any]] = raw["compressions"]
        self.targets: list[dict[str, Any]] = raw["targets"]
        self.prompts: list[dict[str, Any]] = raw["prompts"]
        self.none_prompts = [p for p in self.prompts if p["kind"] == "none"]
        self.learned = [p for p in self.prompts if is_learned(p)]  # artifacts of learned kinds, not controls
        self.controls = [p for p in self.prompts if p.get("control")]
        self._cells = {(c["compression"], c["prompt"], c["task"]): c for c in raw["cells"]}

    def cell(self, compression: str, prompt: str, task: str) -> dict[str, Any] | None:
        """The cell of a prompt applied at a compression level on a task, or None when not in the run."""
        return self._cells.get((compression, prompt, task))

    def sources(self) -> list[str]:
        """Training corpora of the learned prompts and adapters, in order of first appearance."""
        return list(dict.fromkeys(p["source"] for p in self.learned))

    def home_target(self, source: str) -> dict[str, Any]:
        """The target whose domain is ``source``, else the first target."""
        return next((t for t in self.targets if t.get("domain") == source), self.targets[0])

    @property
    def n_cells(self) -> int:
        return len(self._cells)


def is_perplexity(metric: str) -> bool:
    """Whether a metric is a perplexity (2 decimals, log scale in plots)."""
    return "perplexity" in metric or "ppl" in metric


def format_number(value: float, metric: str, signed: bool = False) -> str:
    """``value`` with 2 decimals for perplexities, 3 otherwise; never prints a negative zero."""
    digits = 2 if is_perplexity(metric) else 3
    value = round(value, digits) + 0.0
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_entry(cell: dict[str, Any] | None, target: dict[str, Any], with_delta: bool = False) -> str:
    """``value ± stderr (Δ +x.xx)``: stderr and Δ (value minus dense without prompt) only when known."""
    if cell is None:
        return MISSING
    metric = target["metric"]
    text = format_number(cell["value"], metric)
    if cell.get("stderr") is not None:
        text += f" ± {format_number(cell['stderr'], metric)}"
    if with_delta and cell.get("delta") is not None:
        mark = SIGNIFICANT_MARK if (cell.get("vs_dense") or {}).get("significant") else ""
        text += f" (Δ {format_number(cell['delta'], metric, signed=True)}{mark})"
    return text


SIGNIFICANT_MARK = "*"
SIGNIFICANT_NOTE = ("* marks a difference whose paired 95% CI excludes zero (perplexity: the change of log token "
                    "perplexity over the shared windows; accuracy: per-item differences, McNemar's exact test where "
                    f"fewer than {SMALL_DISCORDANT} items disagree); Δ carries it for the comparison with dense "
                    "without prompt.")


def has_paired_statistics(summary: Summary) -> bool:
    """Whether the summary's cells carry paired comparisons (summaries before them do not)."""
    return any(key in cell for cell in summary.raw["cells"] for key in SUMMARY_OPTIONAL_COMPARISONS["cells"])


def format_bytes(count: int | None) -> str:
    """``0 B``, ``46.1 kB``, ``1.38 MB`` (powers of 1000), ``–`` when unknown."""
    if count is None:
        return MISSING
    if count == 0:
        return "0 B"
    if count < 1e6:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.2f} MB"


def is_learned(prompt: dict[str, Any]) -> bool:
    """A trained artifact of a learned kind (soft prompt, LoRA adapter, ...; not a control)."""
    return prompt["kind"] in LEARNED_KINDS and not prompt.get("control")


def method(prompt: dict[str, Any]) -> str:
    """How a learned prompt was made: ``soft`` / ``lora``, with ``+kd`` for the kd objective and ``eora-r<rank>+``
    before a soft prompt trained on an EoRA adapter (``on_eora``)."""
    objective = prompt.get("objective", "lm")
    on_eora = "" if prompt.get("on_eora") is None else f"eora-r{prompt['on_eora']}+"
    return on_eora + prompt["kind"] + ("" if objective == "lm" else f"+{objective}")


def is_in_domain(prompt: dict[str, Any], target: dict[str, Any]) -> bool:
    """A learned prompt or adapter trained on the target's own domain."""
    return is_learned(prompt) and prompt["source"] == target.get("domain")


UNTRAINED_NOTE = ("(untrained) marks a soft prompt that never beat its initialisation on validation (best at step "
                  "0): its cells measure the initial prompt.")


def is_untrained(prompt: dict[str, Any]) -> bool:
    """A soft prompt flagged as never having beaten its initialisation (unknown in older summaries: False)."""
    return prompt.get("untrained") is True


def prompt_label(prompt: dict[str, Any], target: dict[str, Any] | None = None) -> str:
    """``none``, ``hard:<name>`` (``hard:text<n>`` for a text), ``idp-<rule>:<member>+...`` (its id),
    ``eora:r<rank>@<trained_at>`` or ``<method>:<source>@<trained_at>`` (``soft``,
    ``soft+kd``, ``lora``, ...), + `` (untrained)`` for one that never beat its initialisation and `` (in-domain)``
    for ``target``'s domain."""
    if prompt["kind"] == "none":
        return "none"
    if "members" in prompt:  # an IDP set: its id names the rule and the members
        return prompt["id"]
    if "name" in prompt:  # a hard prompt: its name, or text<n> for text:TEXT (recovery.hard)
        name = prompt["name"]
        return f"{prompt['kind']}:{f'text{len(name) - len(TEXT_FORM)}' if name.startswith(TEXT_FORM) else name}"
    if prompt.get("rank") is not None:  # an EoRA adapter: fitted at its level, no source
        return f"{prompt['kind']}:r{prompt['rank']}@{prompt['trained_at']}"
    if prompt.get("control"):  # the trivial-prefix control has no level
        level = "" if prompt.get("trained_at") is None else f"@{prompt['trained_at']}"
        return f"{prompt['control']}{level}{seed_suffix(prompt)}"
    label = (f"{method(prompt)}:{prompt['source']}@{prompt['trained_at']}{seed_suffix(prompt)}"
             + (" (untrained)" if is_untrained(prompt) else ""))
    return f"{label} (in-domain)" if target is not None and is_in_domain(prompt, target) else label


def seed_suffix(prompt: dict[str, Any]) -> str:
    """``#s<seed>`` for a prompt of a run with several training seeds, else empty."""
    return "" if prompt.get("seed") is None else f"#s{prompt['seed']}"


def direction(target: dict[str, Any]) -> str:
    """``↑`` when higher is better, ``↓`` when lower is."""
    return "↑" if target["higher_is_better"] else "↓"


def compression_columns(compression: dict[str, Any]) -> list[str]:
    """Spec, stored weight MB (1e6 bytes, 1 decimal), ratio to dense (3 decimals), bits per weight (2 decimals)."""
    return [compression["spec"], f"{compression['weight_bytes'] / 1e6:.1f}", f"{compression['ratio_to_dense']:.3f}",
            f"{compression['bits_per_weight']:.2f}"]


COMPRESSION_HEADERS = ["compression", "stored MB", "ratio to dense", "bits/weight"]


@dataclass(frozen=True)
class Table:
    """A titled grid of formatted text: ``label_columns`` left-aligned text columns, then right-aligned values."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    label_columns: int = 1


@dataclass(frozen=True)
class Grid:
    """A matrix of summary cells (None where absent); column ``j`` reports ``targets[j]``; ``key`` names its file."""

    key: str
    title: str
    corner: str
    row_labels: list[str]
    column_labels: list[str]
    targets: list[dict[str, Any]]
    cells: list[list[dict[str, Any] | None]]

    def table(self) -> Table:
        """Entries ``value ± stderr``, ``–`` where absent."""
        rows = [[label, *(format_entry(cell, target) for cell, target in zip(row, self.targets, strict=True))]
                for label, row in zip(self.row_labels, self.cells, strict=True)]
        return Table(self.title, [self.corner, *self.column_labels], rows)


def results_tables(summary: Summary) -> list[Table]:
    """One table per target: a row per compression, a column per prompt evaluated on that target."""
    return [_results_table(summary, target) for target in summary.targets]


def _results_table(summary: Summary, target: dict[str, Any]) -> Table:
    task, specs = target["task"], [c["spec"] for c in summary.compressions]
    prompts = [p for p in summary.prompts if any(summary.cell(spec, p["id"], task) for spec in specs)]
    rows = [[*compression_columns(c), _peak_mib(summary.cell(c["spec"], "none", task)),
             *(format_entry(summary.cell(c["spec"], p["id"], task), target, with_delta=True) for p in prompts)]
            for c in summary.compressions]
    title = f"{task}: {target['metric']} {direction(target)}, value ± stderr (Δ vs dense without prompt)"
    return Table(title, [*COMPRESSION_HEADERS, PEAK_HEADER, *(prompt_label(p, target) for p in prompts)], rows)


PEAK_HEADER = "peak MiB"


def _peak_mib(cell: dict[str, Any] | None) -> str:
    """Measured peak memory of a cell (peak RSS on CPU, CUDA max allocated on GPU) in MiB, ``–`` if unknown."""
    peak = cell.get("peak_memory_bytes") if cell else None
    return f"{peak / 2**20:.0f}" if peak else MISSING


def _target_label(target: dict[str, Any]) -> str:
    return f"{target['task']} ({target['metric']} {direction(target)})"


def _method_prefix(prompt: dict[str, Any]) -> str:
    """``lora:``, ``soft+kd:`` ... before a learned prompt's grid label; nothing for plain soft prompts."""
    return "" if not is_learned(prompt) or method(prompt) == "soft" else f"{method(prompt)}:"


def _source_label(prompt: dict[str, Any]) -> str:
    return _method_prefix(prompt) + prompt.get("source", "none") + seed_suffix(prompt)


def source_target_grids(summary: Summary) -> list[Grid]:
    """Per compression level with soft prompts trained at it: rows none + those prompts' sources, columns targets."""
    grids = []
    for spec in (c["spec"] for c in summary.compressions):
        learned = [p for p in summary.learned if p["trained_at"] == spec]
        if not learned:
            continue
        prompts = [*summary.none_prompts, *learned]
        cells = [[summary.cell(spec, p["id"], t["task"]) for t in summary.targets] for p in prompts]
        grids.append(Grid(f"heatmap-sources-at-{spec}", f"Soft prompts trained and applied at {spec}: source × target",
                          "prompt source", [_source_label(p) for p in prompts],
                          [_target_label(t) for t in summary.targets], summary.targets, cells))
    return grids


def level_grids(summary: Summary) -> list[Grid]:
    """Per soft prompt source: rows none + levels trained at, columns levels applied at, on its home target."""
    grids = []
    specs = [c["spec"] for c in summary.compressions]
    for source in summary.sources():
        target = summary.home_target(source)
        prompts = [*summary.none_prompts, *(p for p in summary.learned if p["source"] == source)]
        cells = [[summary.cell(spec, p["id"], target["task"]) for spec in specs] for p in prompts]
        title = f"{source} soft prompts on {_target_label(target)}: trained at (rows) × applied at (columns)"
        rows = [_method_prefix(p) + p.get("trained_at", "none") + seed_suffix(p) for p in prompts]
        grids.append(Grid(f"heatmap-levels-{source}", title, "trained at", rows, specs, [target] * len(specs), cells))
    return grids


def prompts_table(summary: Summary) -> Table:
    """Each prompt with its length and, for soft prompts, corpus, level, training time (s) and validation ppl."""
    def field(prompt: dict[str, Any], key: str, spec: str = "") -> str:
        return MISSING if prompt.get(key) is None else format(prompt[key], spec)

    def kind(prompt: dict[str, Any]) -> str:
        return f"{prompt['control']} control" if prompt.get("control") else method(prompt) if is_learned(
            prompt) else prompt["kind"]

    rows = [[prompt_label(p), kind(p), field(p, "source"), field(p, "trained_at"), field(p, "n_tokens"),
             field(p, "train_seconds", ".1f"), field(p, "best_val_ppl", ".2f")] for p in summary.prompts]
    headers = ["prompt", "kind", "trained on", "trained at", "tokens", "train seconds", "best validation ppl"]
    return Table("Prompts: kind, training corpus and level, length, training cost", headers, rows, label_columns=4)


def _tabulate(table: Table, tablefmt: str) -> str:
    align = ("left",) * table.label_columns + ("right",) * (len(table.headers) - table.label_columns)
    return tabulate(table.rows, headers=table.headers, tablefmt=tablefmt, disable_numparse=True, colalign=align)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured markdown table (no title)."""
    return _tabulate(table, "github")


def to_html(table: Table) -> str:
    """An HTML ``<table>`` (cell text escaped; no title)."""
    return _tabulate(table, "html")


def latex_text(text: str) -> str:
    """``text`` escaped for LaTeX body text, with ± Δ – × ↑ ↓ as LaTeX commands."""
    return latex_unicode("".join(LATEX_ESCAPE_RULES.get(char, char) for char in text))


def latex_unicode(latex: str) -> str:
    """Replace the few non-ASCII characters the report uses by LaTeX commands (after tabulate escaped the rest)."""
    for char, command in _LATEX_UNICODE.items():
        latex = latex.replace(char, command)
    return latex


def to_latex(table: Table) -> str:
    """A ``table`` float: caption, then the booktabs tabular shrunk to the line width when wider."""
    tabular = latex_unicode(_tabulate(table, "latex_booktabs"))
    return "\n".join([r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_text(table.title)}}}",
                      r"\begin{adjustbox}{max width=\linewidth}", tabular, r"\end{adjustbox}", r"\end{table}"])


def html_page(title: str, body: list[str]) -> str:
    """A standalone UTF-8 HTML page around ``body`` (already HTML)."""
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}" \
            "th,td{border:1px solid #bbb;padding:2px 8px}img{max-width:100%}"
    head = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>", f"<style>{style}</style>", "</head>", "<body>"]
    return "\n".join([*head, *body, "</body>", "</html>"]) + "\n"
