"""The transfer-matrix config: a YAML file, validated into frozen dataclasses with key paths in every error.

Example (``configs/default.yaml`` is the full one)::

    name: default
    model: embedded
    compression:
      specs: [dense, rtn-w3g64, sparsegpt-50]
      calibration: {corpus: wikipedia, n_windows: 16, seqlen: 512}
    prompts:
      hard: [paper]
      soft:
        sources: [wikipedia, shakespeare]
        trained_at: [rtn-w3g64]
        training: {n_virtual_tokens: 20, steps: 40, lr: 0.03}
        seeds: [0, 1, 2]          # optional: one prompt per seed
        controls: [init, random]  # optional: untrained control prompts beside the learned ones
        objectives: [lm, kd]      # optional: one prompt per training objective (default [lm])
      lora: {rank: 4, lr: 0.001}  # optional: a LoRA adapter per soft prompt's (source, level, seed)
      eora: {ranks: [8, 16]}      # optional: an EoRA adapter per compressed level and rank
      trivial_prefix: true        # default: the trivial-prefix control beside the prompts, every level and target
      idp: {sets: [[paper, soft-wikipedia@rtn-w3g64]], rules: [attention]}  # optional: a prompt chosen per document
    transfer: {datasets: true, compression_levels: true, compression_types: true}
    targets:
      - {task: cpt_ppl_wikipedia, limit: 8}
      - {task: cpt_piqa, limit: 100, metric: acc_norm}

Training seeds (``prompts.soft.seeds``): each seed trains its own prompt per (source, level), the seed setting both
the data order and any random initialisation (``SoftPromptConfig.seed``, which the list replaces; without the
list ``training.seed`` is the one seed). Prompt ids carry the seed only when there is more than one:
``soft-wikipedia@rtn-w3g64#s1`` (cell ids and folders spell ``#`` as ``-``).

Objectives (``prompts.soft.objectives``, ``prompts.lora.objectives``; ``cpt_bench.recovery.training``): ``lm`` trains
on the corpus's next tokens, ``kd`` imitates the dense model (KL to its next-token distribution); one artifact per
objective, ids ``soft-...`` / ``soft+kd-...``.

LoRA adapters (``prompts.lora``, ``cpt_bench.recovery.lora``): a budget-matched baseline, one adapter per soft prompt's
(source, level, seed) and objective, trained with the soft prompt's settings (steps, batch, windows, schedule; its own
``lr``), evaluated and transferred exactly like a soft prompt (ids ``lora-wikipedia@rtn-w3g64``, ``lora+kd-...``).
They need ``kernels: simulated``: PEFT wraps Linear layers, not the low-bit kernels.

EoRA adapters (``prompts.eora``, ``EoraAdapters``, ``cpt_bench.recovery.eora``): one per compressed level (``levels``,
default all) and rank (``ranks``), fitted in closed form, with no training, on the level's checkpoint from the
compression's calibration windows (``compression.calibration``, the same windows whether or not the level's spec
reads them) exactly as ``cpt-bench eora CHECKPOINT --rank R`` fits it (``recovery.eora.fit_checkpoint_eora``); ids
``eora-r16@gptq-w3g64``, folders ``RUN/prompts/<id>`` (a PEFT LoRA folder, ``eora=DIR``). An adapter corrects the
errors of the one checkpoint it was fitted on, so it is scored at its own level only (on every target), never
transferred. Like LoRA they need ``kernels: simulated``.

Control prompts (``prompts.soft.controls``, ``cpt_bench.recovery.controls``): untrained soft prompts evaluated beside
the learned ones, so that the report can say whether a gain is learned recovery or any extra context would do:

- ``init``: the untrained starting prompt, same length, initialisation and seed. It depends on neither the source
  corpus (every initialiser reads only the embedding table, the settings and the seed) nor, for the unseeded
  initialisers ``vocab`` and ``text``, the seed, so there is one per level (``init@rtn-w3g64``), and one per seed
  (``init@rtn-w3g64#s1``) only for ``sample`` / ``random`` initialisation with several seeds; it is the control of
  every learned prompt of its level (and seed), with no duplicate evaluations.
- ``random``: random vectors with the embedding table's mean row norm, length ``n_virtual_tokens``, one per seed
  (``random@rtn-w3g64``, ``random@rtn-w3g64#s1``).

A control is evaluated at its own level only (an untrained prompt's transfers say nothing its own-level cells do
not), on every target that a learned prompt of that level is evaluated on there. Its artifact is a prompt folder
(``RUN/prompts/<id>``) the ``cpt`` adapter applies like any other (``soft_prompt=DIR``).

The trivial-prefix control (``prompts.trivial_prefix``, default true; ``cpt_bench.recovery.controls``): the model's
EOS token as a one-token soft prompt, placed where prompts sit, evaluated in a config with any prompt (hard, soft
or LoRA) at every level on every target (id
``trivial``, one artifact per run: it depends on no level, corpus or seed). A gain that a neutral token before the
window also gives is not recovery: the summary compares every prompt with it (``vs_trivial``,
``gap_closed_vs_trivial``) and a run warns when it alone moves the dense model's perplexity by more than the
standard error. A run folder whose ``config.json`` predates the key ran without it (``store.read_run_config``).

IDP (``prompts.idp``, ``IdpSettings``; ``cpt_bench.recovery.idp``): sets of two or more of the matrix's own
prompts, one chosen per document from its context by each rule in ``rules``. A member names a hard prompt of
``prompts.hard`` (as written there, by its label, or by its prompt id ``hard-paper``), a soft prompt or control the
matrix builds by its prompt id (``soft-wikipedia@rtn-w3g64``, ``soft+kd-...``, ``...#s1``, ``init@rtn-w3g64``,
``trivial``), or a soft-prompt folder of the user's (a path with ``/``). One prompt per (set, rule), id
``idp-<rule>:<member>+<member>...`` (``PromptChoice.id``).

Why our own small validator rather than pydantic: errors must be one line naming the key path
(``prompts.soft.training.steps``) and what was expected, and the leaf checks (compression grammar,
calibration and soft-prompt settings) already live in the dataclasses they configure.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import cpt_bench.lmeval  # noqa: F401  (registers the lmeval: corpus kind that configs may name)
from cpt_bench.compress.spec import CalibrationSettings, Spec
from cpt_bench.corpus import parse_corpus
from cpt_bench.errors import UserError
from cpt_bench.recovery import LEARNED_KINDS
from cpt_bench.recovery.controls import CONTROL_KINDS, CONTROL_PROMPT_KIND, TRIVIAL, control_depends_on_seed
from cpt_bench.recovery.eora import METHOD as EORA
from cpt_bench.recovery.hard import (
    FILE_FORM,
    HARD_PROMPTS,
    TEXT_FORM,
    HardPromptError,
    hard_prompt_label,
    hard_prompt_text,
)
from cpt_bench.recovery.idp import DEFAULT_RULE, RULES, SEPARATOR
from cpt_bench.recovery.lora import LoraSettings
from cpt_bench.recovery.training import OBJECTIVES, SoftPromptConfig

PPL_TASK_PREFIX = "cpt_ppl_"
CORPUS_TASK = "cpt_ppl_corpus"  # token perplexity of any corpus spec (tasks/cpt_ppl_corpus.yaml)
PPL_METRIC = "token_perplexity"
DEFAULT_ACCURACY_METRIC = "acc"
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16")
KERNEL_MODES = ("simulated", "real")


class ConfigError(UserError):
    """A config that cannot be run; the message is one line: file, key path, value and what was expected."""


@dataclass(frozen=True)
class Target:
    """One target: an lm-eval task (ours in tasks/ or a built-in), its example limit and the metric reported.

    ``limit``: windows for ``cpt_ppl_*`` tasks, items otherwise (None: all). ``metric``: default
    ``token_perplexity`` for ``cpt_ppl_*`` tasks, the task's first metric under its first filter for a generative
    task of ``tasks/`` (``em`` for ``cpt_coqa``, ``exact_match,remove_whitespace`` for ``cpt_nq_open``), else
    ``acc``. ``corpus``: the corpus spec (``cpt_bench.corpus``) that the ``cpt_ppl_corpus`` task scores, required
    there and nowhere else. ``gen_kwargs``: generation settings of a generative task (``GEN_KWARGS``), merged over
    the task's own by lm-eval; part of the target's identity (``name``).
    """

    task: str
    limit: int | None = None
    metric: str | None = None
    corpus: str | None = None
    gen_kwargs: dict[str, Any] | None = None

    def __hash__(self) -> int:  # gen_kwargs is a dict: hash its canonical spelling
        return hash((self.task, self.limit, self.metric, self.corpus, self.gen_kwargs_label))

    def __post_init__(self) -> None:
        _require(bool(self.task), "task", self.task, "a task name such as cpt_ppl_wikipedia or cpt_piqa")
        if self.gen_kwargs is not None:
            object.__setattr__(self, "gen_kwargs", check_gen_kwargs(self.gen_kwargs))
        _require(self.limit is None or self.limit >= 2, "limit", self.limit,
                 "an integer >= 2 (stderr needs two examples) or null for all")
        _require((self.corpus is not None) == (self.task == CORPUS_TASK), "corpus", self.corpus,
                 f"a corpus spec exactly when the task is {CORPUS_TASK}")
        if self.corpus is not None:
            try:
                object.__setattr__(self, "corpus", str(parse_corpus(self.corpus)))
            except UserError as error:
                raise ConfigError(f"corpus: {error}") from None
        if self.metric is None:
            object.__setattr__(self, "metric", PPL_METRIC if self.is_perplexity
                               else default_generative_metric(self.task) or DEFAULT_ACCURACY_METRIC)

    @property
    def gen_kwargs_label(self) -> str:
        """``+key=value`` per generation setting, keys sorted (lists joined by ``|``, control characters escaped:
        ``until=\\n``); empty without any."""
        def spell(value: Any) -> str:
            items = value if isinstance(value, list) else [value]
            return "|".join(str(item).encode("unicode_escape").decode("ascii") for item in items)

        return "".join(f"+{key}={spell(value)}" for key, value in sorted((self.gen_kwargs or {}).items()))

    @property
    def name(self) -> str:
        """The target's identity in cells and results: the task, with its corpus for ``cpt_ppl_corpus`` and its
        generation settings (``cpt_coqa+max_gen_toks=32``)."""
        return (f"{self.task}@{self.corpus}" if self.corpus else self.task) + self.gen_kwargs_label

    @property
    def is_generative(self) -> bool:
        """Whether the target generates text: it sets ``gen_kwargs`` or is a generative task of ``tasks/`` (a built-in
        generative task without ``gen_kwargs`` is known as one only once lm-eval has run it)."""
        from cpt_bench.lmeval.tasks import local_task_metrics

        metrics = None if self.is_perplexity else local_task_metrics(self.task)
        return self.gen_kwargs is not None or (metrics is not None and metrics.is_generative)

    @property
    def max_gen_toks(self) -> int | None:
        """Tokens generated at most per item when ``gen_kwargs`` sets it (None: the task's or lm-eval's default)."""
        return (self.gen_kwargs or {}).get("max_gen_toks")

    @property
    def is_perplexity(self) -> bool:
        return self.task.startswith(PPL_TASK_PREFIX)

    @property
    def domain(self) -> str | None:
        """The corpus a perplexity target reads (a soft prompt from it is in-domain), else None."""
        if not self.is_perplexity:
            return None
        return self.corpus or self.task[len(PPL_TASK_PREFIX):]


# Generation settings a target may set (lm-eval's names), each with its check and what it expects. Greedy decoding
# only: a sampled answer would make paired per-item comparisons of cells noise.
GEN_KWARGS: dict[str, tuple[Any, str]] = {
    "max_gen_toks": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "until": (lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and len(v) > 0
                                                               and all(isinstance(s, str) and s for s in v)),
              "a stop string or a non-empty list of them"),
    "do_sample": (lambda v: v is False, "false (greedy decoding; the matrix pairs items across cells)"),
    "temperature": (lambda v: type(v) in (int, float) and v == 0, "0 (greedy decoding)"),
}


def check_gen_kwargs(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``GEN_KWARGS``, keys sorted; raises a one-line ``ConfigError`` naming the key."""
    for key, value in given.items():
        if key not in GEN_KWARGS:
            raise ConfigError(f"gen_kwargs.{key}: unknown generation setting; expected some of "
                              f"{', '.join(GEN_KWARGS)}")
        check, expected = GEN_KWARGS[key]
        _require(check(value), f"gen_kwargs.{key}", value, expected)
    return dict(sorted(given.items()))


def default_generative_metric(task: str) -> str | None:
    """The metric a generative task of ``tasks/`` reports first, under its first filter, as a target's ``metric:``
    spells it; None for other tasks (read from the task's YAML alone, ``lmeval.tasks.local_task_metrics``)."""
    from cpt_bench.lmeval.tasks import local_task_metrics

    metrics = local_task_metrics(task)
    return metrics.names()[0] if metrics is not None and metrics.is_generative and metrics.keys else None


@dataclass(frozen=True)
class Compression:
    """Compression levels (specs, ``dense`` included for the reference) and the calibration they share."""

    specs: list[str] = field(default_factory=lambda: ["dense"])
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self) -> None:
        _require(len(self.specs) > 0, "specs", self.specs, "a non-empty list of compression specs")
        object.__setattr__(self, "specs", _canonical_specs("specs", self.specs))


@dataclass(frozen=True)
class PromptChoice:
    """A prompt applied in cells. ``kind``: a recovery method (``recovery.RECOVERY_KINDS``: none, hard, soft, lora,
    idp, ...; a LoRA adapter is applied like a prompt); ``hard``: a hard prompt's name or text; learned kinds name
    their level and, unless they are controls, their source and ``objective``.
    ``seed``: the training seed, set only when the config trains several (it is then part of the id);
    ``control``: ``init`` / ``random`` for an untrained control prompt (no source), ``trivial`` for the
    trivial-prefix control (no source, no level: its id is ``trivial``); ``members`` and ``rule``: an IDP set (its
    members' prompt ids, or folders of the user's) and its choice rule (``IdpSettings``); ``rank``: an EoRA
    adapter's rank (kind ``eora``, id ``eora-r16@gptq-w3g64``: no source, seed or objective) or, on a soft prompt,
    the rank of the EoRA adapter it was trained on and is applied with (``eora-r16+soft-wikipedia@gptq-w3g64``:
    ``eora_base``)."""

    kind: str
    hard: str | None = None  # a registered name or text:TEXT (recovery.hard)
    source: str | None = None
    trained_at: str | None = None
    seed: int | None = None
    control: str | None = None
    objective: str = "lm"
    members: tuple[str, ...] | None = None
    rule: str | None = None
    rank: int | None = None

    @property
    def id(self) -> str:
        suffix = "" if self.seed is None else f"#s{self.seed}"
        if self.kind == EORA:
            return f"{EORA}-r{self.rank}@{self.trained_at}"
        if self.members is not None:
            return f"{self.kind}-{self.rule}:" + "+".join(member_label(member) for member in self.members)
        if self.hard is not None:
            return f"{self.kind}-{hard_prompt_label(self.hard)}"
        if self.control:
            return self.control if self.trained_at is None else f"{self.control}@{self.trained_at}{suffix}"
        if self.kind in LEARNED_KINDS:
            return f"{self.method}-{self.source}@{self.trained_at}{suffix}"
        return "none"

    @property
    def method(self) -> str:
        """The kind (``soft``, ``lora``, ...), with ``+kd`` for the kd objective and ``eora-r<rank>+`` before a soft
        prompt trained on an EoRA adapter: how a learned artifact was made."""
        on_eora = "" if self.rank is None else f"{EORA}-r{self.rank}+"
        return on_eora + self.kind + ("" if self.objective == "lm" else f"+{self.objective}")

    @property
    def eora_base(self) -> PromptChoice | None:
        """The EoRA adapter a soft prompt was trained on and is applied with (None: none)."""
        if self.kind == EORA or self.rank is None:
            return None
        return PromptChoice(EORA, trained_at=self.trained_at, rank=self.rank)

    @property
    def is_learned(self) -> bool:
        """A trained artifact of a learned kind (not a control)."""
        return self.kind in LEARNED_KINDS and self.control is None


NO_PROMPT = PromptChoice("none")
TRIVIAL_PREFIX = PromptChoice(CONTROL_PROMPT_KIND, control=TRIVIAL)  # the trivial-prefix control, of every level
IDP_KIND = "idp"  # recovery.idp.IdpKind.name


def is_folder_member(member: str) -> bool:
    """Whether an IDP member as its set keeps it names a folder of the user's (an absolute path; prompt ids never
    start with ``/``) rather than a prompt id."""
    return Path(member).is_absolute()


def member_label(member: str) -> str:
    """An IDP member in its set's id: a prompt id as it is, a user's folder by its name."""
    return Path(member).name if is_folder_member(member) else member


@dataclass(frozen=True)
class IdpSettings:
    """IDP prompts in a matrix (module docstring): ``sets`` of two or more members each, one IDP prompt per set and
    rule of ``rules`` (``recovery.idp.RULES``). Members are checked against the config's prompts by ``Prompts``."""

    sets: list[list[str]] = field(default_factory=list)
    rules: list[str] = field(default_factory=lambda: [DEFAULT_RULE])

    def __post_init__(self) -> None:
        _require(len(self.sets) > 0, "sets", self.sets, "a non-empty list of prompt sets such as [[paper, "
                 "soft-wikipedia@rtn-w3g64]]")
        for index, members in enumerate(self.sets):
            _require(len(members) >= 2, f"sets[{index}]", members, "two or more prompts (IDP chooses among them; "
                     "one prompt alone is prompts.hard or a soft prompt)")
            for number, member in enumerate(members):
                _require(bool(member) and SEPARATOR not in member, f"sets[{index}][{number}]", member,
                         f"a prompt id or folder, non-empty and without {SEPARATOR!r}")
        _require(len(self.rules) > 0, "rules", self.rules, f"a non-empty list out of {', '.join(RULES)}")
        for index, rule in enumerate(self.rules):
            _require(rule in RULES, f"rules[{index}]", rule, f"one of {', '.join(RULES)}")
        _require_distinct("rules", self.rules)


@dataclass(frozen=True)
class SoftPrompts:
    """Soft prompts: one per (source corpus, compression level it is trained at, training seed).

    A prompt whose validation loss never beat its initialisation is still applied, its cells flagged
    ``prompt.untrained``; ``require_improvement`` makes such a prompt stop the run instead. ``seeds``: one prompt
    per training seed (empty: ``training.seed`` alone); ``controls``: ``init`` / ``random`` control prompts (see
    the module docstring).
    """

    sources: list[str] = field(default_factory=list)
    trained_at: list[str] = field(default_factory=list)
    training: SoftPromptConfig = field(default_factory=SoftPromptConfig)
    require_improvement: bool = False
    seeds: list[int] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: ["lm"])

    def __post_init__(self) -> None:
        canonical = []
        for index, source in enumerate(self.sources):
            try:
                canonical.append(str(parse_corpus(source)))
            except UserError as error:
                raise ConfigError(f"sources[{index}]: {error}") from None
        _require_distinct("sources", self.sources, canonical)
        object.__setattr__(self, "sources", canonical)
        _canonical_specs("trained_at", self.trained_at)
        _require(bool(self.sources) == bool(self.trained_at), "trained_at", self.trained_at,
                 "given exactly when sources are (a prompt needs both)")
        _require(all(seed >= 0 for seed in self.seeds), "seeds", self.seeds, "non-negative integers")
        _require_distinct("seeds", self.seeds)
        _require(not self.seeds or self.training.seed == 0, "seeds", self.seeds,
                 f"either seeds or training.seed, not both (training.seed is {self.training.seed})")
        _require(all(kind in CONTROL_KINDS for kind in self.controls), "controls", self.controls,
                 f"control kinds out of {', '.join(CONTROL_KINDS)}")
        _require_distinct("controls", self.controls)
        _require(not self.controls or bool(self.sources), "controls", self.controls,
                 "given only with soft prompts (sources and trained_at)")
        _require(self.training.objective == "lm", "training.objective", self.training.objective,
                 "left out: list the objectives in prompts.soft.objectives")
        _require(bool(self.objectives) and set(self.objectives) <= set(OBJECTIVES), "objectives", self.objectives,
                 f"a non-empty list of objectives out of {', '.join(OBJECTIVES)}")
        _require_distinct("objectives", self.objectives)

    def training_seeds(self) -> list[int]:
        """The seeds prompts are trained with: ``seeds``, else ``training.seed`` alone."""
        return self.seeds or [self.training.seed]


@dataclass(frozen=True)
class EoraAdapters:
    """EoRA adapters (``cpt_bench.recovery.eora``): one per compressed level and rank, fitted in closed form (no
    training) on the level's checkpoint from the compression's own calibration windows (``compression.calibration``),
    and scored at that level only, on every target: an adapter corrects one checkpoint's errors, so it does not
    transfer across levels.

    ``ranks``: the ranks, one adapter each (``[8, 16, 32]``); ``levels``: the compressed levels to correct (default:
    every level of ``compression.specs`` but dense); ``soft``: ranks (of ``ranks``) at which soft prompts are also
    trained on the model corrected by that adapter (EoRA + soft prompt: ``prompts.soft``'s sources, settings, seeds
    and objectives, at its ``trained_at`` levels that have EoRA), scored with the adapter, at that level only.
    """

    ranks: list[int] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    soft: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.ranks) and all(rank > 0 for rank in self.ranks), "ranks", self.ranks,
                 "a non-empty list of positive integers (EoRA ranks, e.g. [8, 16, 32])")
        _require_distinct("ranks", self.ranks)
        levels = _canonical_specs("levels", self.levels)
        for index, level in enumerate(levels):
            _require(level != "dense", f"levels[{index}]", self.levels[index],
                     "a compressed level (dense has no compression error to correct)")
        object.__setattr__(self, "levels", levels)
        for index, rank in enumerate(self.soft):
            _require(rank in self.ranks, f"soft[{index}]", rank, f"one of ranks ({', '.join(map(str, self.ranks))})")
        _require_distinct("soft", self.soft)


@dataclass(frozen=True)
class Prompts:
    """Prompt kinds besides "none": hard prompts, soft prompts, the LoRA adapters trained beside them (None: none)
    and IDP prompts.

    ``hard``: each ``NAME``, ``text:TEXT`` or ``file:PATH`` (``cpt_bench.recovery.hard``); a file is read when the
    config is validated and kept as ``text:`` its content, so that a run folder's config does not depend on it.
    ``trivial_prefix``: evaluate the trivial-prefix control (module docstring) beside every prompt; ``eora``: EoRA
    adapters per compressed level and rank (``EoraAdapters``); ``idp``: IDP prompts over sets of these
    (``IdpSettings``)."""

    hard: list[str] = field(default_factory=list)
    soft: SoftPrompts = field(default_factory=SoftPrompts)
    lora: LoraSettings | None = None
    eora: EoraAdapters | None = None
    trivial_prefix: bool = True
    idp: IdpSettings | None = None

    def __post_init__(self) -> None:
        hard = []
        for index, prompt in enumerate(self.hard):
            try:
                hard.append(prompt if prompt in HARD_PROMPTS else TEXT_FORM + hard_prompt_text(prompt))
            except HardPromptError as error:
                raise ConfigError(f"hard[{index}]: {error}") from None
        _require_distinct("hard", self.hard, [hard_prompt_label(prompt) for prompt in hard])
        object.__setattr__(self, "hard", hard)
        if self.lora is not None:  # (LoraSettings refuses repeated objectives itself)
            _require_distinct("lora.target_modules", self.lora.target_modules or [])
        if self.lora is not None and not self.soft.sources:
            raise ConfigError("lora: given without soft prompts; expected prompts.soft.sources and trained_at, which "
                              "say what LoRA adapters are trained on")
        if self.idp is not None:
            sets = []
            for index, members in enumerate(self.idp.sets):
                canonical = [self._idp_member(f"idp.sets[{index}][{number}]", member)
                             for number, member in enumerate(members)]
                _require_distinct(f"idp.sets[{index}]", members, canonical)
                sets.append(canonical)
            _require_distinct("idp.sets", self.idp.sets, [tuple(sorted(members)) for members in sets])
            _require_distinct("idp.sets", self.idp.sets, ["+".join(map(member_label, members)) for members in sets])
            object.__setattr__(self, "idp", dataclasses.replace(self.idp, sets=sets))

    def learned(self) -> tuple[PromptChoice, ...]:
        """The artifacts of learned kinds (soft prompts, LoRA adapters) the config trains: per level, source, method
        (kind and objective) and seed, in that order (seeds in ids only when there are several)."""
        seeds = self.soft.training_seeds()
        methods = [(kind, objective) for kind in LEARNED_KINDS if (settings := getattr(self, kind, None))
                   for objective in settings.objectives]
        return tuple(PromptChoice(kind, source=source, trained_at=str(Spec.parse(level)),
                                  seed=seed if len(seeds) > 1 else None, objective=objective)
                     for level in self.soft.trained_at for source in self.soft.sources for kind, objective in methods
                     for seed in seeds)

    def control_for(self, prompt: PromptChoice, kind: str) -> PromptChoice:
        """The ``kind`` control of learned ``prompt``: of its level and, where the control depends on it, its seed."""
        seeded = control_depends_on_seed(kind, self.soft.training)
        return PromptChoice(CONTROL_PROMPT_KIND, trained_at=prompt.trained_at, seed=prompt.seed if seeded else None,
                            control=kind)

    def controls(self) -> tuple[PromptChoice, ...]:
        """The ``init`` / ``random`` controls of the learned soft prompts, each once, in order."""
        return tuple(dict.fromkeys(self.control_for(prompt, kind) for prompt in self.learned()
                                   if prompt.kind == CONTROL_PROMPT_KIND for kind in self.soft.controls))

    def idp_members(self) -> dict[str, PromptChoice]:
        """The prompts an IDP set may name, by prompt id: hard prompts, soft prompts, their controls and the
        trivial-prefix control (not LoRA adapters: no prompt to place before a document)."""
        found = [*(PromptChoice("hard", hard=text) for text in self.hard), *self.learned(), *self.controls()]
        found += [TRIVIAL_PREFIX] if self.trivial_prefix else []
        return {prompt.id: prompt for prompt in found if prompt.kind in ("hard", CONTROL_PROMPT_KIND)}

    def idp_choices(self) -> tuple[PromptChoice, ...]:
        """One IDP prompt per (set, rule), sets first (none without ``idp``)."""
        if self.idp is None:
            return ()
        return tuple(PromptChoice(IDP_KIND, members=tuple(members), rule=rule)
                     for members in self.idp.sets for rule in self.idp.rules)

    def _idp_member(self, key: str, value: str) -> str:
        """An IDP member as its set keeps it: a prompt id of ``idp_members`` (a hard prompt may be named as in
        ``hard`` or by its label), or a user's folder resolved to an absolute path; a one-line ``ConfigError``
        naming ``key`` for anything else."""
        known = self.idp_members()
        if value in known:
            return value
        if "/" in value and not value.startswith((TEXT_FORM, FILE_FORM)):
            folder = Path(value).expanduser().resolve()
            _require(folder.is_dir(), key, value, "an existing soft-prompt folder (a path holding '/')")
            return str(folder)
        try:
            hard = value if value in HARD_PROMPTS else (TEXT_FORM + hard_prompt_text(value)
                                                        if value.startswith((TEXT_FORM, FILE_FORM)) else None)
        except HardPromptError as error:
            raise ConfigError(f"{key}: {error}") from None
        labels = {hard_prompt_label(text): text for text in self.hard}
        hard = hard if hard is not None else labels.get(value)
        if hard is not None:
            _require(hard in self.hard, key, value, "a hard prompt listed in prompts.hard (IDP is set against each "
                     "prompt of its set alone)")
            _require(SEPARATOR not in hard, key, value, f"a hard prompt without {SEPARATOR!r}")
            return PromptChoice("hard", hard=hard).id
        raise ConfigError(f"{key}: got {value!r}, expected a prompt of this config ({', '.join(known) or 'none'}) "
                          "or a soft-prompt folder (a path holding '/')")


@dataclass(frozen=True)
class Transfer:
    """Which soft-prompt transfers to evaluate besides the in-domain one at its own compression level."""

    datasets: bool = True  # a prompt learned on corpus S, scored on target T != S (and on zero-shot tasks)
    compression_levels: bool = True  # learned at level C, applied at C' of the same family (quant / prune)
    compression_types: bool = True  # learned at C, applied at a level of another family (dense included)


@dataclass(frozen=True)
class MatrixConfig:
    """A whole matrix: model, compression levels, prompts, transfers, targets and run settings."""

    name: str
    model: str = "embedded"
    device: str = "auto"  # auto: cuda when available
    dtype: str = "float32"
    kernels: str = "simulated"  # simulated: dequantized weights; real: low-bit kernels (CPU int4/int8, CUDA GPTQModel)
    batch_size: int = 8
    seed: int = 0  # lm-eval's seeds are derived from it (see seeds())
    ppl_seqlen: int = 1024  # tokens per perplexity window
    apply_chat_template: bool = False  # lm-eval's apply_chat_template for every target (recorded in each cell)
    compression: Compression = field(default_factory=Compression)
    prompts: Prompts = field(default_factory=Prompts)
    transfer: Transfer = field(default_factory=Transfer)
    targets: list[Target] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        _require(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        _require(self.kernels in KERNEL_MODES, "kernels", self.kernels, f"one of {', '.join(KERNEL_MODES)}")
        for key in ("batch_size", "ppl_seqlen"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "a positive integer")
        _require(self.seed >= 0, "seed", self.seed, "a non-negative integer")
        _require(len(self.targets) > 0, "targets", self.targets, "a non-empty list of {task: ..., limit: ...}")
        _require_distinct("targets", [target.name for target in self.targets])
        _require(self.prompts.lora is None or self.kernels == "simulated", "kernels", self.kernels,
                 "simulated with prompts.lora (PEFT wraps Linear layers, not the real low-bit kernels)")
        for index, spec in enumerate(self.prompts.soft.trained_at):
            _require(str(Spec.parse(spec)) in self.compression.specs, f"prompts.soft.trained_at[{index}]", spec,
                     f"one of compression.specs ({', '.join(self.compression.specs)})")
        if self.prompts.eora is not None:
            _require(self.kernels == "simulated", "kernels", self.kernels,
                     "simulated with prompts.eora (PEFT wraps Linear layers, not the real low-bit kernels)")
            compressed = [spec for spec in self.compression.specs if spec != "dense"]
            for index, spec in enumerate(self.prompts.eora.levels):
                _require(spec in compressed, f"prompts.eora.levels[{index}]", spec,
                         f"a compressed level of compression.specs ({', '.join(compressed) or 'none'})")
            if not compressed:
                raise ConfigError("prompts.eora: given, but compression.specs has no compressed level; expected a "
                                  "level for EoRA to correct (e.g. gptq-w3g64)")
            if self.prompts.eora.soft and not self.eora_soft_levels():
                raise ConfigError(f"prompts.eora.soft: got {self.prompts.eora.soft!r}, but no level both trains soft "
                                  f"prompts (prompts.soft.trained_at: {self.prompts.soft.trained_at}) and has EoRA "
                                  f"({', '.join(self.eora_levels())}); expected one that does")

    def eora_levels(self) -> list[str]:
        """The levels EoRA adapters correct: ``prompts.eora.levels``, else every compressed level (none without
        ``prompts.eora``)."""
        if self.prompts.eora is None:
            return []
        return self.prompts.eora.levels or [spec for spec in self.compression.specs if spec != "dense"]

    def eora_soft_levels(self) -> list[str]:
        """The levels where soft prompts are trained on EoRA (``prompts.eora.soft``): those of
        ``prompts.soft.trained_at`` that have EoRA adapters."""
        if self.prompts.eora is None or not self.prompts.eora.soft:
            return []
        levels = [str(Spec.parse(level)) for level in self.prompts.soft.trained_at]
        return [level for level in levels if level in self.eora_levels()]

    def seeds(self) -> dict[str, int]:
        """lm-eval's four seeds: its defaults (0, 1234, 1234, 1234) shifted by ``seed``."""
        return {"random_seed": self.seed, "numpy_random_seed": 1234 + self.seed,
                "torch_random_seed": 1234 + self.seed, "fewshot_random_seed": 1234 + self.seed}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML / JSON), with every default filled in: what a run folder stores and compares."""
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _canonical_specs(key: str, texts: list[str]) -> list[str]:
    """Each compression spec of ``texts`` in its canonical form; one that does not parse is refused in one line
    naming ``key[index]``, and so are two spelling the same spec."""
    canonical = []
    for index, text in enumerate(texts):
        try:
            canonical.append(str(Spec.parse(text)))
        except UserError as error:
            raise ConfigError(f"{key}[{index}]: {error}") from None
    _require_distinct(key, texts, canonical)
    return canonical


def _require_distinct(key: str, values: list, identities: list | None = None) -> None:
    """Refuse a list that names one thing twice (the same cells would run twice), naming the repeated value.

    ``identities``: what makes two entries the same (a canonical spec, a cell label), default the values.
    """
    first: dict[Any, int] = {}
    for index, identity in enumerate(identities if identities is not None else values):
        if identity in first:
            earlier = first[identity]
            same = "" if values[earlier] == values[index] else f" {values[earlier]!r} (both {identity})"
            raise ConfigError(f"{key}[{index}]: {values[index]!r} repeats {key}[{earlier}]{same}; expected each "
                              "once")
        first[identity] = index


def load_config(path: str | Path) -> MatrixConfig:
    """Read and validate a YAML config; raises ``ConfigError`` (one line, prefixed with the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; expected a YAML file such as configs/default.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"config {path}: malformed YAML{where}: {problem}") from None
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"config {path}: {error}") from None


def config_from_dict(data: Any) -> MatrixConfig:
    """Validate plain data (a parsed YAML mapping) into a ``MatrixConfig``; raises ``ConfigError``."""
    return _build(MatrixConfig, data, "")


def _build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, checking keys and types; ``path`` prefixes errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'top level'}: got {_describe(data)}, expected a mapping of "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; expected one of {', '.join(sorted(names))}")
    values = {key: _convert(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{_join(path, missing[0]) if missing else path}: required key missing") from error
    except ConfigError as error:
        raise ConfigError(f"{_join(path, str(error))}") from None
    except UserError as error:  # checks of CalibrationSettings, SoftPromptConfig, Spec
        raise ConfigError(f"{path or 'top level'}: {error}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``hint`` (dataclass, list[...], X | None, bool, int, float, str)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(inner, value, path)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{path}: got {_describe(value)}, expected a mapping of names to values")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: got {_describe(value)}, expected a list")
        return [_convert(args[0], item, f"{path}[{index}]") for index, item in enumerate(value)]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, str) and type(value) is hint:
        return value
    raise ConfigError(f"{path}: got {_describe(value)}, expected {hint.__name__}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
