"""What a compression is: the spec grammar (shared by the CLI, configs, lm-eval ``model_args`` and results), the
calibration settings the algorithms read, and the result they return.

Grammar (canonical text, ``str(Spec.parse(text)) == text``)::

    dense
    <quant>                      quant  := (rtn|gptq)-w<bits>[g<group>][-sym][-actorder]
    <prune>                      prune  := (sparsegpt|magnitude|wanda)-(<percent>|<n>:<m>)
    sparsegpt-<...>+gptq-<...>   joint: prune and quantize in one pass (no -actorder)

``bits`` is one of 2, 3, 4, 8; ``group`` one of 32, 64, 128 input columns (omitted: one grid per output
channel); quantization is asymmetric unless ``-sym``; ``-actorder`` (GPTQ only) visits columns by
decreasing Hessian diagonal. ``percent`` is unstructured sparsity, an integer from 0 to 90; ``n:m`` keeps
``n`` weights in every ``m`` consecutive input columns of a row (2:4 or 4:8).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from cpt_bench.compress.quant import CompressedLinear
from cpt_bench.corpus import parse_corpus
from cpt_bench.errors import UserError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
NM_PATTERNS = ((2, 4), (4, 8))
MAX_SPARSITY = 90
QUANT_METHODS = ("rtn", "gptq")
PRUNE_METHODS = ("sparsegpt", "magnitude", "wanda")

_BITS_TEXT = "|".join(map(str, BITS))
_GROUPS_TEXT = "|".join(map(str, GROUP_SIZES))
_PRUNE_TEXT = f"0..{MAX_SPARSITY}|" + "|".join(f"{n}:{m}" for n, m in NM_PATTERNS)
GRAMMAR = (
    f"dense | (rtn|gptq)-w<{_BITS_TEXT}>[g<{_GROUPS_TEXT}>][-sym][-actorder] | "
    f"(sparsegpt|magnitude|wanda)-<{_PRUNE_TEXT}> | sparsegpt-<{_PRUNE_TEXT}>+gptq-w<bits>[g<group>][-sym] "
    "(no g: per channel; -actorder: gptq only)"
)

_QUANT_RE = re.compile(r"(rtn|gptq)-w([1-9]\d*)(?:g([1-9]\d*))?(-sym)?(-actorder)?")
_PRUNE_RE = re.compile(r"(sparsegpt|magnitude|wanda)-(?:(0|[1-9]\d*)|([1-9]\d*):([1-9]\d*))")


class SpecError(UserError):
    """An unknown, out-of-range or unfitting compression spec or calibration setting; the message is one line."""


@dataclass(frozen=True)
class Quantization:
    """Uniform min-max weight quantization.

    Attributes:
        method: ``"rtn"`` (round to nearest) or ``"gptq"``.
        bits: bits per code, one of ``BITS``.
        group_size: input columns sharing one (scale, zero) grid per output row; ``None`` = whole row.
        symmetric: zero point fixed at the middle code instead of fitted to the range.
        act_order: GPTQ only: quantize columns in order of decreasing Hessian diagonal.
    """

    method: str
    bits: int
    group_size: int | None = None
    symmetric: bool = False
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise SpecError(f"quantization method {self.method!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.bits not in BITS:
            raise SpecError(f"bits {self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise SpecError(
                f"group size {self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))} "
                "(or none for per channel)"
            )
        if self.act_order and self.method != "gptq":
            raise SpecError(f"-actorder applies to gptq only, not {self.method}")

    def __str__(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        return (
            f"{self.method}-w{self.bits}{group}{'-sym' if self.symmetric else ''}"
            f"{'-actorder' if self.act_order else ''}"
        )


@dataclass(frozen=True)
class Pruning:
    """Weight pruning: unstructured (``sparsity`` percent) or semi-structured N:M (``n`` kept of ``m``).

    Attributes:
        method: ``"sparsegpt"``, ``"magnitude"`` or ``"wanda"``.
        sparsity: percent of weights set to zero, 0 to ``MAX_SPARSITY``; ``None`` for N:M.
        n, m: keep ``n`` of every ``m`` consecutive input columns in each row; ``None`` for unstructured.
    """

    method: str
    sparsity: int | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise SpecError(f"pruning method {self.method!r} is not one of {', '.join(PRUNE_METHODS)}")
        if (self.sparsity is None) == (self.n is None or self.m is None):
            raise SpecError("pruning takes either a sparsity percent or an n:m pattern")
        if self.sparsity is not None and not 0 <= self.sparsity <= MAX_SPARSITY:
            raise SpecError(f"sparsity {self.sparsity}% is outside 0-{MAX_SPARSITY}")
        if self.n is not None and (self.n, self.m) not in NM_PATTERNS:
            raise SpecError(
                f"pattern {self.n}:{self.m} is not one of {', '.join(f'{n}:{m}' for n, m in NM_PATTERNS)}"
            )

    @property
    def fraction(self) -> float:
        """Fraction of weights pruned, in [0, 1]."""
        if self.sparsity is not None:
            return self.sparsity / 100
        return 1 - self.n / self.m

    def __str__(self) -> str:
        amount = str(self.sparsity) if self.sparsity is not None else f"{self.n}:{self.m}"
        return f"{self.method}-{amount}"


@dataclass(frozen=True)
class Spec:
    """A compression recipe: dense, quantization, pruning, or SparseGPT pruning joint with GPTQ."""

    pruning: Pruning | None = None
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        if self.pruning and self.quantization:
            if (self.pruning.method, self.quantization.method) != ("sparsegpt", "gptq"):
                raise SpecError("a joint spec must prune with sparsegpt and quantize with gptq")
            if self.quantization.act_order:
                raise SpecError("-actorder is not supported in a joint spec")

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse spec text such as ``gptq-w4g64`` or ``sparsegpt-2:4+gptq-w4g64``; raises ``SpecError``."""
        try:
            return cls._parse(text)
        except SpecError as error:
            raise SpecError(f"invalid compression spec {text!r}: {error}; valid: {GRAMMAR}") from None

    @classmethod
    def _parse(cls, text: str) -> Spec:
        if not isinstance(text, str):
            raise SpecError("a spec is text")
        if text == "dense":
            return cls()
        parts = text.split("+")
        if len(parts) == 2:
            return cls(pruning=_parse_pruning(parts[0]), quantization=_parse_quantization(parts[1]))
        if len(parts) == 1 and _QUANT_RE.fullmatch(text):
            return cls(quantization=_parse_quantization(text))
        if len(parts) == 1 and _PRUNE_RE.fullmatch(text):
            return cls(pruning=_parse_pruning(text))
        raise SpecError("unknown spec")

    def __str__(self) -> str:
        parts = [str(part) for part in (self.pruning, self.quantization) if part is not None]
        return "+".join(parts) or "dense"

    @property
    def is_dense(self) -> bool:
        return self.pruning is None and self.quantization is None

    @property
    def methods(self) -> frozenset[str]:
        """The method names used, e.g. ``{"sparsegpt", "gptq"}``; empty for dense."""
        return frozenset(part.method for part in (self.pruning, self.quantization) if part is not None)

    @property
    def needs_calibration(self) -> bool:
        """Whether the method reads layer inputs (Hessians); RTN and magnitude pruning do not."""
        return bool(self.methods & {"gptq", "sparsegpt", "wanda"})

    def check_fits(self, in_features: Mapping[str, int]) -> None:
        """Refuse the spec unless every layer's input width is a multiple of the group size and of ``m``.

        Args:
            in_features: input width of each Linear layer to compress, by module name.
        """
        group = self.quantization.group_size if self.quantization else None
        m = self.pruning.m if self.pruning else None
        for name, width in in_features.items():
            if group and width % group:
                raise SpecError(
                    f"spec {self}: group size {group} does not divide the input width {width} of layer "
                    f"{name}; use a group size that divides every layer's width or none (per channel)"
                )
            if m and width % m:
                raise SpecError(
                    f"spec {self}: pattern {self.pruning.n}:{m} does not divide the input width {width} "
                    f"of layer {name}"
                )


def _parse_quantization(text: str) -> Quantization:
    match = _QUANT_RE.fullmatch(text)
    if not match:
        raise SpecError(f"{text!r} is not a quantization spec")
    method, bits, group, sym, act_order = match.groups()
    return Quantization(
        method=method,
        bits=int(bits),
        group_size=int(group) if group else None,
        symmetric=bool(sym),
        act_order=bool(act_order),
    )


def _parse_pruning(text: str) -> Pruning:
    match = _PRUNE_RE.fullmatch(text)
    if not match:
        raise SpecError(f"{text!r} is not a pruning spec")
    method, percent, n, m = match.groups()
    if percent is not None:
        return Pruning(method=method, sparsity=int(percent))
    return Pruning(method=method, n=int(n), m=int(m))


# --- calibration settings and results: the data the algorithms take and give -----------------------------------

@dataclass
class CalibrationSettings:
    """How calibration data is drawn and used.

    Attributes:
        n_windows: calibration windows (sequences).
        seqlen: tokens per window.
        seed: seed for drawing the windows (``calibration.calibration_windows``).
        dampening: fraction of ``mean(diag(H))`` added to each Hessian's diagonal.
        block_size: columns per GPTQ/SparseGPT lazy-update block (a multiple of group size and N:M ``m``).
        true_sequential: calibrate each group of Linears on the outputs of the already compressed ones.
        corpus: the corpus spec (``cpt_bench.corpus``) whose train split calibration windows come from.
    """

    n_windows: int = 128
    seqlen: int = 1024
    seed: int = 0
    dampening: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    corpus: str = "wikipedia"

    def __post_init__(self) -> None:
        rules = (
            ("n_windows", _is_int(self.n_windows) and self.n_windows >= 1, "a positive integer"),
            ("seqlen", _is_int(self.seqlen) and self.seqlen >= 1, "a positive integer"),
            ("block_size", _is_int(self.block_size) and self.block_size >= 1, "a positive integer"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "a non-negative integer"),
            ("dampening", _is_number(self.dampening) and 0 < self.dampening <= 1, "a number in (0, 1]"),
            ("true_sequential", isinstance(self.true_sequential, bool), "a bool"),
        )
        for name, valid, expected in rules:
            if not valid:
                value = getattr(self, name)
                raise SpecError(f"calibration setting {name} must be {expected}, got {value!r}")
        self.corpus = str(parse_corpus(self.corpus, "calibration setting corpus"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class LayerReport:
    """One compressed Linear: ``error`` as in ``gptq.output_error`` (None without calibration) and the
    ``seconds`` its compression took (its share of the calibration forwards not included)."""

    name: str
    method: str
    error: float | None
    seconds: float


@dataclass
class CompressionResult:
    """The outcome of ``compress_model``: per-Linear compressed forms (by module name) and reports."""

    spec: Spec
    settings: CalibrationSettings | None
    layers: dict[str, CompressedLinear] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # see ``sequential.PHASES``

    def settings_dict(self) -> dict | None:
        return asdict(self.settings) if self.settings is not None else None
