"""The ``cpt`` model for lm-eval: Hugging Face's HFLM plus cpt_bench model names, prompts and compression.

``pretrained=embedded`` resolves to the cached embedded default model, so lm-eval command lines need no
cache path. Registered under the name ``cpt`` when this module is imported (``cpt-lm-eval`` does that,
since lm-eval has no plugin discovery). Extra model_args:

- ``soft_prompt=DIR``: a prompt folder (``cpt_bench.recovery.artifact``), checked against the model;
  ``allow_cross_model=true`` accepts one trained for another model / tokenizer of the same hidden size.
- ``hard_prompt=NAME|text:TEXT|file:PATH``: a registered text prompt, literal text or a UTF-8 file
  (``cpt_bench.recovery.hard``; a text with commas goes in a file: lm-eval splits model_args on commas).
- ``lora=DIR``: a LoRA folder (``cpt_bench.recovery.lora``: a PEFT adapter with our ``lora.json``, checked against
  the model like a prompt, or any PEFT LoRA folder, shape-checked, with what cannot be verified recorded), applied
  unmerged on top of the (compressed) model, as plain lm-eval's ``hf`` model applies ``peft=DIR`` (which gives the
  same scores where the model's vocabulary size equals the tokenizer's: otherwise HFLM resizes the embeddings
  first). Not combined with a prompt.
- ``eora=DIR``: an EoRA folder (``cpt_bench.recovery.eora``), applied like ``lora=`` on the checkpoint it was fitted
  on; it may be combined with one prompt (``soft_prompt=`` or ``hard_prompt=``; not ``idp=``), placed before every
  request of the corrected model (the prompt block then records the correction under ``corrected_by``).
- ``prefix_cache=true|false`` (default true): compute the prompt's key/value cache once and reuse it
  for every batch, or concatenate the prompt embeddings to every batch (generation with sliding-window layers
  always concatenates: ``lmeval.generation``).
- ``prompt_position=after_bos|first`` (``cpt_bench.recovery.position``): where the prompt sits. A soft prompt sits
  where it was trained (its ``prompt.json``; a different value is refused); a hard prompt by default after BOS
  when the tokenizer adds one, else first.
- ``compression=SPEC|DIR``: evaluate the model as compressed (``cpt_bench.models.load_model``; a spec is
  compressed with the default calibration and cached on first use, a folder must be a checkpoint of this very
  model from ``cpt-bench compress --out`` or a GPTQ folder written elsewhere, ``compress.gptq_import``);
  ``compression_mode=simulated|real`` (default simulated: dequantized weights).
- ``device``: as lm-eval's ``hf`` model: CUDA when available, else the CPU, also for lm-eval's default ``cuda:0``.

Bad model_args (an unknown name, both prompts, an empty one, a flag that is not true / false, an unknown mode, a
missing or damaged prompt folder) are refused before any weight loads, and a model that is missing or not a
causal LM before HFLM loads it, all with one-line errors that ``cpt-lm-eval`` prints as one line.

The prompt is never scored: logits are returned for the request positions only. With ``first`` it precedes
every request's tokens (as lm-eval encoded them, prefix / BOS token included). With ``after_bos`` the model
reads BOS, the prompt, then the request without its first token when that is BOS (lm-eval starts requests with
it when the tokenizer adds one), or the whole request when it is not (a rolling window past the first): the
*prefix* (BOS embedding + prompt) is the same for every request, so its key/value cache is computed once, and the
logits at the BOS position of a request are the prefix's last logits. ``max_length`` (given or the model's)
is the whole context, prefix included; lm-eval sees ``max_length - prefix length`` so its windows and
truncation leave room for the prefix. lm-eval right-pads loglikelihood batches, so padding sits after
every real token and an all-ones attention mask over prefix + inputs is exact for the real tokens;
positions continue after the prefix (the model derives them from the cache length / mask).

Generation (``generate_until``) with a prompt is ``lmeval.generation``'s: the same prefix (and its cache, where the
model's layers allow continuing it in ``generate``) before every left-padded row. Contexts that lm-eval cuts from
the left to fit prompt + context + ``max_gen_toks`` into the window are reported in one warning per call.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry first: registering into an empty one hides the built-ins)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from safetensors import SafetensorError
from transformers import DynamicCache

from cpt_bench.assets.model import ModelError, check_causal_lm, first_line, resolve_model
from cpt_bench.compress.checkpoints import MODES
from cpt_bench.errors import UserError
from cpt_bench.lmeval.generation import PromptPrefix, TruncationCount, expanded_cache, generate_with_prefix
from cpt_bench.models import (
    Compression,
    lm_eval_device,
    load_model,
    parse_compression,
    resident_bytes,
    weight_formats,
)
from cpt_bench.provenance import peak_memory
from cpt_bench.recovery import RECOVERY_KINDS, RecoveryKind
from cpt_bench.recovery.hard import TEXT_FORM
from cpt_bench.recovery.idp import (
    DEFAULT_RULE,
    IdpKind,
    check_rule,
    choose,
    common_prefix,
    document_key,
    eager_attention,
    prompt_score,
)
from cpt_bench.recovery.kind import Applied
from cpt_bench.recovery.position import AFTER_BOS, check_position, resolve_position


class PromptAdapterError(UserError):
    """The ``cpt`` model was given arguments it cannot use (one-line message)."""


def _as_bool(value: bool | str, name: str) -> bool:
    """A model_arg flag: a bool, or ``true`` / ``false`` (any case) from a command line."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise PromptAdapterError(f"{name} must be true or false, got {value!r}")


# HFLM arguments that change how its tokenizer is built (``HFLM._create_tokenizer``): given one, HFLM builds its own
TOKENIZER_ARGS = ("add_bos_token", "use_fast_tokenizer", "revision", "subfolder", "trust_remote_code", "gguf_file")
RECOVERY_ARGS = {kind.model_arg: kind for kind in RECOVERY_KINDS.values() if kind.model_arg}  # model_arg -> kind


def _chosen_recovery(given: dict[str, str], prompt_position: str | None,
                     idp_rule: str | None = None) -> list[tuple[RecoveryKind, str]]:
    """The recovery methods named among ``given`` (model_arg -> value, ``RECOVERY_ARGS``) with their values, checked
    (``RecoveryKind.check_arg``): none, one, or a weight correction that combines with prompts
    (``RecoveryKind.combines_with_prompts``: EoRA) and one prompt (hard or soft: not an IDP set), the correction
    first; refuse any other pair, a position that is unknown or given without a prompt, and an ``idp_rule`` that is
    unknown or given without ``idp``."""
    if idp_rule is not None:
        check_rule(idp_rule)
        if IdpKind.model_arg not in given:
            raise PromptAdapterError(f"idp_rule {idp_rule!r} is given without {IdpKind.model_arg}")
    chosen = sorted(((RECOVERY_ARGS[arg], value) for arg, value in given.items()), key=lambda pair: pair[0].prefix)
    combined = (len(chosen) == 2 and chosen[0][0].combines_with_prompts and chosen[1][0].prefix
                and chosen[1][0].model_arg != IdpKind.model_arg)
    if len(chosen) > 1 and not combined:
        raise PromptAdapterError(f"give one of {_one_of(list(RECOVERY_ARGS))}, not {' and '.join(given)}")
    if prompt_position is not None:
        check_position(prompt_position)
        if not any(kind.prefix for kind, _ in chosen):
            prompts = [arg for arg, kind in RECOVERY_ARGS.items() if kind.prefix]
            raise PromptAdapterError(f"prompt_position {prompt_position!r} is given without {' or '.join(prompts)}")
    for kind, value in chosen:
        kind.check_arg(value)
    return chosen


def _one_of(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


def _cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x), or the
    older ``past_key_values`` (still accepted, with a deprecation warning, by some versions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT-wrapped model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# Keyword arguments of ``from_pretrained`` that lm-eval users pass through HFLM's ``**kwargs``; any other name not
# in HFLM's or our signature is a typo (HFLM would hand it on to transformers, which fails deep inside).
MODEL_CONSTRUCTOR_ARGS = ("attn_implementation", "low_cpu_mem_usage", "cache_dir", "local_files_only", "token",
                          "use_safetensors", "device_map", "quantization_config")


def _accepted_model_args() -> tuple[str, ...]:
    """Every model_arg the ``cpt`` model takes: its own, the recovery methods', HFLM's, and
    ``MODEL_CONSTRUCTOR_ARGS``."""
    names = set(MODEL_CONSTRUCTOR_ARGS) | set(RECOVERY_ARGS)
    for function in (CptLM.__init__, HFLM.__init__):
        names |= {name for name, parameter in inspect.signature(function).parameters.items()
                  if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    return tuple(sorted(names))


def check_model_args(extra: dict[str, Any], recovery: dict[str, Any]) -> None:
    """Refuse an unknown model_arg in one line naming it, the closest accepted name and the accepted ones; after a
    ``text:`` hard prompt (among ``recovery``), say that lm-eval cut it at a comma."""
    accepted = ACCEPTED_MODEL_ARGS
    for name in extra:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            quoted = [arg for arg, value in recovery.items() if TEXT_FORM in str(value)]
            if quoted:
                hint += (" (lm-eval splits model_args at commas, also inside a text: hard prompt: quote the value, "
                         f"{quoted[0]}=\"text:...\", or give it as file:PATH)")
            raise PromptAdapterError(f"unknown model_arg {name!r} for the cpt model{hint}; accepted: "
                                     f"{', '.join(accepted)}")


def _stored_prompt_bytes(applied: Applied, prompt: torch.Tensor | None) -> int | None:
    """Bytes one prompt of an IDP set stores: its kind's ``stored_value_bytes`` per value of ``prompt [n, hidden]``
    (0 for a hard prompt, whose text is no weight; float32 for a soft prompt); None for a kind that does not say."""
    per_value = RECOVERY_KINDS[applied.info["kind"]].stored_value_bytes
    if per_value is None:
        return None
    return per_value * (0 if prompt is None else int(prompt.numel()))


@dataclass
class _PrefixState:
    """What the adapter places before each request for one prompt (``CptLM._set_prompt``): the prompt ``[n, hidden]``,
    the prefix ``[P, hidden]``, the BOS id (after_bos), the prefix's cache and last logits, and where it sits."""

    prompt: torch.Tensor | None
    prefix: torch.Tensor | None
    bos: int | None
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None
    logits: torch.Tensor | None
    position: str | None


@register_model("cpt")
class CptLM(HFLM):
    """HFLM whose ``pretrained`` may be a cpt_bench model name, that can compress the model and prompt it."""

    def __init__(self, pretrained: str = "embedded", allow_cross_model: bool | str = False,
                 prefix_cache: bool | str = True, prompt_position: str | None = None,
                 compression: str | Compression = None, compression_mode: str = "simulated", device: str | None = None,
                 idp_rule: str | None = None, **kwargs):
        """``kwargs``: HFLM's, and at most one recovery method by its model_arg (``RECOVERY_ARGS``: ``soft_prompt``,
        ``hard_prompt``, ``lora``, ...)."""
        # Set before HFLM's init, which reads max_length while loading.
        self._prompt: torch.Tensor | None = None  # [n, hidden], model dtype and device
        self._prefix: torch.Tensor | None = None  # [n_prefix, hidden]: BOS's embedding (after_bos), then the prompt
        self._bos: int | None = None  # after_bos: the BOS id a request's first token is compared with
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, heads, n_prefix, dim]
        self._prefix_logits: torch.Tensor | None = None  # [1, 1, vocab]: logits at the prefix's last position
        self._cache_arg = "past_key_values"  # the forward's name for a cache (``_cache_argument``)
        self._truncation = TruncationCount()  # of the current generate_until call
        self.prompt_info: dict[str, Any] = {"kind": "none", "n_tokens": 0}
        self._recovery_tensors: list[torch.Tensor] = []  # what the recovery method adds to the model (memory)
        self._layer_modes: dict[str, str] | str | None = None  # how each compressed Linear runs (None: dense)
        self._choices: dict[str, _PrefixState] = {}  # IDP: each prompt's prefix, by label (``recovery.idp``)
        self._idp_rule = idp_rule or DEFAULT_RULE
        self.idp_chosen: dict[tuple, str] = {}  # IDP: the label chosen for each document (``idp.document_key``)
        # Every argument and file is checked before any weight loads.
        recovery_args = {arg: kwargs.pop(arg) for arg in list(kwargs)  # in the user's order, for messages
                         if arg in RECOVERY_ARGS and kwargs[arg] is not None}
        check_model_args(kwargs, recovery_args)
        chosen = _chosen_recovery(recovery_args, prompt_position, idp_rule)
        allow_cross_model = _as_bool(allow_cross_model, "allow_cross_model")
        prefix_cache = _as_bool(prefix_cache, "prefix_cache")
        if compression_mode not in MODES:
            raise PromptAdapterError(f"compression_mode must be one of {', '.join(MODES)}, got {compression_mode!r}")
        compression = parse_compression(compression)
        device = lm_eval_device(device)
        artifacts = [kind.read(value) for kind, value in chosen]
        name, label = pretrained, "dense"
        if compression is not None:
            dtype = get_dtype(kwargs.get("dtype") or "auto")
            given = kwargs.get("tokenizer")  # a tokenizer object (the matrix's shared one) serves both
            loaded = load_model(pretrained, compression, mode=compression_mode,
                                dtype=None if dtype == "auto" else dtype, device=device,
                                tokenizer=None if given is None or isinstance(given, str) else given)
            pretrained, label, self._layer_modes = loaded.model, loaded.compression, loaded.layer_modes
            # HFLM needs a tokenizer for a model instance: the one load_model just read (a fresh object; reading
            # Gemma 3's 33 MB tokenizer.json again took seconds per cell), unless an HFLM argument changes how
            # it is built, in which case HFLM builds it from the path as for any model
            tokenizer_args = [arg for arg in TOKENIZER_ARGS if kwargs.get(arg) is not None]
            kwargs.setdefault("tokenizer", resolve_model(name) if tokenizer_args else loaded.tokenizer)
        elif isinstance(pretrained, str):
            pretrained = check_causal_lm(pretrained)
        try:
            super().__init__(pretrained=pretrained, device=device, **kwargs)
        except (OSError, SafetensorError) as error:  # missing or truncated weight / tokenizer files
            raise ModelError(f"could not load model {name!r}: {first_line(error)}") from error
        self.prompt_info["compression"] = label
        for (kind, value), artifact in zip(chosen, artifacts, strict=True):
            if kind.prefix and self.backend != "causal":
                raise PromptAdapterError(f"prompts need a causal (decoder-only) model, this one is {self.backend}")
            applied = kind.apply(self.model, self.tokenizer, value, artifact, name, allow_cross_model)
            self._model, self._recovery_tensors = applied.model, self._recovery_tensors + applied.tensors
            if len(chosen) == 1 or kind.prefix:
                self.prompt_info |= applied.info
            else:  # a correction under a prompt: the prompt is the cell's kind, the correction what it sits on
                self.prompt_info["corrected_by"] = applied.info
            if applied.prompt is not None:
                self._set_prompt(applied, f"{kind.label} {value}", prefix_cache, prompt_position)
            if applied.choices:
                self._set_choices(applied, prefix_cache, prompt_position)

    def _set_choices(self, applied: Applied, prefix_cache: bool, prompt_position: str | None) -> None:
        """IDP: each of ``applied.choices`` set up as a prompt of its own (``_set_prompt``) and kept by label; the
        longest prefix stays in place between calls (the window lm-eval sees is then the smallest)."""
        members = {}
        for label, member in applied.choices.items():
            self._set_prompt(member, f"idp prompt {label}", prefix_cache, prompt_position)
            self._choices[label] = self._prefix_state()
            members[label] = member.info | {k: self.prompt_info[k] for k in ("n_tokens", "position")}
            members[label]["stored_bytes"] = _stored_prompt_bytes(member, self._prompt)
        self._use_prefix(max(self._choices.values(), key=lambda state: state.prefix.shape[0]))
        stored = [member["stored_bytes"] for member in members.values()]
        self.prompt_info |= {"rule": self._idp_rule, "prompts": members, "chosen": dict.fromkeys(members, 0),
                             "n_tokens": max(member["n_tokens"] for member in members.values()),
                             "stored_bytes": None if None in stored else sum(stored)}

    def _prefix_state(self) -> _PrefixState:
        return _PrefixState(self._prompt, self._prefix, self._bos, self._prefix_kv, self._prefix_logits,
                            self.prompt_info.get("position"))

    def _use_prefix(self, state: _PrefixState) -> None:
        """Place ``state``'s prompt before the following requests."""
        self._prompt, self._prefix, self._bos = state.prompt, state.prefix, state.bos
        self._prefix_kv, self._prefix_logits = state.key_values, state.logits

    def _set_prompt(self, applied: Applied, what: str, prefix_cache: bool, prompt_position: str | None) -> None:
        """Place ``applied.prompt`` before every request, where it was trained (``applied.position``), else at
        ``prompt_position`` or the tokenizer's default; ``what`` names it in errors."""
        weight = self.model.get_input_embeddings().weight
        if applied.position is not None:
            if prompt_position not in (None, applied.position):
                raise PromptAdapterError(f"prompt_position {prompt_position!r}: {what} was trained "
                                         f"{applied.position}; leave prompt_position out to use it so")
            prompt_position = applied.position
        position = resolve_position(prompt_position, self.tokenizer)
        self.prompt_info |= {"n_tokens": int(applied.prompt.shape[0]), "position": position}
        self._prompt = applied.prompt.detach().to(weight.device, weight.dtype)
        self._prefix = self._prompt
        if position == AFTER_BOS:
            self._bos = self.tokenizer.bos_token_id
            with torch.no_grad():
                bos = self.model.get_input_embeddings()(torch.tensor([self._bos], device=weight.device))
            self._prefix = torch.cat([bos.to(weight.dtype), self._prompt])
        if self.max_length <= 0:
            raise PromptAdapterError(f"a prompt of {self._prefix.shape[0]} tokens leaves no room in a context of "
                                     f"{super().max_length} tokens")
        if prefix_cache:
            self._cache_arg = _cache_argument(self.model)
            self._prefix_kv, self._prefix_logits = self._prefix_key_values()

    @property
    def max_length(self) -> int:
        """Tokens lm-eval may place in one window: the model's context (or ``max_length``) minus the prefix."""
        return super().max_length - (0 if self._prefix is None else self._prefix.shape[0])

    def _autocast(self) -> torch.autocast:
        """The same mixed-precision context HFLM's own ``_model_call`` uses."""
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    def _prefix_key_values(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """One forward over the prefix: per layer (keys, values), each [1, kv_heads, n_prefix, head_dim], and the
        logits at its last position [1, 1, vocab].

        The cache is built without the model's config, so that sliding-window layers (Gemma, Mistral) keep every
        prefix position too: a cache built from them with the config (``_model_call``) then counts the prefix's
        true length, from which it derives positions and window masks.
        """
        with torch.no_grad(), self._autocast():
            cache = DynamicCache()
            out = self.model(inputs_embeds=self._prefix[None], use_cache=True, **{self._cache_arg: cache})
        return [(keys, values) for keys, values, *_ in cache], out.logits[:, -1:]

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] for ``inps`` [batch, seq] (right-padded), conditioned on the prompt."""
        if self._prompt is None:
            return super()._model_call(inps, attn_mask, labels)
        inps, dropped = self._without_bos(inps)
        batch, n_prefix = inps.shape[0], self._prefix.shape[0]
        mask = torch.ones(batch, n_prefix + inps.shape[1], dtype=torch.long, device=inps.device)
        with torch.no_grad(), self._autocast():
            if self._prefix_kv is None:
                embeds = torch.cat([self._prefix.expand(batch, -1, -1), self.model.get_input_embeddings()(inps)], 1)
                logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits
                last, logits = logits[:, n_prefix - 1: n_prefix], logits[:, n_prefix:]
            else:
                cache = expanded_cache(self._prefix_kv, batch, self.model.config)  # fresh: forward appends to it
                logits = self.model(input_ids=inps, attention_mask=mask, use_cache=True,
                                    **{self._cache_arg: cache}).logits
                last = self._prefix_logits
        if dropped is None or not dropped.any():
            return logits
        # A request whose BOS went into the prefix: its BOS position's logits are the prefix's last ones.
        shifted = torch.cat([last.expand(batch, -1, -1).to(logits.dtype), logits[:, :-1]], 1)
        return torch.where(dropped[:, None, None], shifted, logits)

    def _without_bos(self, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``after_bos``: the requests with a leading BOS moved out (it is in the prefix; the row shifts left and
        repeats its last token at the end, which is never read), and which rows had one ``[batch]`` bool.
        ``first``: the requests as they are, and None."""
        if self._bos is None:
            return inps, None
        dropped = inps[:, 0] == self._bos
        shifted = torch.cat([inps[:, 1:], inps[:, -1:]], 1)
        return torch.where(dropped[:, None], shifted, inps), dropped

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs) -> torch.Tensor:
        """``[context | new tokens]`` for lm-eval's left-padded ``context`` [batch, T] (its ``attention_mask`` in
        ``generation_kwargs``); ``max_length``: T + max_gen_toks. With a prompt: ``generation.generate_with_prefix``."""
        if self._prompt is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        prefix = PromptPrefix(self._prefix, self._bos, self._prefix_kv, self._cache_arg)
        mask = generation_kwargs.pop("attention_mask")
        return generate_with_prefix(self.model, self.tokenizer, prefix, context, mask,
                                    max_length - context.shape[1], stop, self._autocast, **generation_kwargs)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """HFLM's (ids and mask [batch, T], left-truncated to ``left_truncate_len`` columns), counting the tokens
        the truncation drops (HFLM warns once per batch, naming only the padded length)."""
        ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
        self._truncation.add(mask.sum(1), left_truncate_len)
        if left_truncate_len:
            ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
        return ids, mask

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """HFLM's (IDP: per chosen prompt), then one warning if any context was cut to fit the window
        (``generation.TruncationCount``)."""
        self._truncation = TruncationCount()
        results = self._per_chosen_prompt(requests, lambda group: super(CptLM, self).generate_until(group,
                                                                                                    disable_tqdm))
        self._truncation.report(super().max_length)
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """HFLM's; with IDP, each document's requests under the prompt chosen for it."""
        return self._per_chosen_prompt(requests, lambda group: super(CptLM, self).loglikelihood(group, disable_tqdm))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """HFLM's; refused with IDP (a rolling text has no context apart from what is scored)."""
        if self._choices:
            raise PromptAdapterError("idp cannot score rolling loglikelihoods (perplexity tasks): a text scored "
                                     "whole has no context apart from what is scored to choose a prompt from; use "
                                     "hard_prompt or soft_prompt")
        return super().loglikelihood_rolling(requests, disable_tqdm)

    def _per_chosen_prompt(self, requests: list, run: Callable[[list], list]) -> list:
        """``run(requests)`` without IDP; with it, ``run`` on each chosen prompt's requests with that prompt in
        place (``_choose``), results put back in the requests' order."""
        if not self._choices:
            return run(requests)
        labels = self._choose(requests)
        results: list = [None] * len(requests)
        resting = self._prefix_state()
        try:
            for label, state in self._choices.items():
                indices = [i for i, chosen in enumerate(labels) if chosen == label]
                if indices:
                    self._use_prefix(state)
                    for i, result in zip(indices, run([requests[i] for i in indices]), strict=True):
                        results[i] = result
        finally:
            self._use_prefix(resting)
        return results

    def _choose(self, requests: list) -> list[str]:
        """IDP: the label of the prompt for each request, chosen once per document (``idp.document_key``) by the
        rule on the common token prefix of its requests' contexts (``recovery.idp``), and counted in
        ``prompt_info['chosen']`` (documents)."""
        contexts: dict[tuple, list[str]] = {}
        for request in requests:
            contexts.setdefault(document_key(request), []).append(request.args[0])
        new = [key for key in contexts if key not in self.idp_chosen]
        if new:
            with eager_attention(self.model) if self._idp_rule == "attention" else nullcontext():
                for key in new:
                    ids = common_prefix([self.tok_encode(context) for context in dict.fromkeys(contexts[key])])
                    label = self._choice_for(ids or [self.prefix_token_id])
                    self.idp_chosen[key] = label
                    self.prompt_info["chosen"][label] += 1
        return [self.idp_chosen[document_key(request)] for request in requests]

    def _choice_for(self, ids: list[int]) -> str:
        """The label whose prompt scores best (``idp.prompt_score``) on the context ``ids``."""
        scores = []
        for state in self._choices.values():
            kept = ids[1:] if state.bos is not None and ids[0] == state.bos and len(ids) > 1 else ids
            kept = kept[-(super().max_length - state.prefix.shape[0]):]
            context = torch.tensor(kept, device=state.prefix.device)
            scores.append(prompt_score(self.model, state.prefix, state.prompt.shape[0], context, self._idp_rule,
                                       self._autocast))
        return list(self._choices)[choose(scores)]

    def memory_record(self) -> dict[str, Any]:
        """Memory as a deployment sees it, in bytes: what the loaded model holds resident (``models.resident_bytes``,
        with the format its compressed Linears run in), what the prompt holds (embeddings, the prefix's key/value
        cache of ``prefix_tokens`` positions per sequence, BOS included when after it, and ``kv_values_per_token``:
        the keys' and values' scalars one position adds to the cache over all layers), the tensors a recovery method
        adds to the model (a LoRA adapter's),
        and this process's peak memory so far. With IDP, the bytes of every prompt of the set (all are held) and the
        tokens of the longest (what one sequence needs at most)."""
        def nbytes(tensors) -> int:
            return int(sum(t.numel() * t.element_size() for t in tensors))

        states = list(self._choices.values()) or [self._prefix_state()]
        kv = [t for state in states for pair in state.key_values or [] for t in pair]
        prompts = [state.prompt for state in states if state.prompt is not None]
        prefix_tokens = max(0 if state.prefix is None else int(state.prefix.shape[0]) for state in states)
        longest = max(states, key=lambda state: 0 if state.prefix is None else state.prefix.shape[0])
        longest_kv = [t for pair in longest.key_values or [] for t in pair]
        return {"model_resident_bytes": resident_bytes(self.model), "weight_formats": weight_formats(self._layer_modes),
                "prompt_tokens": self.prompt_info["n_tokens"],
                "prompt_embedding_bytes": nbytes(prompts),
                "prefix_tokens": prefix_tokens, "prefix_cache_bytes": nbytes(kv),
                "kv_values_per_token": sum(t.numel() for t in longest_kv) // prefix_tokens if longest_kv else None,
                "adapter_bytes": nbytes(self._recovery_tensors), **peak_memory()}

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model info plus the prompt and the memory record (lm-eval stores it in results['config'])."""
        return {**super().get_model_info(), "prompt": self.prompt_info, "memory": self.memory_record()}


ACCEPTED_MODEL_ARGS = _accepted_model_args()
