"""The leaderboard's recovery-per-added-byte view: which recovery method gives the most quality per byte it adds.

For every leaderboard column (task, metric, protocol), model and compression level whose rows hold at least two
recovery methods (prompt kinds, ``none`` included), the methods ranked by quality (best first, then fewer added
bytes), each with the bytes it stores on top of the compressed model (``RecoveryKind.added_bytes``: 0 for no prompt
and for a hard prompt, whose text stores no weights but whose tokens cost key/value cache per sequence; the prompt's
or adapter's tensors as saved for soft prompts, LoRA and EoRA), its gap closed, gap closed per added MB, and whether
it lies on the frontier of quality against added bytes (``leaderboard.pareto_flags``: no other method of the group
is at most as large and at least as good, and strictly one of the two). Untrained controls (trivial prefix, random
and init prompts) are the baselines of gap closed, not methods, and are left out. ``board_page`` draws the plots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.report.leaderboard import Board, Column, Row, format_gap, pareto_flags, row_fields
from cpt_bench.report.tables import MISSING, Table, format_bytes, to_markdown

TITLE = "Recovery per added byte"
NOTE = ("Per (task, metric, protocol), model and compression level with at least two recovery methods: the methods "
        "ranked by quality (best first, then fewer added bytes). Added bytes are what a method stores on top of the "
        "compressed model's weights: 0 for no prompt and for a hard prompt (text: no weights, but its prompt tokens "
        "cost key/value cache on every sequence served), the prompt's embeddings for a soft prompt (n_virtual_tokens "
        "x hidden x 4 bytes, float32), the adapter's tensors as saved for LoRA (float32) and EoRA (float16); – where "
        "the run did not record them (such rows are left off the frontier). Gap closed per added MB is gap closed / "
        "(added bytes / 1e6), – at 0 added bytes or where the gap is undefined or within noise. Frontier (★) marks "
        "the methods no other method of the table beats on both quality and added bytes. Untrained controls (trivial "
        "prefix, random and init prompts) are baselines, not methods, and are left out.")


@dataclass(frozen=True)
class MethodRow:
    """A recovery method at one level on one column: its leaderboard row and the bytes it adds (None: unknown)."""

    row: Row
    added_bytes: int | None
    frontier: bool = False

    @property
    def gap_per_added_mb(self) -> float | None:
        """Gap closed (a share, 1.0 = all of the compression loss) per 1e6 added bytes; None at 0 bytes, unknown
        bytes, or an undefined or unresolved gap."""
        gap = self.row.gap_closed
        if gap is None or not self.row.gap_resolved or not self.added_bytes:
            return None
        return gap / (self.added_bytes / 1e6)


@dataclass(frozen=True)
class Group:
    """One (column, model, compression level): its methods ranked best first."""

    column: Column
    model: str
    spec: str
    rows: list[MethodRow]

    def title(self) -> str:
        return f"{self.column.title()}; {self.model} at {self.spec}; protocol: {self.column.protocol.label()}"


def added_bytes(row: Row) -> int | None:
    """Bytes the row's recovery method stores on top of the compressed model (``RecoveryKind.added_bytes``)."""
    return RECOVERY_KINDS[row.prompt["kind"]].added_bytes(row.prompt)


def _is_method(row: Row) -> bool:
    return not row.prompt.get("control")


def _ranked(column: Column, rows: list[Row]) -> list[MethodRow]:
    """The rows as methods, frontier flagged over those whose bytes are known, best first (then fewer bytes)."""
    sign = -1.0 if column.higher_is_better else 1.0
    methods = [MethodRow(row, added_bytes(row)) for row in rows]
    known = [method for method in methods if method.added_bytes is not None]
    flags = pareto_flags([(float(m.added_bytes), sign * m.row.cell["value"]) for m in known])  # type: ignore[arg-type]
    on_front = {id(method) for method, flag in zip(known, flags, strict=True) if flag}
    methods = [dataclasses.replace(method, frontier=id(method) in on_front) for method in methods]
    unknown = float("inf")
    return sorted(methods, key=lambda m: (sign * m.row.cell["value"],
                                          unknown if m.added_bytes is None else m.added_bytes))


def recovery_groups(board: Board) -> list[Group]:
    """Every (column, model, compressed level) of ``board`` whose rows hold at least two recovery methods, in
    board order: columns, then models by first appearance, then levels in the order their run lists them."""
    groups = []
    for column, rows in board.columns:
        by_level: dict[tuple[str, str], list[Row]] = {}
        order: dict[tuple[str, str], tuple[int, int]] = {}
        models = list(dict.fromkeys(row.run.model for row in rows))
        for row in rows:
            key = (row.run.model, row.compression["spec"])
            if key[1] != "dense" and _is_method(row):
                by_level.setdefault(key, []).append(row)
                specs = [compression["spec"] for compression in row.run.summary.compressions]
                order.setdefault(key, (models.index(key[0]), specs.index(key[1])))
        for (model, spec), level_rows in sorted(by_level.items(), key=lambda item: order[item[0]]):
            if len({row.prompt["kind"] for row in level_rows}) >= 2:
                groups.append(Group(column, model, spec, _ranked(column, level_rows)))
    return groups


def format_per_mb(share: float | None) -> str:
    """Gap closed per added MB as percentage points per MB (``–`` when undefined)."""
    return MISSING if share is None else f"{100 * share:.1f}%/MB"


def method_label(prompt: dict[str, Any]) -> str:
    """A method's name from its summary entry ``prompt``: its kind's label (``soft prompt``, ``EoRA adapter``, ...),
    ``EoRA + soft prompt`` for a prompt trained on, and scored with, an EoRA adapter (``on_eora``)."""
    label = RECOVERY_KINDS[prompt["kind"]].label
    return label if prompt.get("on_eora") is None else f"EoRA + {label}"


def method_fields(column: Column, method: MethodRow) -> dict[str, str]:
    """The displayed text of a method's row, by header (the HTML page adds sort keys)."""
    row = method.row
    fields = row_fields(column, row)
    tokens = row.prompt.get("n_tokens") if RECOVERY_KINDS[row.prompt["kind"]].prefix else 0
    return {"run": fields["run"], "method": method_label(row.prompt), "prompt": fields["prompt"],
            "value ± stderr": fields["value ± stderr"], "gap closed": fields["gap closed"],
            "gap closed vs trivial": format_gap(row.gap_closed_vs_trivial, row.trivial_gap_resolved),
            "added bytes": format_bytes(method.added_bytes),
            "prompt tokens": MISSING if tokens is None else str(tokens),
            "gap closed per added MB": format_per_mb(method.gap_per_added_mb),
            "frontier": "★" if method.frontier else ""}


HEADERS = ["rank", "run", "method", "prompt", "value ± stderr", "gap closed", "gap closed vs trivial", "added bytes",
           "prompt tokens", "gap closed per added MB", "frontier"]


def group_table(group: Group) -> Table:
    """The ranked table of one group."""
    body = [[str(rank), *method_fields(group.column, method).values()]
            for rank, method in enumerate(group.rows, start=1)]
    return Table(group.title(), HEADERS, body, label_columns=4)


def recovery_markdown(groups: list[Group]) -> str:
    """The view as a markdown section (a heading, the note, a table per group); empty without groups."""
    if not groups:
        return ""
    lines = [f"## {TITLE}", "", NOTE, ""]
    for group in groups:
        table = group_table(group)
        lines += [f"### {table.title}", "", to_markdown(table), ""]
    return "\n".join(lines)
