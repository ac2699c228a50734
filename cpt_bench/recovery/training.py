"""The training loop shared by soft prompts (``soft``) and LoRA adapters (``lora``), its settings
(``SoftPromptConfig``) and its two objectives.

A ``Learner`` is what one run optimises: named float32 tensors (``params``) of a frozen model, and the embeddings
(``prompt`` [n, hidden]) inserted into every window after its lead tokens: the soft prompt itself, or nothing
([0, hidden]) for a LoRA adapter, whose tensors live inside the model. Both see the same windows: random
``seqlen``-token windows of a corpus's train split starting with the lead (``[BOS]`` when the tokenizer adds it),
AdamW with a linear schedule after warmup, gradient clipping; every ``eval_every`` steps the first
``eval_windows`` non-overlapping windows of the validation split are scored, the best tensors kept (lowest
validation loss of the run's own objective: NLL for ``lm``, KL for ``kd``, so that early stopping follows what is
optimised), and a checkpoint written atomically (resuming continues the same curve exactly).

Objectives (``SoftPromptConfig.objective``):

- ``lm``: mean next-token NLL (nats) of the window's tokens (the lead and prompt positions are not scored);
- ``kd``: mean over the window's scored positions of KL(dense || trained), from the dense model's next-token
  distribution (the ``teacher``: the uncompressed model on the same window without the prompt) to the trained
  model's. The teacher's logits are computed alongside each batch rather than cached: a cache of
  [tokens, vocab] float32 logits is 200 KB per token for a 49k vocabulary. Its forward time is recorded as
  ``teacher_seconds``; the teacher's weights are in the run's peak memory.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cpt_bench.errors import UserError
from cpt_bench.files import write_bytes_atomic
from cpt_bench.provenance import peak_memory, reset_peak_memory
from cpt_bench.recovery.position import POSITIONS
from cpt_bench.recovery.soft_init import INITIALISERS
from cpt_bench.tokens import corpus_stream

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "cpt_bench.training_checkpoint/2"  # /1 (before LoRA) held one tensor, ``prompt``
IGNORE_INDEX = -100  # label of positions that are not scored
OBJECTIVES = ("lm", "kd")
SELECTED_ON = {"lm": "val_loss", "kd": "val_kl"}  # the validation score that picks the best step, per objective
PRECISIONS = ("auto", "bf16", "fp32")
MAX_LR = 10.0  # far above any useful rate; beyond ~1e37 AdamW's step overflows float32 inside torch


class TrainingError(UserError):
    """Bad training settings or inputs (one-line message)."""


class TrainingDiverged(TrainingError):
    """The loss or gradient became NaN / inf; the best tensors so far were saved."""


class SoftPromptError(TrainingError):
    """Bad soft-prompt settings or inputs (one-line message)."""


@dataclass(frozen=True)
class SoftPromptConfig:
    """Soft-prompt training settings; defaults follow the paper except ``steps`` / ``eval_every`` (CPU scale).

    ``patience``: evaluations without a better validation loss before stopping (None: never stop early).
    ``prompt_position``: ``after_bos`` or ``first`` (``recovery.position``); None: ``after_bos`` when the
    tokenizer adds a BOS token, else ``first``.
    ``precision``: ``auto`` = bf16 autocast on a CUDA device that supports it, else fp32; ``bf16`` forces
    autocast (also on CPU); ``fp32`` disables it. ``seqlen`` and ``eval_windows`` are in tokens / windows.
    """

    n_virtual_tokens: int = 100
    init: str = "vocab"
    init_text: str | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    steps: int = 300
    batch_size: int = 2
    seqlen: int = 1024
    eval_every: int = 50
    eval_windows: int = 16
    patience: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    prompt_position: str | None = None
    objective: str = "lm"

    def __post_init__(self) -> None:
        positive = ("n_virtual_tokens", "steps", "batch_size", "seqlen", "eval_every", "eval_windows")
        for name in positive:
            self._check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        self._check(isinstance(self.lr, int | float) and 0 < self.lr <= MAX_LR, "lr",
                    f"a positive number at most {MAX_LR:g}")
        self._check(isinstance(self.max_grad_norm, int | float) and self.max_grad_norm > 0, "max_grad_norm",
                    "a positive number")
        self._check(isinstance(self.weight_decay, int | float) and self.weight_decay >= 0, "weight_decay",
                    "a number >= 0")
        self._check(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps, "warmup_steps",
                    f"an integer in [0, steps={self.steps}]")
        self._check(self.patience is None or (isinstance(self.patience, int) and self.patience > 0), "patience",
                    "a positive integer or None")
        self._check(isinstance(self.seed, int), "seed", "an integer")
        self._check(self.init in INITIALISERS, "init", f"one of {sorted(INITIALISERS)}")
        self._check(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}")
        self._check((self.init == "text") == bool(self.init_text), "init_text",
                    "given (non-empty) exactly when init is 'text'")
        self._check(self.prompt_position is None or self.prompt_position in POSITIONS, "prompt_position",
                    f"one of {list(POSITIONS)} or None (the tokenizer's default)")
        self._check(self.objective in OBJECTIVES, "objective", f"one of {list(OBJECTIVES)}")

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise SoftPromptError(f"soft prompt setting {name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class Learner:
    """One run's trainable state: ``model`` (frozen but for ``params``), ``params`` (name -> float32 parameter, on
    the model's device) and ``prompt`` [n, hidden] inserted after each window's lead (``params['prompt']`` for a soft
    prompt, an empty [0, hidden] tensor for LoRA). ``kind`` names it in logs and progress bars."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    prompt: torch.Tensor
    kind: str

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of ``params``."""
        return {name: p.detach().cpu().clone() for name, p in self.params.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])


def with_lead(windows: torch.Tensor, lead: list[int]) -> torch.Tensor:
    """``windows [k, w]`` with the ``lead`` ids in front: ``[k, len(lead) + w]``."""
    if not lead:
        return windows
    return torch.cat([torch.tensor(lead, dtype=windows.dtype).expand(windows.shape[0], -1), windows], dim=1)


def validation_windows(tokens: torch.Tensor, config: SoftPromptConfig, lead: list[int] | None = None) -> torch.Tensor:
    """The first ``eval_windows`` non-overlapping windows (fewer if the split is short): [k, seqlen].

    ``lead``: token ids starting every window (``[BOS]`` for ``after_bos``), followed by ``seqlen - len(lead)``
    text tokens.
    """
    lead = lead or []
    width = config.seqlen - len(lead)
    count = min(config.eval_windows, tokens.numel() // width)
    if count == 0:
        raise TrainingError(f"validation text of {tokens.numel()} tokens is shorter than one window of {width}")
    return with_lead(tokens[: count * width].view(count, width), lead)


def _prompted_embeddings(model: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, n_lead: int) -> torch.Tensor:
    """Input embeddings [batch, n + seqlen, hidden]: the first ``n_lead`` tokens', ``prompt`` [n, hidden], the rest."""
    embeds = model.get_input_embeddings()(ids)
    prompt = prompt.to(embeds.dtype).expand(ids.shape[0], -1, -1)
    return torch.cat([embeds[:, :n_lead], prompt, embeds[:, n_lead:]], dim=1)


def prompted_loss(model: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, n_lead: int = 0) -> torch.Tensor:
    """Mean next-token NLL (nats) of ``ids`` [batch, seqlen] with ``prompt`` [n, hidden] inserted after the first
    ``n_lead`` tokens (0: before every token; 1: after BOS); the prompt and those tokens are never scored."""
    batch, n_prompt = ids.shape[0], prompt.shape[0]
    unscored = torch.full((batch, n_lead + n_prompt), IGNORE_INDEX, device=ids.device)
    return model(inputs_embeds=_prompted_embeddings(model, prompt, ids, n_lead),
                 labels=torch.cat([unscored, ids[:, n_lead:]], dim=1)).loss


def kd_loss(model: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, n_lead: int,
            teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) in nats per position, over the next-token predictions of tokens ``max(n_lead, 1)``
    .. ``seqlen - 1`` of ``ids`` [batch, seqlen] (those both models predict: the teacher reads no prompt, so it has
    no prediction for a window's first token). ``teacher_logits`` [batch, seqlen, vocab]: the dense model on ``ids``.
    """
    n_prompt, seqlen = prompt.shape[0], ids.shape[1]
    start = max(n_lead, 1)
    # Token j is at position j + n_prompt of the prompted sequence (j >= n_lead), predicted from the one before.
    logits = model(inputs_embeds=_prompted_embeddings(model, prompt, ids, n_lead)).logits
    student = logits[:, n_prompt + start - 1: n_prompt + seqlen - 1].float().log_softmax(-1)
    teacher = teacher_logits[:, start - 1: seqlen - 1].float().log_softmax(-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for ``precision`` ``bf16``, or ``auto`` on a CUDA device that supports it; else disabled."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Teacher:
    """The dense model of a ``kd`` run and the seconds its forwards took so far."""

    model: torch.nn.Module
    seconds: float = 0.0

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seqlen, vocab] next-token logits of the dense model on ``ids`` (no gradient)."""
        started = time.perf_counter()
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.model.get_input_embeddings().weight.device)).logits
        self.seconds += time.perf_counter() - started
        return logits.to(ids.device)


def objective_loss(learner: Learner, ids: torch.Tensor, n_lead: int, objective: str,
                   teacher: Teacher | None) -> torch.Tensor:
    """The training loss of ``objective`` on a batch ``ids`` [batch, seqlen]."""
    if objective == "kd":
        return kd_loss(learner.model, learner.prompt, ids, n_lead, teacher.logits(ids))
    return prompted_loss(learner.model, learner.prompt, ids, n_lead)


def validation_scores(learner: Learner, windows: torch.Tensor, config: SoftPromptConfig, n_lead: int,
                      teacher: Teacher | None = None) -> dict[str, float]:
    """``val_loss``: mean token NLL (nats) over ``windows`` [k, seqlen] (exp: the token perplexity) and, with a
    ``teacher``, ``val_kl``: the mean KL(dense || trained) per position that ``kd`` optimises."""
    device = learner.prompt.device
    nll = kl = 0.0
    with torch.no_grad(), autocast(device, config.precision):
        for batch in windows.split(config.batch_size):
            batch = batch.to(device)
            size = batch.shape[0]
            nll += prompted_loss(learner.model, learner.prompt, batch, n_lead).item() * size
            if teacher is not None:
                kl += kd_loss(learner.model, learner.prompt, batch, n_lead, teacher.logits(batch)).item() * size
    scores = {"val_loss": nll / windows.shape[0]}
    return scores | ({"val_kl": kl / windows.shape[0]} if teacher is not None else {})


@dataclass
class _State:
    """Everything a resumed run needs to continue the same curve."""

    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    best: dict[str, torch.Tensor]
    curve: list[dict[str, float]] = field(default_factory=list)
    best_score: float = math.inf  # the objective's validation loss at ``best_step``
    best_step: int = 0
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    teacher_seconds: float = 0.0


_SAVED_FIELDS = ("step", "curve", "best", "best_score", "best_step", "evals_without_improvement", "train_seconds",
                 "teacher_seconds")


def _new_state(learner: Learner, config: SoftPromptConfig, lr: float) -> _State:
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(list(learner.params.values()), lr=lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    return _State(0, optimizer, scheduler, torch.Generator().manual_seed(config.seed), learner.snapshot())


def _save_checkpoint(path: Path, state: _State, learner: Learner, settings: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "settings": settings, "params": learner.snapshot(),
               "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
               "generator": state.generator.get_state(), **{name: getattr(state, name) for name in _SAVED_FIELDS}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _load_checkpoint(path: Path, learner: Learner, config: SoftPromptConfig, lr: float,
                     settings: dict[str, Any]) -> _State:
    if not path.is_file():
        raise TrainingError(f"cannot resume: no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"cannot resume {path}: written by an older cpt_bench (format "
                            f"{payload.get('format', 'cpt_bench.training_checkpoint/1')!r}, expected "
                            f"{CHECKPOINT_FORMAT!r}); delete it to train from the start")
    changed = sorted(name for name in settings.keys() | payload["settings"].keys()
                     if payload["settings"].get(name) != settings.get(name))
    if changed:
        raise TrainingError(f"cannot resume {path}: settings differ from the checkpoint's ({', '.join(changed)})")
    learner.load(payload["params"])
    state = _new_state(learner, config, lr)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.generator.set_state(payload["generator"])
    for name in _SAVED_FIELDS:
        setattr(state, name, payload[name])
    return state


def _train_step(learner: Learner, state: _State, tokens: torch.Tensor, config: SoftPromptConfig, lead: list[int],
                teacher: Teacher | None) -> float:
    """One optimizer step on a random batch of windows (``lead`` ids, then text tokens); returns the loss (NaN /
    inf when it diverged)."""
    width = config.seqlen - len(lead)
    starts = torch.randint(0, tokens.numel() - width + 1, (config.batch_size,), generator=state.generator)
    ids = with_lead(torch.stack([tokens[s: s + width] for s in starts.tolist()]), lead).to(learner.prompt.device)
    with autocast(learner.prompt.device, config.precision):
        loss = objective_loss(learner, ids, len(lead), config.objective, teacher)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(learner.params.values()), config.max_grad_norm)
    for value in (loss, grad_norm):
        if not torch.isfinite(value):
            return value.item()
    state.optimizer.step()
    state.scheduler.step()
    return loss.item()


def _evaluate(learner: Learner, state: _State, windows: torch.Tensor, config: SoftPromptConfig,
              train_losses: list[float], n_lead: int, teacher: Teacher | None) -> dict[str, float]:
    """Score the validation windows, append to the curve, keep the best tensors; returns the curve entry."""
    scores = validation_scores(learner, windows, config, n_lead, teacher)
    record = {"step": state.step, **scores, "val_ppl": math.exp(scores["val_loss"]),
              "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
              "lr": state.scheduler.get_last_lr()[0]}
    state.curve.append(record)
    score = scores[SELECTED_ON[config.objective]]
    if not all(math.isfinite(value) for value in scores.values()):
        return record
    if score < state.best_score:
        state.best_score, state.best_step, state.evals_without_improvement = score, state.step, 0
        state.best = learner.snapshot()
    else:
        state.evals_without_improvement += 1
    return record


def trained_improved(meta: dict) -> bool:
    """Whether a trained artifact (its metadata) beat its initialisation: a best validation loss after step 0.

    One that never did is its initialisation, stored under a trained artifact's name. Metadata written before
    ``improved`` was recorded is judged by its best step (the same test).
    """
    return meta.get("improved", meta["best"]["step"] > 0)


@dataclass(frozen=True)
class TrainingRun:
    """What one run needs besides the learner: settings, data, where to write, and how to save the result.

    ``lr``: the learning rate (``config.lr`` unless a LoRA adapter sets its own); ``settings``: every setting as
    plain data (checked on resume, recorded as ``hyperparameters``); ``save(best, record) -> folder`` writes the
    artifact from the best tensors and the training record; ``description``: what is trained (``soft prompt``);
    ``model``: what it is trained on, for messages (``model 'embedded' (gptq-w3g64)``).
    """

    config: SoftPromptConfig
    lr: float
    settings: dict[str, Any]
    source: str
    out_dir: Path
    lead: list[int]
    save: Callable[[dict[str, torch.Tensor], dict[str, Any]], Path]
    description: str
    model: str


def train_learner(learner: Learner, tokenizer, run: TrainingRun, *, resume: bool = False,
                  teacher: torch.nn.Module | None = None,
                  on_eval: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Train ``learner`` on ``run.source`` and save the best tensors through ``run.save``; returns its folder.

    ``out_dir`` receives ``checkpoint.pt`` after every evaluation. The training record given to ``save`` holds the
    source and its token counts, the settings, curve, best step / loss / perplexity, ``improved`` (false, with a
    warning, when no evaluation after step 0 beat the initial tensors, which are then what is saved), how it
    stopped, ``train_seconds`` (teacher forwards included), ``teacher_seconds``, ``trainable_parameters`` and the
    training's ``peak_memory_bytes`` (this session's). ``teacher``: the dense model, required for ``kd``.
    Raises ``TrainingDiverged`` (after saving the best so far) when the loss becomes NaN / inf, and
    ``TrainingError`` when it is not finite even before training (a broken model or compression).
    """
    config, lead = run.config, run.lead
    if (config.objective == "kd") != (teacher is not None):
        raise ValueError(f"objective {config.objective!r} with{'out' if teacher is None else ''} a teacher model")
    reset_peak_memory()
    teacher = Teacher(teacher.eval()) if teacher is not None else None
    train_tokens = corpus_stream(run.source, "train", tokenizer).ids
    if train_tokens.numel() < config.seqlen:
        raise TrainingError(f"train split of {run.source!r} has {train_tokens.numel()} tokens, fewer than seqlen "
                            f"{config.seqlen}")
    windows = validation_windows(corpus_stream(run.source, "validation", tokenizer).ids, config, lead)
    checkpoint = run.out_dir / CHECKPOINT

    def finish(stopped: str) -> Path:
        chosen = next(r for r in reversed(state.curve) if r["step"] == state.best_step)
        best = {key: chosen[key] for key in ("step", "val_loss", "val_ppl", "val_kl") if key in chosen}
        best["selected_on"] = SELECTED_ON[config.objective]
        record = {"source": {"corpus": run.source, "train_tokens": train_tokens.numel(),
                             "validation_tokens": windows.numel()},
                  "hyperparameters": run.settings, "curve": state.curve, "best": best,
                  "improved": state.best_step > 0, "stopped": stopped, "train_seconds": state.train_seconds,
                  "teacher_seconds": state.teacher_seconds, "trainable_parameters": learner.n_trainable,
                  "tokens_seen": state.step * config.batch_size * config.seqlen, **peak_memory()}
        if not record["improved"]:
            log.warning("%s on %s never beat its initialisation in %d steps: the saved one is the untrained one "
                        "(validation ppl %.2f at step 0); raise lr or steps", run.description, run.source,
                        state.step, best["val_ppl"])
        return run.save(state.best, record)

    def stop_diverged(what: str) -> None:
        state.curve = [r for r in state.curve if math.isfinite(r[SELECTED_ON[config.objective]])]
        folder = finish("diverged")
        raise TrainingDiverged(f"training diverged at step {state.step} ({what}); kept the best {run.description} "
                               f"so far (step {state.best_step}) in {folder}")

    if resume:
        state = _load_checkpoint(checkpoint, learner, config, run.lr, run.settings)
    else:
        state = _new_state(learner, config, run.lr)
        initial = _evaluate(learner, state, windows, config, [], len(lead), teacher)[SELECTED_ON[config.objective]]
        if not math.isfinite(initial):
            raise TrainingError(f"the validation loss before any training is {initial}: {run.model} computes "
                                f"non-finite values, so no {run.description} can be trained on it")
        _save_checkpoint(checkpoint, state, learner, run.settings)
    progress = tqdm(total=config.steps, initial=state.step, desc=run.description, unit="step")
    progress.set_postfix(val_ppl=f"{state.curve[-1]['val_ppl']:.2f}")
    train_losses: list[float] = []
    stopped = "completed"
    while state.step < config.steps:
        started, teacher_before = time.perf_counter(), teacher.seconds if teacher else 0.0
        loss = _train_step(learner, state, train_tokens, config, lead, teacher)
        state.step += 1
        if not math.isfinite(loss):
            stop_diverged(f"the training loss or gradient is {loss}")
        train_losses.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{state.curve[-1]['val_ppl']:.2f}")
        evaluate = state.step % config.eval_every == 0 or state.step == config.steps
        if evaluate:
            record = _evaluate(learner, state, windows, config, train_losses, len(lead), teacher)
            if not math.isfinite(record[SELECTED_ON[config.objective]]):
                stop_diverged(f"the validation loss is {record[SELECTED_ON[config.objective]]}")
            train_losses = []
        state.train_seconds += time.perf_counter() - started
        state.teacher_seconds += (teacher.seconds - teacher_before) if teacher else 0.0
        if evaluate:
            _save_checkpoint(checkpoint, state, learner, run.settings)
            progress.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{record['val_ppl']:.2f}")
            if on_eval:
                on_eval(record)
            if config.patience and state.evals_without_improvement >= config.patience:
                stopped = "early_stopping"
                log.info("stopping early at step %d: %d evaluations without improvement", state.step, config.patience)
                break
    progress.close()
    return finish(stopped)
