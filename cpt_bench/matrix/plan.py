"""Expand a ``MatrixConfig`` into cells (compression x prompt x target) and the artifacts they share.

Artifacts: one compressed checkpoint per non-dense compression level that a cell or a prompt needs, one soft
prompt per (source corpus, level it is trained at, objective, training seed), as many LoRA adapters when
``prompts.lora`` is set (learned artifacts transfer alike; "prompt" below covers them), and the control prompts of
each level
(``config`` module docstring). Each is built once and reused by every cell. Prompts per compression level C and
target T:

- ``none`` and every hard prompt, always;
- a soft prompt learned on source S at level C': kept when C' == C and S is T's corpus (in-domain), or
  when the transfer it makes is enabled: ``datasets`` (S is not T's corpus; zero-shot targets have no
  corpus, so every soft prompt transfers to them), ``compression_levels`` (C' != C, same family) and
  ``compression_types`` (another family; dense is its own family);
- a control prompt of level C' only at C == C', on the targets that some learned prompt of C' is kept on at C';
- an EoRA adapter (``prompts.eora``) of level C' and rank r only at C == C', on every target: it corrects the errors of
  C''s checkpoint and does not transfer across levels (its folder is fitted on the checkpoint, not trained); a soft
  prompt trained on it (``prompts.eora.soft``) likewise, with the adapter applied, on the targets the ``datasets``
  transfer allows;
- the trivial-prefix control (``TRIVIAL_PREFIX``, unless ``prompts.trivial_prefix`` is false), when the config
  has any prompt besides ``none``, at every level on every target: one artifact of no level (written from the
  dense model's embedding layer, which compression leaves alone), applied everywhere;
- an IDP prompt (``prompts.idp``: a set of the prompts above, or folders of the user's, and a rule) on every target
  but perplexity ones, wherever every member of its set from the matrix has a cell of its own (``_idp_cells``): its
  soft members are thus applied as the transfer settings allow, and IDP is always set against each member alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from cpt_bench.compress.spec import Spec
from cpt_bench.errors import UserError
from cpt_bench.matrix.config import (
    IDP_KIND,
    NO_PROMPT,
    TRIVIAL_PREFIX,
    MatrixConfig,
    PromptChoice,
    Target,
    is_folder_member,
)
from cpt_bench.recovery import LEARNED_KINDS, RECOVERY_KINDS
from cpt_bench.recovery.controls import CONTROL_PROMPT_KIND
from cpt_bench.recovery.eora import METHOD as EORA
from cpt_bench.recovery.training import SoftPromptConfig

__all__ = ["NO_PROMPT", "TRIVIAL_PREFIX", "Cell", "Plan", "PromptChoice", "make_plan"]  # (PromptChoice: config's)

# Speeds of the embedded model on 2 idle CPU cores, for --dry-run estimates only (README, "Time estimates"). Taken
# from the committed runs made with nothing else running (results/default/summary.json cell seconds, README
# timings): a perplexity cell of 8 x 512 tokens 9.6 s, a PIQA cell of 100 items 17.5 s, a default soft prompt's
# 20480 training tokens ~110 s, SparseGPT 93 s on 16 x 512 calibration tokens, RTN / magnitude 4-6 s.
# benchmarks/plan_rates.py measures each constant directly; its only run so far shared the 2 cores with five other
# jobs (load average 5-6.6) and came out 2.5-13x slower (calibration 32x): rough figures under load, not used here.
EVAL_TOKENS_PER_SECOND = 520.0  # lm-eval rolling loglikelihood, 512-token windows, batch 8 (1024-token ones: ~390)
ITEM_SECONDS = 0.155  # one multiple-choice item (2-4 short continuations)
CALIBRATION_TOKENS_PER_SECOND = 90.0  # GPTQ / SparseGPT at 16 x 512 tokens: load, Hessians, algorithm, writing
UNCALIBRATED_SECONDS = 5.0  # RTN / magnitude: load, pack and write
TRAIN_TOKENS_PER_SECOND = 200.0  # soft-prompt forward + backward
KD_COST_FACTOR = 4 / 3  # kd adds the dense model's forward, about a third of a forward + backward (not measured)
# Generation: results/benchmarks/generation-speed.json, 8 contexts x 64 new tokens at batch 8 in 21.9 s (median of 7,
# 1 thread): 0.043 s per generated token per item; a generative item's context (~400 tokens for CoQA) is read at
# EVAL_TOKENS_PER_SECOND. lm-eval's default max_gen_toks (256) when a target does not set it.
GENERATED_TOKEN_SECONDS = 0.043
# An EoRA fit on a stored checkpoint: the calibration pass (at CALIBRATION_TOKENS_PER_SECOND) plus, per Linear, the
# covariance's float64 eigendecomposition and two SVDs (EoRA's and the plain one it is compared with), which do not
# depend on the windows. docs/recovery.md: `compress --spec rtn-w3g64 --eora-rank 16` on 8 x 512 tokens took 187 s
# (RTN itself: seconds), i.e. ~140 s beyond the 4096 tokens' pass; 4 min 50 s on a rerun beside other jobs.
EORA_FIT_SECONDS = 140.0
GENERATIVE_CONTEXT_TOKENS = 400
LM_EVAL_MAX_GEN_TOKS = 256
# IDP's choice: one batch-1 forward of each document's context under each member (recovery.idp), as a fraction of
# one multiple-choice item's scoring (ITEM_SECONDS) or one generative context's reading. Measured with
# `cpt-lm-eval --model cpt ... --tasks cpt_piqa --limit 60`, two hard members against one hard prompt alone, on the
# 2 CPU cores while another run used them (all three ~6x slower than idle, hence ratios): 87 s alone, 192 s by
# attention (eager attention, weights returned), 260 s by loss (logits over every context token).
IDP_CHOICE_FRACTION = {"attention": 0.85, "loss": 1.45}
CELL_OVERHEAD_SECONDS = 2.0  # lm-eval task set-up per cell
MODEL_LOAD_SECONDS = 4.0  # one (compression, prompt) group
REFERENCE_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings once), the model the rates are of


def family(spec: str) -> str:
    """``dense``, ``quantization``, ``pruning`` or ``joint`` (pruning and quantization in one pass)."""
    parsed = Spec.parse(spec)
    if parsed.is_dense:
        return "dense"
    if parsed.pruning and parsed.quantization:
        return "joint"
    return "pruning" if parsed.pruning else "quantization"


def safe_name(text: str) -> str:
    """``text`` with characters unsafe in file names (``:``, ``/``, spaces ...) replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "-", text)


@dataclass(frozen=True)
class Cell:
    """One evaluation: the model compressed by ``compression``, prompted by ``prompt``, on ``target``."""

    compression: str
    prompt: PromptChoice
    target: Target
    dataset_relation: str | None  # soft prompts: in-domain | cross-dataset
    compression_relation: str | None  # soft prompts: same | cross-level | cross-type

    @property
    def id(self) -> str:
        return safe_name(f"{self.compression}__{self.prompt.id}__{self.target.name}")

    def record(self) -> dict:
        """The cell's identity as plain data (stored with its result)."""
        return {"id": self.id, "compression": self.compression, "prompt": self.prompt.id,
                "prompt_choice": asdict(self.prompt), "task": self.target.name, "limit": self.target.limit,
                "metric": self.target.metric, "gen_kwargs": self.target.gen_kwargs,
                "dataset_relation": self.dataset_relation,
                "compression_relation": self.compression_relation}


def stored_cell(cell: Cell, config: MatrixConfig) -> dict:
    """The cell's identity as its result stores it: the cell's record and the run-wide settings that shape its
    requests (``leaderboard --add`` checks a submitted cell against this)."""
    return {**cell.record(), "apply_chat_template": config.apply_chat_template}


@dataclass(frozen=True)
class Plan:
    """Cells in a fixed order (compression, prompt, target: config order) and the artifacts they need."""

    config: MatrixConfig
    cells: tuple[Cell, ...]
    compressed: tuple[str, ...]  # non-dense specs to compress, config order
    soft_prompts: tuple[PromptChoice, ...]  # to build: learned prompts (trained), EoRA adapters (fitted), then
    # controls; config order

    def groups(self) -> dict[tuple[str, PromptChoice], list[Cell]]:
        """Cells by (compression, prompt): each group shares one loaded, prompted model."""
        grouped: dict[tuple[str, PromptChoice], list[Cell]] = {}
        for cell in self.cells:
            grouped.setdefault((cell.compression, cell.prompt), []).append(cell)
        return grouped


def recovery_settings(config: MatrixConfig, kind: str):
    """The settings of recovery kind ``kind`` in the config (``prompts.<kind>``; None when the config has none)."""
    return getattr(config.prompts, kind, None)


def prompt_training(config: MatrixConfig, prompt: PromptChoice) -> SoftPromptConfig:
    """The settings that build ``prompt`` (a learned prompt or adapter, or a control): ``training`` at its seed
    and objective."""
    training = config.prompts.soft.training
    seed = training.seed if prompt.seed is None else prompt.seed
    return replace(training, seed=seed, objective=prompt.objective)


def control_for(config: MatrixConfig, prompt: PromptChoice, kind: str) -> PromptChoice:
    """The ``kind`` control of learned ``prompt``: of its level and, where the control depends on it, its seed."""
    return config.prompts.control_for(prompt, kind)


def idp_members(config: MatrixConfig, prompt: PromptChoice) -> tuple[PromptChoice | str, ...]:
    """The members of IDP prompt ``prompt``: the matrix's own prompts, or a user's folder (its path); () for a prompt
    of another kind."""
    if prompt.members is None:
        return ()
    known = config.prompts.idp_members()
    return tuple(member if is_folder_member(member) else known[member] for member in prompt.members)


def artifacts_of(config: MatrixConfig, prompt: PromptChoice) -> tuple[PromptChoice, ...]:
    """The prompts whose artifacts applying ``prompt`` needs built: its IDP set's members of the matrix, else
    itself."""
    if prompt.kind == IDP_KIND:
        return tuple(member for member in idp_members(config, prompt) if isinstance(member, PromptChoice))
    return (prompt,)


def _relations(prompt: PromptChoice, compression: str, target: Target) -> tuple[str | None, str | None]:
    if prompt.kind == EORA:
        return None, "same"
    if prompt.kind not in LEARNED_KINDS:
        return None, None
    dataset = "in-domain" if prompt.source == target.domain else "cross-dataset"
    if prompt.trained_at == compression:
        level = "same"
    else:
        level = "cross-level" if family(prompt.trained_at) == family(compression) else "cross-type"
    return dataset, level


def _wanted(config: MatrixConfig, dataset: str | None, level: str | None) -> bool:
    transfer = config.transfer
    return ((dataset != "cross-dataset" or transfer.datasets)
            and (level != "cross-level" or transfer.compression_levels)
            and (level != "cross-type" or transfer.compression_types))


def make_plan(config: MatrixConfig) -> Plan:
    """Every wanted cell of ``config`` and the artifacts they need, each listed once."""
    learned = config.prompts.learned()
    prompts = (NO_PROMPT, *(PromptChoice("hard", hard=text) for text in config.prompts.hard), *learned)
    cells = []
    for compression in config.compression.specs:
        for prompt in prompts:
            for target in config.targets:
                dataset, level = _relations(prompt, compression, target)
                if _wanted(config, dataset, level):
                    cells.append(Cell(compression, prompt, target, dataset, level))
    eora = tuple(PromptChoice(EORA, trained_at=level, rank=rank) for level in config.eora_levels()
                 for rank in config.prompts.eora.ranks)
    on_eora = tuple(replace(prompt, rank=rank) for level in config.eora_soft_levels()
                    for rank in config.prompts.eora.soft for prompt in learned
                    if prompt.trained_at == level and prompt.kind == CONTROL_PROMPT_KIND)
    cells += [Cell(prompt.trained_at, prompt, target, *relations) for prompt in eora + on_eora
              for target in config.targets
              if _wanted(config, *(relations := _relations(prompt, prompt.trained_at, target)))]
    controls = config.prompts.controls()
    for control in controls:
        kept = {cell.target for cell in cells if cell.prompt.is_learned and cell.compression == control.trained_at
                and cell.prompt.trained_at == control.trained_at}
        cells += [Cell(control.trained_at, control, target, None, "same") for target in config.targets
                  if target in kept]
    if config.prompts.trivial_prefix and len(prompts) + len(eora) > 1:  # a run of none alone has no use for it
        controls += (TRIVIAL_PREFIX,)
        cells += [Cell(spec, TRIVIAL_PREFIX, target, None, None) for spec in config.compression.specs
                  for target in config.targets]
    cells += _idp_cells(config, cells)
    order = {spec: index for index, spec in enumerate(config.compression.specs)}
    cells.sort(key=lambda cell: order[cell.compression])  # stable: within a level, prompts then targets in order
    return _with_artifacts(config, tuple(cells), learned + eora + on_eora + controls)


def _idp_cells(config: MatrixConfig, cells: list[Cell]) -> list[Cell]:
    """IDP cells: each IDP prompt at every level on every target that is not a perplexity one (a text scored whole
    has no context to choose from, ``recovery.idp``) where each member of its set from the matrix has a cell of its
    own (so that IDP is set against each member alone, transfers included as the matrix runs them)."""
    planned = {(cell.compression, cell.prompt, cell.target) for cell in cells}
    return [Cell(compression, prompt, target, None, None) for prompt in config.prompts.idp_choices()
            for compression in config.compression.specs for target in config.targets
            if not target.is_perplexity and all((compression, member, target) in planned
                                                for member in artifacts_of(config, prompt))]


def _with_artifacts(config: MatrixConfig, cells: tuple[Cell, ...], soft_prompts: tuple[PromptChoice, ...]) -> Plan:
    """A plan for ``cells`` with only the prompts they apply (IDP sets' members included, and the EoRA adapter an
    EoRA + soft prompt sits on) and the checkpoints those cells and prompts need."""
    applied = {prompt for cell in cells for prompt in artifacts_of(config, cell.prompt)}
    applied |= {p.eora_base for p in applied if p.eora_base is not None}  # an EoRA + soft prompt needs its adapter
    used_prompts = tuple(p for p in soft_prompts if p in applied)
    needed = {cell.compression for cell in cells} | {p.trained_at for p in used_prompts}  # (None: of no level)
    compressed = tuple(spec for spec in config.compression.specs if spec in needed and spec != "dense")
    return Plan(config, cells, compressed, used_prompts)


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` (0 <= i < n) -> ``(i, n)``; raises ``UserError`` naming the text."""
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise UserError(f"shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2 and 1/2")
    return int(match[1]), int(match[2])


def shard_plan(plan: Plan, index: int, count: int) -> Plan:
    """Shard ``index`` of ``count``: whole (compression, prompt) groups dealt round-robin, so a shard loads
    each of its models once, with only the artifacts its cells need (a shared prompt is trained by every
    shard that applies it: shards are independent jobs)."""
    groups = list(plan.groups().values())
    cells = tuple(cell for number, group in enumerate(groups) if number % count == index for cell in group)
    return _with_artifacts(plan.config, cells, plan.soft_prompts)


def estimate_seconds(plan: Plan, parameters: int = REFERENCE_PARAMETERS) -> dict[str, float]:
    """Rough wall time of each stage on 2 CPU cores: the rates above, measured on the embedded model
    (``REFERENCE_PARAMETERS``), with time taken as proportional to the config's model's ``parameters``."""
    config = plan.config
    scale = parameters / REFERENCE_PARAMETERS
    calibration = config.compression.calibration
    compress = sum(calibration.n_windows * calibration.seqlen / CALIBRATION_TOKENS_PER_SECOND * scale
                   if Spec.parse(spec).needs_calibration else UNCALIBRATED_SECONDS * scale for spec in plan.compressed)
    training = config.prompts.soft.training
    train_tokens = training.steps * training.batch_size * training.seqlen
    eval_tokens = (training.steps // training.eval_every + 1) * training.eval_windows * training.seqlen
    trained = sum((KD_COST_FACTOR if prompt.objective == "kd" else 1.0) for prompt in plan.soft_prompts
                  if prompt.is_learned)  # controls need no training
    prompts = trained * scale * (train_tokens / TRAIN_TOKENS_PER_SECOND + eval_tokens / EVAL_TOKENS_PER_SECOND)
    fits = sum(prompt.kind == EORA for prompt in plan.soft_prompts)
    eora = fits * scale * (EORA_FIT_SECONDS + calibration.n_windows * calibration.seqlen
                           / CALIBRATION_TOKENS_PER_SECOND)
    cells = MODEL_LOAD_SECONDS * scale * len(plan.groups())
    for cell in plan.cells:
        limit = cell.target.limit or 1000
        if cell.target.is_perplexity:
            work = limit * config.ppl_seqlen / EVAL_TOKENS_PER_SECOND
        elif cell.target.is_generative:
            work = limit * generated_tokens(cell.target) * GENERATED_TOKEN_SECONDS \
                + limit * GENERATIVE_CONTEXT_TOKENS / EVAL_TOKENS_PER_SECOND
        else:
            work = limit * ITEM_SECONDS
        cells += (work + limit * idp_choice_seconds(cell)) * scale + CELL_OVERHEAD_SECONDS
    return {"compression": compress, "soft_prompts": prompts, "eora": eora, "cells": cells,
            "total": compress + prompts + eora + cells}


def idp_choice_seconds(cell: Cell) -> float:
    """Seconds per document an IDP cell spends choosing its member (0 for other cells): one context forward per
    member at ``IDP_CHOICE_FRACTION`` of an item's (multiple choice) or a context's reading (generative)."""
    if cell.prompt.members is None:
        return 0.0
    read = GENERATIVE_CONTEXT_TOKENS / EVAL_TOKENS_PER_SECOND if cell.target.is_generative else ITEM_SECONDS
    return len(cell.prompt.members) * IDP_CHOICE_FRACTION[cell.prompt.rule] * read


def generated_tokens(target: Target) -> int:
    """Tokens generated at most per item of a generative target: its ``max_gen_toks``, else lm-eval's default."""
    return target.max_gen_toks or LM_EVAL_MAX_GEN_TOKS


def describe(plan: Plan, parameters: int | None = REFERENCE_PARAMETERS) -> str:
    """The ``--dry-run`` text: the protocol (calibration, prompt training, targets), every artifact, the cells per
    compression level, and the time estimate for a model of ``parameters`` parameters (None: no estimate, the
    plan was not checked against the model)."""
    config = plan.config
    calibration, training = config.compression.calibration, config.prompts.soft.training
    built = {name: [p for p in plan.soft_prompts if p.is_learned and p.kind == name] for name in LEARNED_KINDS}
    controls = [prompt for prompt in plan.soft_prompts if prompt.control]
    eora = [prompt for prompt in plan.soft_prompts if prompt.kind == EORA]
    artifacts = [f"{len(plan.compressed)} compressed checkpoints ({', '.join(plan.compressed) or 'none'})"]
    artifacts += [f"{len(ids)} {RECOVERY_KINDS[name].label}s ({', '.join(p.id for p in ids) or 'none'})"
                  for name, ids in built.items() if ids or name == LEARNED_KINDS[0]]  # soft prompts: always said
    artifacts += [f"{len(eora)} {RECOVERY_KINDS[EORA].label}s ({', '.join(p.id for p in eora)})"] if eora else []
    artifacts += [f"{len(controls)} control prompts ({', '.join(p.id for p in controls)})"] if controls else []
    lines = [f"matrix {config.name!r}: model {config.model} ({config.dtype}, {config.device}, {config.kernels} "
             f"kernels), {len(plan.cells)} cells in {len(plan.groups())} (compression, prompt) groups",
             f"calibration: {calibration.n_windows} x {calibration.seqlen} tokens of {calibration.corpus} (train), "
             f"seed {calibration.seed}, dampening {calibration.dampening}, block {calibration.block_size}, "
             f"true-sequential {calibration.true_sequential}",
             f"artifacts: {', '.join(artifacts)}"]
    lines += [f"{RECOVERY_KINDS[name].label}s: "
              + RECOVERY_KINDS[name].describe_settings(recovery_settings(config, name), training)
              for name, ids in built.items() if ids]
    if eora:
        lines.append(f"{RECOVERY_KINDS[EORA].label}s: ranks {', '.join(map(str, config.prompts.eora.ranks))} at "
                     f"{', '.join(config.eora_levels())}, fitted in closed form (no training) on each level's "
                     f"checkpoint from the calibration windows above, as cpt-bench eora does; each is scored at its "
                     "own level only: it corrects that checkpoint's errors and does not transfer across levels"
                     + (f"; soft prompts trained on EoRA r{', r'.join(map(str, config.prompts.eora.soft))} (at "
                        f"{', '.join(config.eora_soft_levels())}) are applied with it, at that level only"
                        if config.prompts.eora.soft else ""))
    lines.append(f"targets (perplexity windows of {config.ppl_seqlen} tokens): "
                 + ", ".join(f"{t.name} ({t.metric}, limit {t.limit})" for t in config.targets))
    generated = [(t, (t.limit or 1000) * generated_tokens(t) * sum(cell.target == t for cell in plan.cells))
                 for t in config.targets if t.is_generative]
    if generated:
        lines.append("generation (greedy; apply_chat_template " + str(config.apply_chat_template).lower() + "): "
                     + ", ".join(f"{t.name} up to {tokens:,} generated tokens" for t, tokens in generated))
    if idp := [prompt for prompt in config.prompts.idp_choices() if any(cell.prompt == prompt for cell in plan.cells)]:
        lines.append("IDP prompts (one member per document, chosen from its context by the rule; not on perplexity "
                     "targets; the choice costs one context forward per member and document): "
                     + ", ".join(f"{prompt.id} ({sum(cell.prompt == prompt for cell in plan.cells)} cells)"
                                 for prompt in idp))
    for compression in config.compression.specs:
        here = [cell for cell in plan.cells if cell.compression == compression]
        prompts = list(dict.fromkeys(cell.prompt.id for cell in here))
        lines.append(f"  {compression}: {len(here)} cells; prompts {', '.join(prompts)}")
    if parameters is None:
        lines.append("not checked: the model, tasks and corpora were not looked at (--plan-only); no time estimate")
        return "\n".join(lines)
    estimate = estimate_seconds(plan, parameters)
    lines.append("checked: model, tasks, window lengths against the context, corpus lengths (as the run does first)")
    lines.append(f"estimated time on 2 CPU cores (rough: the embedded model's measured rates scaled to "
                 f"{parameters / 1e6:.0f}M parameters, time taken as proportional; a GPU is far faster): "
                 + ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in estimate.items()))
    return "\n".join(lines)
