"""Soft-prompt learning on a frozen (possibly compressed) causal LM, as in the paper's code.

The prompt is a ``[n_virtual_tokens, hidden_size]`` float32 parameter inserted into every window as input
embeddings (the space the model's embedding layer outputs), at ``prompt_position`` (``prompts.position``):
before the window (``first``) or after its leading BOS token (``after_bos``, the default when the tokenizer adds
BOS: windows then start with BOS). The prompt's positions (and the BOS token's) are not scored, so only the
window's tokens are (the first one conditioned on the prompt alone). ``SoftPromptConfig`` holds the training
settings, which LoRA adapters share (``lora``); the loop, its objectives (``lm``, ``kd``), validation and
checkpoints are ``training``'s.

Why our own loop rather than PEFT's PromptTuning model: PEFT's initialisations (RANDOM, TEXT,
SAMPLE_VOCAB) lack the paper's "first n rows of the embedding matrix", and training a plain tensor
keeps the forward identical to the one ``cpt_bench.lmeval.adapter`` evaluates (prompt embeddings
inserted among the token embeddings), with checkpoints free of PEFT's state-dict naming and no
wrapping of compressed models. A prompt trained ``first`` is interchangeable with PEFT: ``artifact.export_peft``
writes a PromptTuning adapter, and the tests check both score identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cpt_bench.files import OutputKind
from cpt_bench.prompts.artifact import FORMAT, METADATA, save_prompt
from cpt_bench.prompts.position import META_KEY, POSITIONS, lead_ids, resolve_position
from cpt_bench.prompts.target import describe_target
from cpt_bench.prompts.training import CHECKPOINT, OBJECTIVES, Learner, TrainingError, TrainingRun, train_learner

PRECISIONS = ("auto", "bf16", "fp32")
# ``prompt train --out``: a folder of an earlier prompt (retrained in place), or one holding only the checkpoint of a
# run cut short, is its own output
SOFT_PROMPT_KIND = OutputKind("a soft prompt folder", METADATA, (("format", FORMAT),), ignored=(CHECKPOINT,))
MAX_LR = 10.0  # far above any useful rate; beyond ~1e37 AdamW's step overflows float32 inside torch


class SoftPromptError(TrainingError):
    """Bad soft-prompt settings or inputs (one-line message)."""


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


def train_soft_prompt(model: torch.nn.Module, tokenizer, config: SoftPromptConfig, source: str, out_dir: Path, *,
                      model_name: str, compression: str = "dense", resume: bool = False,
                      teacher: torch.nn.Module | None = None,
                      on_eval: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Learn a soft prompt for the frozen ``model`` on corpus ``source``; write the artifact to ``out_dir``.

    ``out_dir`` receives ``checkpoint.pt`` after every evaluation and, at the end, ``prompt.safetensors``
    + ``prompt.json`` holding the best prompt (see ``artifact``) with the training record (``training.train_learner``).
    ``resume`` continues from the checkpoint with identical settings; ``teacher``: the dense model, for objective
    ``kd``; ``on_eval(record)`` is called after each evaluation and checkpoint.
    Raises ``TrainingDiverged`` (after saving the best prompt so far) when the loss becomes NaN / inf, and
    ``TrainingError`` when it is not finite even before training (a broken model or compression).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    position = resolve_position(config.prompt_position, tokenizer)
    target = describe_target(model, tokenizer, model_name) | {META_KEY: position}  # saved into prompt.json
    prompt = torch.nn.Parameter(initial_prompt(model, tokenizer, config).to(device, torch.float32))
    learner = Learner(model, {"prompt": prompt}, prompt, "soft prompt")

    def save(best: dict[str, torch.Tensor], record: dict) -> Path:
        return save_prompt(Path(out_dir), best["prompt"], target, compression, record)

    run = TrainingRun(config, config.lr, asdict(config), source, Path(out_dir), lead_ids(position, tokenizer), save,
                      "soft prompt", f"model {model_name!r} ({compression})")
    return train_learner(learner, tokenizer, run, resume=resume, teacher=teacher, on_eval=on_eval)
