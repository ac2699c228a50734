"""The model a prompt is trained on or applied to: its identity, and the checks that a prompt fits it.

A prompt is tied to the *base* model (architecture, token embedding matrix) and its tokenizer, not to
one compression of it: the paper's claim is that a prompt learned on one compressed model transfers to
other compression levels of the same base model. A model's identity is therefore the sha256 of its
config's shape fields plus an *embedding signature*: the per-dimension mean and standard deviation,
over the vocabulary, of the first ``SIGNATURE_DIMS`` columns of the input embedding matrix. Signatures
are compared with a tolerance (``SIGNATURE_TOLERANCE`` x the embedding's scale), because compressed
checkpoints may store the untouched embedding in fp16 and a model may be loaded in bf16: an exact hash
of the values would then refuse the very model the prompt was trained on. (This is not
``cpt_bench.assets.model.model_fingerprint``, which identifies every weight of a checkpoint.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

SIGNATURE_DIMS = 64
SIGNATURE_TOLERANCE = 1e-2  # fp16 / bf16 storage moves these statistics by far less; another model by far more
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _sha256_json(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def config_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config's shape fields (model type, hidden size, layers, heads, vocabulary size)."""
    config = model.config.get_text_config(decoder=True)
    return _sha256_json({name: getattr(config, name, None) for name in _SHAPE_FIELDS})


def embedding_signature(model: torch.nn.Module) -> dict[str, list[float]]:
    """Mean and standard deviation over the vocabulary of the embedding's first ``SIGNATURE_DIMS`` columns."""
    weight = model.get_input_embeddings().weight.detach()[:, :SIGNATURE_DIMS].to("cpu", torch.float64)
    return {"mean": weight.mean(0).tolist(), "std": weight.std(0).tolist()}


def same_embeddings(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Whether two embedding signatures describe the same matrix up to fp16 / bf16 storage."""
    if len(a["mean"]) != len(b["mean"]):
        return False
    scale = sum(a["std"]) / len(a["std"])
    pairs = zip(a["mean"] + a["std"], b["mean"] + b["std"], strict=True)
    return all(abs(x - y) <= SIGNATURE_TOLERANCE * scale for x, y in pairs)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's vocabulary (token -> id, added tokens included) and BOS / EOS / UNK tokens.

    The pad token is left out: lm-eval sets one (often EOS) on tokenizers that lack it.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "unk_token")}
    return _sha256_json({"vocab": vocab, "special_tokens": specials})


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the model's input embeddings (the size of one prompt vector)."""
    return int(model.get_input_embeddings().weight.shape[1])


def describe_target(model: torch.nn.Module, tokenizer, name: str) -> dict[str, Any]:
    """The identity block stored with a prompt: model and tokenizer names, fingerprints / signature, shapes."""
    config = model.config.get_text_config(decoder=True)
    return {
        "model": {"name": name, "config_sha256": config_fingerprint(model), "embedding": embedding_signature(model),
                  "model_type": config.model_type, "num_layers": config.num_hidden_layers,
                  "num_attention_heads": config.num_attention_heads},
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "fingerprint": tokenizer_fingerprint(tokenizer)},
        "hidden_size": hidden_size(model),
    }
