"""Soft-prompt learning on a frozen (possibly compressed) causal LM, as in the paper's code.

The prompt is a ``[n_virtual_tokens, hidden_size]`` float32 parameter inserted into every window as input
embeddings (the space the model's embedding layer outputs), at ``prompt_position`` (``prompts.position``):
before the window (``first``) or after its leading BOS token (``after_bos``, the default when the tokenizer adds
BOS: windows then start with BOS). The prompt's positions (and the BOS token's) carry label -100, so only the
window's tokens are scored (the first one conditioned on the prompt alone). Training uses random
``seqlen``-token windows of a corpus's train split, AdamW with a linear schedule after warmup and gradient
clipping; every ``eval_every`` steps the token perplexity of the first ``eval_windows`` non-overlapping windows
of the validation split is measured, the best prompt kept, and a checkpoint written atomically (``resume``
continues the same curve exactly).

Why our own loop rather than PEFT's PromptTuning model: PEFT's initialisations (RANDOM, TEXT,
SAMPLE_VOCAB) lack the paper's "first n rows of the embedding matrix", and training a plain tensor
keeps the forward identical to the one ``cpt_bench.lmeval.adapter`` evaluates (prompt embeddings
inserted among the token embeddings), with checkpoints free of PEFT's state-dict naming and no
wrapping of compressed models. A prompt trained ``first`` is interchangeable with PEFT: ``artifact.export_peft``
writes a PromptTuning adapter, and the tests check both score identically.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cpt_bench.errors import UserError
from cpt_bench.files import write_bytes_atomic
from cpt_bench.prompts.artifact import save_prompt
from cpt_bench.prompts.position import META_KEY, POSITIONS, lead_ids, resolve_position
from cpt_bench.prompts.target import describe_target
from cpt_bench.tokens import corpus_stream

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
IGNORE_INDEX = -100  # label of positions that are not scored
PRECISIONS = ("auto", "bf16", "fp32")
MAX_LR = 10.0  # far above any useful rate; beyond ~1e37 AdamW's step overflows float32 inside torch


class SoftPromptError(UserError):
    """Bad soft-prompt settings or inputs (one-line message)."""


class TrainingDiverged(SoftPromptError):
    """The loss or gradient became NaN / inf; the best prompt so far was saved."""


def _init_vocab(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """The embeddings of the first ``n`` token ids (the paper's code: the first rows of the embedding matrix)."""
    return weight[:n].clone()


def _init_sample(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """The embeddings of ``n`` token ids drawn uniformly at random (with replacement, seeded)."""
    return weight[torch.randint(0, weight.shape[0], (n,), generator=generator)].clone()


def _init_text(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """Embeddings of the text's tokens, repeated or cut to ``n`` rows."""
    repeats = math.ceil(n / len(token_ids))
    return weight[torch.tensor((token_ids * repeats)[:n])].clone()


def _init_random(weight: torch.Tensor, n: int, generator: torch.Generator, token_ids: list[int]) -> torch.Tensor:
    """Gaussian rows with the token embeddings' standard deviation (seeded)."""
    return torch.randn(n, weight.shape[1], generator=generator) * weight.std()


# Each: (the embedding of every token id [vocab, hidden] float32 CPU, n, seeded generator, init_text token ids)
# -> [n, hidden]. Embeddings are the embedding layer's outputs, the space prompts live in: Gemma's layer scales
# its weight rows by sqrt(hidden_size), so raw rows would be off by that factor.
INITIALISERS: dict[str, Callable[[torch.Tensor, int, torch.Generator, list[int]], torch.Tensor]] = {
    "vocab": _init_vocab, "sample": _init_sample, "text": _init_text, "random": _init_random}


@dataclass(frozen=True)
class SoftPromptConfig:
    """Soft-prompt training settings; defaults follow the paper except ``steps`` / ``eval_every`` (CPU scale).

    ``patience``: evaluations without a better validation loss before stopping (None: never stop early).
    ``prompt_position``: ``after_bos`` or ``first`` (``prompts.position``); None: ``after_bos`` when the
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

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise SoftPromptError(f"soft prompt setting {name} must be {expected}, got {getattr(self, name)!r}")


def token_embeddings(model: torch.nn.Module, chunk: int = 8192) -> torch.Tensor:
    """The embedding layer's output for every token id, ``[vocab, hidden]`` float32 on CPU (computed ``chunk``
    ids at a time on the model's device); equal to the embedding matrix except where the layer scales it."""
    embedding = model.get_input_embeddings()
    ids = torch.arange(embedding.weight.shape[0], device=embedding.weight.device)
    with torch.no_grad():
        return torch.cat([embedding(part).to("cpu", torch.float32) for part in ids.split(chunk)])


def initial_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig) -> torch.Tensor:
    """The untrained prompt [n_virtual_tokens, hidden] float32 on CPU, per ``config.init`` and ``config.seed``."""
    weight = token_embeddings(model)
    if config.init == "vocab" and config.n_virtual_tokens > weight.shape[0]:
        raise SoftPromptError(f"init 'vocab' needs n_virtual_tokens <= vocabulary size {weight.shape[0]}")
    token_ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"] if config.init == "text" else []
    if config.init == "text" and not token_ids:
        raise SoftPromptError(f"init_text {config.init_text!r} has no tokens")
    generator = torch.Generator().manual_seed(config.seed)
    return INITIALISERS[config.init](weight, config.n_virtual_tokens, generator, token_ids)


def validation_windows(tokens: torch.Tensor, config: SoftPromptConfig, lead: list[int] | None = None) -> torch.Tensor:
    """The first ``eval_windows`` non-overlapping windows (fewer if the split is short): [k, seqlen].

    ``lead``: token ids starting every window (``[BOS]`` for ``after_bos``), followed by ``seqlen - len(lead)``
    text tokens.
    """
    lead = lead or []
    width = config.seqlen - len(lead)
    count = min(config.eval_windows, tokens.numel() // width)
    if count == 0:
        raise SoftPromptError(f"validation text of {tokens.numel()} tokens is shorter than one window of {width}")
    return _with_lead(tokens[: count * width].view(count, width), lead)


def _with_lead(windows: torch.Tensor, lead: list[int]) -> torch.Tensor:
    """``windows [k, w]`` with the ``lead`` ids in front: ``[k, len(lead) + w]``."""
    if not lead:
        return windows
    return torch.cat([torch.tensor(lead, dtype=windows.dtype).expand(windows.shape[0], -1), windows], dim=1)


def prompted_loss(model: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, n_lead: int = 0) -> torch.Tensor:
    """Mean next-token NLL (nats) of ``ids`` [batch, seqlen] with ``prompt`` [n, hidden] inserted after the first
    ``n_lead`` tokens (0: before every token; 1: after BOS); the prompt and those tokens are never scored."""
    batch, n_prompt = ids.shape[0], prompt.shape[0]
    embeds = model.get_input_embeddings()(ids)
    embeds = torch.cat([embeds[:, :n_lead], prompt.to(embeds.dtype).expand(batch, -1, -1), embeds[:, n_lead:]], dim=1)
    unscored = torch.full((batch, n_lead + n_prompt), IGNORE_INDEX, device=ids.device)
    return model(inputs_embeds=embeds, labels=torch.cat([unscored, ids[:, n_lead:]], dim=1)).loss


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def validation_loss(model: torch.nn.Module, prompt: torch.Tensor, windows: torch.Tensor,
                    config: SoftPromptConfig, n_lead: int = 0) -> float:
    """Mean token NLL (nats) over ``windows`` [k, seqlen] (their first ``n_lead`` tokens before the prompt, not
    scored); exp of it is the token perplexity."""
    device = prompt.device
    total = 0.0
    with torch.no_grad(), _autocast(device, config.precision):
        for batch in windows.split(config.batch_size):
            total += prompted_loss(model, prompt, batch.to(device), n_lead).item() * batch.shape[0]
    return total / windows.shape[0]


@dataclass
class _State:
    """Everything a resumed run needs to continue the same curve."""

    step: int
    prompt: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    curve: list[dict[str, float]]
    best_prompt: torch.Tensor
    best_val_loss: float
    best_step: int
    evals_without_improvement: int = 0
    train_seconds: float = 0.0


def _new_state(prompt: torch.Tensor, config: SoftPromptConfig, device: torch.device) -> _State:
    from transformers import get_linear_schedule_with_warmup

    param = torch.nn.Parameter(prompt.to(device, torch.float32))
    optimizer = torch.optim.AdamW([param], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    return _State(0, param, optimizer, scheduler, generator, [], prompt.detach().cpu().clone(), math.inf, 0)


def _save_checkpoint(path: Path, state: _State, config: SoftPromptConfig) -> None:
    payload = {"config": asdict(config), "step": state.step, "prompt": state.prompt.detach().cpu(),
               "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
               "generator": state.generator.get_state(), "curve": state.curve, "best_prompt": state.best_prompt,
               "best_val_loss": state.best_val_loss, "best_step": state.best_step,
               "evals_without_improvement": state.evals_without_improvement, "train_seconds": state.train_seconds}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _load_checkpoint(path: Path, config: SoftPromptConfig, device: torch.device) -> _State:
    if not path.is_file():
        raise SoftPromptError(f"cannot resume: no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    changed = [f.name for f in fields(config) if payload["config"].get(f.name) != getattr(config, f.name)]
    if changed:
        raise SoftPromptError(f"cannot resume {path}: settings differ from the checkpoint's ({', '.join(changed)})")
    state = _new_state(payload["prompt"], config, device)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.generator.set_state(payload["generator"])
    for name in ("step", "curve", "best_prompt", "best_val_loss", "best_step", "evals_without_improvement",
                 "train_seconds"):
        setattr(state, name, payload[name])
    return state


def _train_step(model: torch.nn.Module, state: _State, tokens: torch.Tensor, config: SoftPromptConfig,
                lead: list[int]) -> float:
    """One optimizer step on a random batch of windows (``lead`` ids, then text tokens); returns the loss (NaN /
    inf when it diverged)."""
    width = config.seqlen - len(lead)
    starts = torch.randint(0, tokens.numel() - width + 1, (config.batch_size,), generator=state.generator)
    ids = _with_lead(torch.stack([tokens[s: s + width] for s in starts.tolist()]), lead).to(state.prompt.device)
    with _autocast(state.prompt.device, config.precision):
        loss = prompted_loss(model, state.prompt, ids, len(lead))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([state.prompt], config.max_grad_norm)
    for value in (loss, grad_norm):
        if not torch.isfinite(value):
            return value.item()
    state.optimizer.step()
    state.scheduler.step()
    return loss.item()


def _evaluate(model: torch.nn.Module, state: _State, windows: torch.Tensor, config: SoftPromptConfig,
              train_losses: list[float], n_lead: int) -> dict[str, float]:
    """Measure validation loss, append to the curve, keep the best prompt; returns the curve entry."""
    val_loss = validation_loss(model, state.prompt.detach(), windows, config, n_lead)
    record = {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
              "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
              "lr": state.scheduler.get_last_lr()[0]}
    state.curve.append(record)
    if not math.isfinite(val_loss):
        return record
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
        state.best_prompt = state.prompt.detach().cpu().clone()
    else:
        state.evals_without_improvement += 1
    return record


def _stop_diverged(state: _State, finish: Callable[[str], Path], what: str) -> None:
    """Save the best prompt so far (the last checkpoint stays as it was) and raise ``TrainingDiverged``."""
    state.curve = [r for r in state.curve if math.isfinite(r["val_loss"])]
    folder = finish("diverged")
    raise TrainingDiverged(f"training diverged at step {state.step} ({what}); kept the best prompt so far "
                           f"(step {state.best_step}) in {folder}")


def prompt_improved(meta: dict) -> bool:
    """Whether a trained prompt (its ``prompt.json``) beat its initialisation: a best validation loss after step 0.

    A prompt that never did is its initialisation, stored under a trained prompt's name. ``prompt.json`` files
    written before ``improved`` was recorded are judged by their best step (the same test).
    """
    return meta.get("improved", meta["best"]["step"] > 0)


def train_soft_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, source: str, out_dir: Path, *,
                      model_name: str, compression: str = "dense", resume: bool = False,
                      on_eval: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Learn a soft prompt for the frozen ``model`` on corpus ``source``; write the artifact to ``out_dir``.

    ``out_dir`` receives ``checkpoint.pt`` after every evaluation and, at the end, ``prompt.safetensors``
    + ``prompt.json`` holding the best prompt (see ``artifact``); ``prompt.json``'s ``improved`` is false, and a
    warning is logged, when no evaluation after step 0 beat the initial prompt (which is then what is saved).
    ``resume`` continues from the checkpoint with identical settings. ``on_eval(record)`` is called after each
    evaluation and checkpoint.
    Raises ``TrainingDiverged`` (after saving the best prompt so far) when the loss becomes NaN / inf, and
    ``SoftPromptError`` when it is not finite even before training (a broken model or compression).
    """
    out_dir = Path(out_dir)
    for param in model.parameters():
        param.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    position = resolve_position(config.prompt_position, tokenizer)
    lead = lead_ids(position, tokenizer)
    train_tokens = corpus_stream(source, "train", tokenizer).ids
    if train_tokens.numel() < config.seqlen:
        raise SoftPromptError(f"train split of {source!r} has {train_tokens.numel()} tokens, fewer than seqlen "
                              f"{config.seqlen}")
    windows = validation_windows(corpus_stream(source, "validation", tokenizer).ids, config, lead)
    target = describe_target(model, tokenizer, model_name) | {META_KEY: position}  # saved into prompt.json

    def finish(stopped: str) -> Path:
        best = {"step": state.best_step, "val_loss": state.best_val_loss, "val_ppl": math.exp(state.best_val_loss)}
        training = {"source": {"corpus": source, "train_tokens": train_tokens.numel(),
                               "validation_tokens": windows.numel()},
                    "hyperparameters": asdict(config), "curve": state.curve, "best": best,
                    "improved": state.best_step > 0, "stopped": stopped, "train_seconds": state.train_seconds}
        if not training["improved"]:
            log.warning("soft prompt on %s (%s) never beat its initialisation in %d steps: the saved prompt is the "
                        "untrained one (validation ppl %.2f at step 0); raise lr or steps", source, compression,
                        state.step, best["val_ppl"])
        return save_prompt(out_dir, state.best_prompt, target, compression, training)

    if resume:
        state = _load_checkpoint(out_dir / CHECKPOINT, config, device)
    else:
        state = _new_state(initial_prompt(model, tokenizer, config), config, device)
        initial = _evaluate(model, state, windows, config, [], len(lead))["val_loss"]
        if not math.isfinite(initial):
            raise SoftPromptError(f"the validation loss before any training is {initial}: model {model_name!r} "
                                  f"({compression}) computes non-finite values, so no prompt can be trained on it")
        _save_checkpoint(out_dir / CHECKPOINT, state, config)
    progress = tqdm(total=config.steps, initial=state.step, desc="soft prompt", unit="step")
    progress.set_postfix(val_ppl=f"{state.curve[-1]['val_ppl']:.2f}")
    train_losses: list[float] = []
    stopped = "completed"
    while state.step < config.steps:
        started = time.perf_counter()
        loss = _train_step(model, state, train_tokens, config, lead)
        state.step += 1
        if not math.isfinite(loss):
            _stop_diverged(state, finish, f"the training loss or gradient is {loss}")
        train_losses.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{state.curve[-1]['val_ppl']:.2f}")
        if state.step % config.eval_every == 0 or state.step == config.steps:
            record = _evaluate(model, state, windows, config, train_losses, len(lead))
            if not math.isfinite(record["val_loss"]):
                _stop_diverged(state, finish, f"the validation loss is {record['val_loss']}")
            train_losses = []
            state.train_seconds += time.perf_counter() - started
            _save_checkpoint(out_dir / CHECKPOINT, state, config)
            progress.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{record['val_ppl']:.2f}")
            if on_eval:
                on_eval(record)
            if config.patience and state.evals_without_improvement >= config.patience:
                stopped = "early_stopping"
                log.info("stopping early at step %d: %d evaluations without improvement", state.step, config.patience)
                break
        else:
            state.train_seconds += time.perf_counter() - started
    progress.close()
    return finish(stopped)
