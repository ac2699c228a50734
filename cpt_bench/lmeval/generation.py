"""Prompted generation for the ``cpt`` adapter: lm-eval's ``generate_until`` batches with a prompt prefix.

lm-eval hands ``_model_generate`` a batch of contexts ``[batch, T]``, **left**-padded (a row's BOS, when the
tokenizer adds one, sits after its pads), with their attention mask, and keeps the columns after the first ``T``
of what it returns as the generated tokens. ``generate_with_prefix`` generates after ``[prefix | row]`` and returns
``[context | new tokens]``:

- the attention mask given to ``generate`` is ``[ones(P) | lm-eval's mask]`` (``prefixed_attention_mask``):
  transformers derives positions from its cumulative sum, so every row's first real token gets position ``P`` as
  in the unpadded sequence ``[prefix | row]``, and the pads between prefix and row are masked. With the prompt
  after BOS the prefix is ``[BOS; prompt]`` and each row's own leading BOS is masked too (a row cut by left
  truncation has none: it keeps every token, as the loglikelihood path does);
- with the prefix's key/value cache (``PromptPrefix.key_values``): a fresh cache per call holding the prefix,
  expanded to the batch, and ``input_ids = [P placeholders | context]``. Why the placeholders: transformers 5.0
  slices ``input_ids[:, cache_position]`` (it takes the ids to hold the cached positions too, and silently drops
  the first P context tokens when only the context is passed), while 5.2x slices the last
  ``len(input_ids) - cache length`` ids when the ids are as long as the mask. A full-length ``input_ids`` with a
  full-length mask makes both feed exactly the context. The placeholders are never fed to the model;
  settings that read the ids (``repetition_penalty``...) are refused (``check_generation_settings``);
- without it (``prefix_cache=false``, or a model with sliding-window layers, whose cache cannot be continued in
  ``generate``: upstream does not support it, see ``reuses_prefix_cache``): ``inputs_embeds = [prefix |
  embedded context]``, from which ``generate`` returns only the new tokens (the context is put back in front).

lm-eval's stop criteria look at the ids after the position they are given: ``P + T`` with the cache (the
placeholders and the context are not generated), 0 without. ``max_new_tokens`` is lm-eval's ``max_length`` minus
the padded context, so the prefix takes nothing from ``max_gen_toks`` (lm-eval's window, ``max_length`` of the
adapter, already leaves room for the prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from lm_eval.models.utils_hf import stop_sequences_criteria
from transformers import DynamicCache

from cpt_bench.errors import UserError

logger = logging.getLogger(__name__)

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, kv_heads, P, head_dim]

# Generation settings a prefix cannot honour, with the value that means "off": beam search, contrastive search and
# assisted decoding re-shape or crop the cache; the others read the token ids or count them (the ids hold
# placeholders where the prompt is, or no context at all on the embeddings path), so they would not see what the
# model reads. ``min_new_tokens`` counts from the end of the ids and is honoured.
REFUSED_SETTINGS: dict[str, object] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
    "assistant_model": None, "prompt_lookup_num_tokens": None, "min_length": 0, "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "sequence_bias": None, "begin_suppress_tokens": None}


class GenerationSettingError(UserError):
    """A generation setting that the adapter cannot honour with a prompt (one-line message)."""


@dataclass(frozen=True)
class PromptPrefix:
    """What precedes every row: ``embeddings`` [P, hidden] (BOS's embedding first when the prompt sits after BOS),
    ``bos``: the BOS id whose leading occurrence in a row is masked (None: the prompt sits first),
    ``key_values``: the prefix's cache (None: concatenate the embeddings instead), ``cache_arg``: the name of
    ``generate``'s cache argument."""

    embeddings: torch.Tensor
    bos: int | None
    key_values: KeyValues | None
    cache_arg: str = "past_key_values"


def expanded_cache(key_values: KeyValues, batch: int, config) -> DynamicCache:
    """A fresh cache holding the prefix for ``batch`` rows. The views are expanded, not copied: a cache appends
    by concatenating into new tensors, so the prefix's own tensors are never written to."""
    return DynamicCache(ddp_cache_data=[(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
                                        for keys, values in key_values], config=config)


def reuses_prefix_cache(model: torch.nn.Module) -> bool:
    """Whether ``generate`` may continue from the prefix's cache: not when a layer attends through a sliding
    window (Gemma 2/3, Mistral, Phi-3...), whose cache transformers does not support continuing in ``generate``
    (it skips its own continuation tests for these models)."""
    layers = DynamicCache(config=model.config).layers
    return not any(getattr(layer, "is_sliding", False) for layer in layers)


def check_generation_settings(model: torch.nn.Module, generation_kwargs: dict) -> None:
    """Refuse, in one line naming it, a setting of ``REFUSED_SETTINGS`` that is on, given in the request's
    ``gen_kwargs`` or in the model's own ``generation_config``."""
    for name, off in REFUSED_SETTINGS.items():
        value = generation_kwargs.get(name, getattr(model.generation_config, name, off))
        if value is not None and value != off:
            source = "gen_kwargs" if name in generation_kwargs else "the model's generation_config"
            raise GenerationSettingError(f"generation setting {name}={value!r} (from {source}) cannot be used with "
                                         f"a prompt; leave it out (it must be {off!r})")


def prefixed_attention_mask(context: torch.Tensor, attention_mask: torch.Tensor, n_prefix: int,
                            bos: int | None) -> torch.Tensor:
    """``[ones(P) | attention_mask]`` [batch, P + T] for left-padded ``context`` [batch, T], with each row's
    leading ``bos`` (its first unmasked column) masked when ``bos`` is given."""
    mask = attention_mask.clone()
    if bos is not None:
        rows = torch.arange(context.shape[0], device=context.device)
        first = (context.shape[1] - mask.sum(1)).clamp(max=context.shape[1] - 1)  # first real column (left pads)
        own_bos = (mask[rows, first] == 1) & (context[rows, first] == bos)
        mask[rows[own_bos], first[own_bos]] = 0
    return torch.cat([torch.ones(mask.shape[0], n_prefix, dtype=mask.dtype, device=mask.device), mask], 1)


def greedy_unless_sampling(generation_kwargs: dict) -> dict:
    """lm-eval's defaults (as ``HFLM._model_generate``): temperature 0 unless given; at temperature 0 without
    ``do_sample``, greedy decoding, with the temperature left out."""
    kwargs = {"temperature": 0.0, **generation_kwargs}
    if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
        kwargs["do_sample"] = False
    if kwargs["do_sample"] is False and kwargs["temperature"] == 0.0:
        kwargs.pop("temperature")
    return kwargs


def generate_with_prefix(model: torch.nn.Module, tokenizer, prefix: PromptPrefix, context: torch.Tensor,
                         attention_mask: torch.Tensor, max_new_tokens: int, stop: list[str],
                         autocast: Callable[[], AbstractContextManager], **generation_kwargs) -> torch.Tensor:
    """Generate after ``[prefix | row]`` for each row of ``context`` [batch, T] (left-padded, mask
    ``attention_mask`` [batch, T]); at most ``max_new_tokens``, stopping once every row has produced one of the
    ``stop`` strings. Returns ``[context | new tokens]`` [batch, T + n_new] (see the module docstring)."""
    check_generation_settings(model, generation_kwargs)
    key_values = prefix.key_values if reuses_prefix_cache(model) else None
    batch, n_prefix, n_context = context.shape[0], prefix.embeddings.shape[0], context.shape[1]
    mask = prefixed_attention_mask(context, attention_mask, n_prefix, prefix.bos)
    kwargs = greedy_unless_sampling(generation_kwargs) | {
        "attention_mask": mask, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True}
    with torch.no_grad(), autocast():
        if key_values is not None:
            placeholders = torch.full((batch, n_prefix), tokenizer.pad_token_id, dtype=context.dtype,
                                      device=context.device)
            out = model.generate(input_ids=torch.cat([placeholders, context], 1),
                                 stopping_criteria=stop_sequences_criteria(tokenizer, stop, n_prefix + n_context,
                                                                           batch),
                                 **{prefix.cache_arg: expanded_cache(key_values, batch, model.config)},
                                 **kwargs)
            return out[:, n_prefix:]
        embeddings = torch.cat([prefix.embeddings.expand(batch, -1, -1), model.get_input_embeddings()(context)], 1)
        # Masked columns (pads, a row's own BOS) moved first: [pads | prefix | row], as an unpadded [prefix | row]
        # would be left-padded. A sliding window counts columns, pads included: between prefix and row they would
        # push the prefix out of the window sooner.
        order = mask.argsort(dim=1, stable=True)
        embeddings = embeddings.gather(1, order[..., None].expand(-1, -1, embeddings.shape[-1]))
        kwargs["attention_mask"] = mask.gather(1, order)
        new = model.generate(inputs_embeds=embeddings, stopping_criteria=stop_sequences_criteria(tokenizer, stop, 0,
                                                                                                  batch), **kwargs)
        return torch.cat([context, new], 1)


@dataclass
class TruncationCount:
    """Contexts that lm-eval cut from the left to fit its window (prompt + context + ``max_gen_toks``)."""

    requests: int = 0
    cut_requests: int = 0
    cut_tokens: int = 0
    longest_cut: int = 0

    def add(self, lengths: torch.Tensor, kept: int | None) -> None:
        """Count a batch of contexts of ``lengths`` [batch] tokens of which the last ``kept`` stay (None: all)."""
        cut = (lengths - kept).clamp(min=0) if kept else torch.zeros_like(lengths)
        self.requests += len(lengths)
        self.cut_requests += int((cut > 0).sum())
        self.cut_tokens += int(cut.sum())
        self.longest_cut = max(self.longest_cut, int(cut.max()) if len(cut) else 0)

    def report(self, window: int) -> None:
        """One warning for all the requests counted, when any was cut; ``window``: the model's whole context."""
        if self.cut_requests:
            logger.warning("%d of %d generation requests were cut from the left to fit prompt + context + "
                           "max_gen_toks into the model's window of %d tokens: %d context tokens dropped in all, "
                           "at most %d from one request", self.cut_requests, self.requests, window, self.cut_tokens,
                           self.longest_cut)
