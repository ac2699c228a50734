"""The leaderboard as one self-contained HTML page: inline CSS, inline JavaScript, inline SVG, no network.

Per column (task, metric, protocol): a Pareto view (quality against stored MB, one marker per row, better drawn
upwards, the frontier as a staircase) beside the ranked table. Then the recovery-per-added-byte view
(``recovery_board``): per (column, model, level), its methods' table beside quality against added bytes (log scale,
with 0 B as a tick of its own left of it). Headers sort a table (numbers by value, missing last); the selects at the
top filter every table and plot by model, compression family, prompt kind and run, and each frontier is redrawn over
the markers still shown. The runs table at the bottom says where each row came from.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

from matplotlib.ticker import LogLocator, MaxNLocator

from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.report.leaderboard import (
    ROW_HEADERS,
    RUNS_TITLE,
    TITLE,
    Board,
    Column,
    Row,
    board_note,
    provenance_fields,
    row_fields,
)
from cpt_bench.report.recovery_board import HEADERS as RECOVERY_HEADERS
from cpt_bench.report.recovery_board import NOTE as RECOVERY_NOTE
from cpt_bench.report.recovery_board import TITLE as RECOVERY_TITLE
from cpt_bench.report.recovery_board import Group, MethodRow, method_fields, recovery_groups
from cpt_bench.report.tables import is_perplexity

FILTERS = (("model", "model"), ("family", "compression family"), ("kind", "prompt kind"), ("run", "run"))
KIND_COLOURS = {name: kind.colour for name, kind in RECOVERY_KINDS.items()}
# A plot holding rows of several models draws the first model's (by name) markers filled, the second's as rings,
# the rest as dashed rings (the colour stays the prompt kind's); a second legend line names them.
MODEL_MARKERS = ("", " ring", " ring dashed")
_WIDTH, _PLOT_HEIGHT = 460, 246  # px; the legend's lines above the plot add to the height
_LEFT, _RIGHT, _BOTTOM = 62, 16, 46
_LEGEND_LINE, _LEGEND_PAD = 16, 10  # px per legend line; margin above the first and below the last
_NUMERIC = {"rank", "value ± stderr", "Δ vs dense", "gap closed", "gap closed vs trivial", "stored MB",
            "ratio to dense", "resident MiB", "peak MiB", "added bytes", "prompt tokens", "gap closed per added MB"}
_ZERO_SLOT, _LOG_START = 14, 60  # log-x plots: px from the plot's left edge to the 0 B tick and to the log axis

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em 2em;color:#222;background:#fafafa}
h1{margin:0 0 .3em}h2{font-size:1.1em;margin:1.6em 0 .2em}p.note{max-width:70em;font-size:.9em;color:#444}
p.protocol{margin:.1em 0 .6em;font-size:.9em;color:#444}
.filters{position:sticky;top:0;z-index:2;background:#eef2f7;border:1px solid #ccd;padding:.5em .8em;border-radius:6px;
 display:flex;gap:1.2em;flex-wrap:wrap;align-items:center}
.filters label{font-size:.9em}.filters select{margin-left:.3em}
.column{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap}
table{border-collapse:collapse;background:#fff;font-size:.85em}
th,td{border:1px solid #ccc;padding:2px 7px;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#e4e8ee;cursor:pointer;user-select:none;position:relative;padding-right:16px}
thead th[aria-sort=ascending]::after{content:"▲";position:absolute;right:3px;font-size:.7em}
thead th[aria-sort=descending]::after{content:"▼";position:absolute;right:3px;font-size:.7em}
tbody tr:nth-child(even){background:#f6f7f9}tbody tr:hover{background:#fff3c4}
tr.pareto td:last-child{color:#b8860b;font-weight:bold}
svg.pareto,svg.recovery{background:#fff;border:1px solid #ccc;flex:none}
h3{font-size:1em;margin:1.3em 0 .2em}svg text{font-size:11px;fill:#333}
svg .grid{stroke:#e6e6e6}svg .axis{stroke:#666}svg .break{stroke:#aaa;stroke-dasharray:4 3}
svg .frontier{fill:none;stroke:#b8860b;stroke-width:2}
svg circle.point{stroke:#fff;stroke-width:1;opacity:.85}svg circle.ring{fill:#fff;stroke-width:2}
svg circle.dashed{stroke-dasharray:3 2}span.shown{font-size:.85em;color:#666}
table.runs td{white-space:normal;max-width:40em}
"""

_SCRIPT = """
(function () {
  const selects = Array.from(document.querySelectorAll("select.filter"));
  const matches = (el) => selects.every((s) => s.value === "" || el.dataset[s.dataset.key] === s.value);
  function frontier(svg) {
    const points = [];
    svg.querySelectorAll("circle.point").forEach((c) => {
      const shown = matches(c);
      c.style.display = shown ? "" : "none";
      if (shown) points.push([+c.getAttribute("cx"), +c.getAttribute("cy")]);
    });
    points.sort((a, b) => a[0] - b[0] || a[1] - b[1]);  // smaller first; on screen up is better
    const front = [];
    for (const p of points) if (!front.length || p[1] < front[front.length - 1][1]) front.push(p);
    const path = [];
    front.forEach((p, i) => { if (i) path.push([p[0], front[i - 1][1]]); path.push(p); });
    svg.querySelector("polyline.frontier").setAttribute("points", path.map((p) => p.join(",")).join(" "));
  }
  function apply() {
    document.querySelectorAll("section.board, section.recovery").forEach((section) => {
      const rows = Array.from(section.querySelectorAll("tbody tr"));
      rows.forEach((tr) => { tr.hidden = !matches(tr); });
      const shown = rows.filter((tr) => !tr.hidden).length;
      section.querySelector("span.shown").textContent = shown + " of " + rows.length + " rows shown";
      const svg = section.querySelector("svg.pareto, svg.recovery");
      if (svg) frontier(svg);  // a level none of whose methods records its bytes has no plot
    });
  }
  function sortBy(th) {
    const table = th.closest("table"), index = Array.from(th.parentNode.children).indexOf(th);
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("thead th").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = (tr) => tr.children[index].dataset.sort;
    const numeric = th.dataset.type === "number", body = table.tBodies[0];
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (numeric) {
        if (x === "" || y === "") return (x === "") - (y === "");  // missing values last either way
        return ascending ? x - y : y - x;
      }
      return ascending ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach((tr) => body.appendChild(tr));
  }
  selects.forEach((s) => s.addEventListener("change", apply));
  document.querySelectorAll("table.board thead th").forEach((th) => th.addEventListener("click", () => sortBy(th)));
  apply();
})();
"""


def _attributes(values: dict[str, str]) -> str:
    return "".join(f' {name}="{html.escape(value)}"' for name, value in values.items())


def _data(row: Row) -> dict[str, str]:
    """The ``data-*`` attributes the filters read."""
    return {"data-model": row.run.model, "data-family": row.family, "data-kind": row.prompt["kind"],
            "data-run": row.run.name}


def _number(value: float | None) -> str:
    """A numeric sort key ('' when missing)."""
    return "" if value is None else repr(float(value))


def _sort_keys(column: Column, row: Row, rank: int) -> dict[str, str]:
    """Machine-readable sort key of each numeric header ('' when missing)."""
    return {"rank": str(rank), "value ± stderr": _number(row.cell["value"]),
            "Δ vs dense": _number(row.cell.get("delta")),
            "gap closed": _number(row.gap_closed if row.gap_resolved else None),
            "gap closed vs trivial": _number(row.gap_closed_vs_trivial if row.trivial_gap_resolved else None),
            "stored MB": _number(row.stored_mb),
            "ratio to dense": _number(row.compression["ratio_to_dense"]), "resident MiB": _number(row.resident_mib),
            "peak MiB": _number(row.peak_mib)}


def _row_html(column: Column, row: Row, rank: int) -> str:
    fields = {"rank": str(rank), **row_fields(column, row)}
    keys = _sort_keys(column, row, rank)
    cells = []
    for header, text in fields.items():
        content = html.escape(text)
        if header == "run":
            link = row.run.report_link()
            content = f'<a href="{html.escape(link)}">{content}</a>' if link else content
            content += f' <a href="#run-{html.escape(row.run.folder.name)}" title="where this run came from">(i)</a>'
        attributes = {"class": "num", "data-sort": keys[header]} if header in _NUMERIC else {"data-sort": text}
        cells.append(f"<td{_attributes(attributes)}>{content}</td>")
    classes = {"class": "pareto"} if row.pareto else {}
    return f"<tr{_attributes({**_data(row), **classes})}>{''.join(cells)}</tr>"


class _Axes:
    """Data to SVG coordinates: x linear (stored MB), or (``log_x``, added bytes) log10 with 0 at a tick of its own
    left of the log axis; y the metric (log for perplexities) with better upwards."""

    def __init__(self, column: Column, xs: list[float], values: list[float], top: float, log_x: bool = False) -> None:
        self.top = top  # px from the SVG's top edge to the plot's
        self.log = is_perplexity(column.metric) and all(value > 0 for value in values)
        self.log_x = log_x
        ys = [self._y(value) for value in values]
        self.x_range = _decades([x for x in xs if x > 0]) if log_x else _padded(min(xs), max(xs))
        self.y_range = _padded(min(ys), max(ys))
        self.up = column.higher_is_better

    def _y(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def px(self, x: float) -> float:
        low, high = self.x_range
        width = _WIDTH - _LEFT - _RIGHT
        if not self.log_x:
            return _LEFT + (x - low) / (high - low) * width
        if x <= 0:
            return _LEFT + _ZERO_SLOT
        return _LEFT + _LOG_START + (math.log10(x) - low) / (high - low) * (width - _LOG_START)

    def py(self, value: float) -> float:
        low, high = self.y_range
        share = (self._y(value) - low) / (high - low)
        share = share if self.up else 1.0 - share
        return self.top + _PLOT_HEIGHT - share * _PLOT_HEIGHT

    def x_ticks(self) -> list[float]:
        low, high = self.x_range
        if self.log_x:
            return [0.0, *(10.0**k for k in range(math.ceil(low), math.floor(high) + 1))]
        return [t for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]

    def x_label(self, tick: float) -> str:
        return _bytes_tick(tick) if self.log_x else f"{tick:g}"

    def y_ticks(self) -> list[float]:
        low, high = self.y_range
        if self.log:
            ticks = LogLocator(base=10, subs=(1.0, 2.0, 5.0)).tick_values(10**low, 10**high)
            ticks = [t for t in ticks if low <= math.log10(t) <= high]
            if len(ticks) >= 3:
                return ticks
            low, high = 10**low, 10**high  # a narrow log range: evenly spaced values read better
            return [t for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]
        return [t for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]


def _decades(xs: list[float]) -> tuple[float, float]:
    """The log10 range of positive ``xs``: whole decades, with at least a quarter decade of margin on either side
    (1 kB to 1 MB without any)."""
    if not xs:
        return 3.0, 6.0
    return math.floor(math.log10(min(xs)) - 0.25), math.ceil(math.log10(max(xs)) + 0.25)


def _bytes_tick(count: float) -> str:
    """A tick label in bytes: ``0 B``, ``100 B``, ``10 kB``, ``1 MB``, ``1 GB`` (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:g} {unit}"
    return f"{count:g} B"


def _padded(low: float, high: float) -> tuple[float, float]:
    """The range with 6% margins (1 unit around a single value)."""
    margin = (high - low) * 0.06 if high > low else 1.0
    return low - margin, high + margin


def _svg_text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(text)}</text>'


def _frontier_points(front_points: list[tuple[float, float]]) -> str:
    """The staircase through the frontier's (x, y) px points, by increasing x (the page's script redraws it on
    filter)."""
    front = sorted(set(front_points))
    path: list[tuple[float, float]] = []
    for index, point in enumerate(front):
        if index:
            path.append((point[0], front[index - 1][1]))
        path.append(point)
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in path)


def _model_markers(rows: list[Row]) -> dict[str, str]:
    """The marker classes of each model in ``rows`` (``MODEL_MARKERS`` by model name, so sorting and ranking never
    swap them); empty when the rows are of one model (all filled, no model legend)."""
    models = sorted({row.run.model for row in rows})
    if len(models) < 2:
        return {}
    return {model: MODEL_MARKERS[min(index, len(MODEL_MARKERS) - 1)] for index, model in enumerate(models)}


def _marker(kind: str, x: float, y: float, radius: float, colour: str, marker: str, extra: str = "") -> str:
    """An open ``<circle`` tag of class ``kind`` (``point``: a row's marker, ``legend``): filled with ``colour``, or
    (``marker`` " ring...") a ring drawn in it."""
    style = f' style="stroke:{colour}"' if marker else ""
    return f'<circle class="{kind}{marker}" cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}"{style}{extra}'


@dataclass(frozen=True)
class _Point:
    """One marker of a plot: its x (data units), the row it shows, whether it is on the frontier, its hover text."""

    x: float
    row: Row
    frontier: bool
    title: str


def _plot(column: Column, points: list[_Point], svg_class: str, x_title: str, log_x: bool = False) -> str:
    """Quality against ``x`` of ``points``, better upwards, frontier drawn as a staircase; markers coloured by prompt
    kind and, where the points hold several models, filled or ringed by model."""
    rows = [point.row for point in points]
    markers = _model_markers(rows)
    legend = _legend_lines(rows, markers)
    top = 2 * _LEGEND_PAD + _LEGEND_LINE * len(legend)
    height = top + _PLOT_HEIGHT + _BOTTOM
    axes = _Axes(column, [point.x for point in points], [row.cell["value"] for row in rows], top, log_x)
    right, bottom = _WIDTH - _RIGHT, top + _PLOT_HEIGHT
    parts = [f'<svg class="{svg_class}" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
             f'viewBox="0 0 {_WIDTH} {height}" role="img" '
             f'aria-label="{html.escape(column.title())} against {html.escape(x_title)}">']
    for tick in axes.x_ticks():
        x = axes.px(tick)
        parts += [f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}"/>',
                  _svg_text(x, bottom + 14, axes.x_label(tick))]
    if log_x:  # the 0 B tick stands apart from the log axis
        x = _LEFT + (_ZERO_SLOT + _LOG_START) / 2
        parts.append(f'<line class="axis break" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}"/>')
    for tick in axes.y_ticks():
        y = axes.py(tick)
        parts += [f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>',
                  _svg_text(_LEFT - 5, y + 4, f"{tick:g}", "end")]
    better = "higher" if column.higher_is_better else "lower"
    scale = ", log scale" if axes.log else ""
    front = [(axes.px(point.x), axes.py(point.row.cell["value"])) for point in points if point.frontier]
    parts += [f'<rect class="axis" x="{_LEFT}" y="{top}" width="{right - _LEFT}" height="{_PLOT_HEIGHT}" '
              'fill="none"/>',
              _svg_text((_LEFT + right) / 2, height - 10, x_title),
              _svg_text(14, (top + bottom) / 2, f"{column.metric} ({better} is better, up{scale})", "middle",
                        f' transform="rotate(-90 14 {(top + bottom) / 2:.1f})"'),
              f'<polyline class="frontier" points="{_frontier_points(front)}"/>']
    for point in points:
        row = point.row
        circle = _marker("point", axes.px(point.x), axes.py(row.cell["value"]), 5,
                         KIND_COLOURS[row.prompt["kind"]], markers.get(row.run.model, ""), _attributes(_data(row)))
        parts.append(f"{circle}><title>{html.escape(point.title)}</title></circle>")
    for index, line in enumerate(legend):
        parts += _legend_line(line, _LEGEND_PAD + _LEGEND_LINE * index + 6)
    return "".join([*parts, "</svg>"])


def _row_title(column: Column, row: Row) -> str:
    fields = row_fields(column, row)
    return (f"{row.run.name} · {row.run.model} · {row.compression['spec']} · {fields['prompt']}: "
            f"{fields['value ± stderr']}")


def pareto_svg(column: Column, rows: list[Row]) -> str:
    """Quality against stored MB of one column's rows, better upwards, the Pareto frontier drawn."""
    points = [_Point(row.stored_mb, row, row.pareto, f"{_row_title(column, row)} at {row.stored_mb:.1f} MB")
              for row in rows]
    return _plot(column, points, "pareto", "stored weight MB (smaller is better)")


NO_BYTES = "No method of this level records its added bytes: nothing to plot."


def recovery_svg(group: Group) -> str:
    """Quality against added bytes of one group's methods whose bytes are known (log x, 0 B apart), better upwards,
    the frontier drawn; a line saying so (``NO_BYTES``) when none is known."""
    points = [_Point(float(method.added_bytes), method.row, method.frontier,
                     f"{_row_title(group.column, method.row)} with {method_fields(group.column, method)['added bytes']}"
                     " added") for method in group.rows if method.added_bytes is not None]
    if not points:
        return f'<p class="protocol">{html.escape(NO_BYTES)}</p>'
    return _plot(group.column, points, "recovery", "bytes added to the compressed model (log; smaller is better)",
                 log_x=True)


_LegendEntry = tuple[str, str, str]  # (label, colour, marker class: "", " ring...", or "frontier" for the line)


def _legend_lines(rows: list[Row], markers: dict[str, str]) -> list[list[_LegendEntry]]:
    """The legend's entries, flowed into lines that fit the plot's width: the colours of the prompt kinds the rows
    hold (registry order), then on a new line the frontier and, when given, each model's marker."""
    kinds = {row.prompt["kind"] for row in rows}
    colours = [(RECOVERY_KINDS[kind].label, colour, "") for kind, colour in KIND_COLOURS.items() if kind in kinds]
    others = [("Pareto frontier", "", "frontier"),
              *((model, KIND_COLOURS["none"], marker) for model, marker in markers.items())]
    return _flowed(colours) + _flowed(others)


def _entry_width(entry: _LegendEntry) -> float:
    """Estimated px of one entry: its marker and gap, and ~6.5 px per character of the 11 px label."""
    return (24 if entry[2] == "frontier" else 14) + 6.5 * len(entry[0]) + 14


def _flowed(entries: list[_LegendEntry]) -> list[list[_LegendEntry]]:
    lines: list[list[_LegendEntry]] = []
    width = 0.0
    for entry in entries:
        if not lines or width + _entry_width(entry) > _WIDTH - _LEFT - _RIGHT:
            lines.append([])
            width = 0.0
        lines[-1].append(entry)
        width += _entry_width(entry)
    return lines


def _legend_line(line: list[_LegendEntry], y: float) -> list[str]:
    parts, x = [], _LEFT + 6.0
    for label, colour, marker in line:
        if marker == "frontier":
            parts += [f'<line class="frontier" x1="{x:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}"/>',
                      _svg_text(x + 22, y + 4, label, "start")]
        else:
            parts += [_marker("legend", x + 4, y, 4, colour, marker) + "/>", _svg_text(x + 12, y + 4, label, "start")]
        x += _entry_width((label, colour, marker))
    return parts


def _table(headers: list[str], rows: list[str], classes: str) -> str:
    head = "".join(f'<th data-type="{"number" if h in _NUMERIC else "text"}">{html.escape(h)}</th>' for h in headers)
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _section(index: int, column: Column, rows: list[Row]) -> str:
    table = _table(ROW_HEADERS, [_row_html(column, row, rank) for rank, row in enumerate(rows, start=1)], "board")
    return (f'<section class="board" id="column-{index}"><h2>{html.escape(column.title())}</h2>'
            f'<p class="protocol">protocol: {html.escape(column.protocol.label())} · <span class="shown"></span></p>'
            f'<div class="column">{pareto_svg(column, rows)}{table}</div></section>')


def _method_html(group: Group, method: MethodRow, rank: int) -> str:
    """A method's table row: its text, numeric sort keys, and the row's filter attributes."""
    fields = {"rank": str(rank), **method_fields(group.column, method)}
    row = method.row
    tokens = fields["prompt tokens"]
    keys = {"rank": str(rank), "value ± stderr": _number(row.cell["value"]),
            "gap closed": _number(row.gap_closed if row.gap_resolved else None),
            "gap closed vs trivial": _number(row.gap_closed_vs_trivial if row.trivial_gap_resolved else None),
            "added bytes": _number(method.added_bytes), "prompt tokens": "" if not tokens.isdigit() else tokens,
            "gap closed per added MB": _number(method.gap_per_added_mb)}
    cells = [f"<td{_attributes({'class': 'num', 'data-sort': keys[h]} if h in _NUMERIC else {'data-sort': text})}>"
             f"{html.escape(text)}</td>" for h, text in fields.items()]
    classes = {"class": "pareto"} if method.frontier else {}
    return f"<tr{_attributes({**_data(row), **classes})}>{''.join(cells)}</tr>"


def _recovery_section(index: int, group: Group) -> str:
    rows = [_method_html(group, method, rank) for rank, method in enumerate(group.rows, start=1)]
    title = f"{group.column.title()} · {group.model} at {group.spec}"
    return (f'<section class="recovery" id="recovery-{index}"><h3>{html.escape(title)}</h3>'
            f'<p class="protocol">protocol: {html.escape(group.column.protocol.label())} · '
            f'<span class="shown"></span></p>'
            f'<div class="column">{recovery_svg(group)}{_table(RECOVERY_HEADERS, rows, "board recovery")}</div>'
            "</section>")


def _recovery(board: Board) -> str:
    """The recovery-per-added-byte view: its heading, note and a section per group ('' without groups)."""
    groups = recovery_groups(board)
    if not groups:
        return ""
    note = html.escape(RECOVERY_NOTE)
    return (f'<h2 id="recovery">{html.escape(RECOVERY_TITLE)}</h2><p class="note">{note}</p>'
            + "".join(_recovery_section(index, group) for index, group in enumerate(groups)))


def _filters(board: Board) -> str:
    values: dict[str, list[str]] = {key: [] for key, _ in FILTERS}
    for _, rows in board.columns:
        for row in rows:
            for key, _ in FILTERS:
                value = _data(row)[f"data-{key}"]
                if value not in values[key]:
                    values[key].append(value)
    parts = []
    for key, label in FILTERS:
        options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values[key])
        parts.append(f'<label>{html.escape(label)}<select class="filter" data-key="{key}" name="{key}">'
                     f'<option value="">all</option>{options}</select></label>')
    return f'<div class="filters"><strong>Filter</strong>{"".join(parts)}</div>'


def _runs(board: Board) -> str:
    rows = []
    for run in board.runs:
        fields = provenance_fields(run)
        cells = "".join(f"<td>{html.escape(text)}</td>" for text in fields.values())
        rows.append(f'<tr id="run-{html.escape(run.folder.name)}">{cells}</tr>')
    headers = "".join(f"<th>{html.escape(h)}</th>" for h in provenance_fields(board.runs[0]))
    return (f"<h2>{html.escape(RUNS_TITLE)}</h2><table class=\"runs\"><thead><tr>{headers}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def page(board: Board) -> str:
    """The whole page; every resource inline, so it works opened from disk without a network."""
    note = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(board_note(board)))
    recovery = _recovery(board)
    view = (f' <a href="#recovery">{html.escape(RECOVERY_TITLE)}</a>, after the columns, ranks each level\'s recovery '
            "methods by quality at the bytes they add." if recovery else "")
    body = [f"<h1>{html.escape(TITLE)}</h1>", f'<p class="note">{note} Click a header to sort; hover a marker for '
            f"its row.{view}</p>", _filters(board),
            *(_section(index, column, rows) for index, (column, rows) in enumerate(board.columns)), recovery,
            _runs(board)]
    head = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(TITLE)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>"]
    return "\n".join([*head, *body, f"<script>{_SCRIPT}</script>", "</body>", "</html>"]) + "\n"

