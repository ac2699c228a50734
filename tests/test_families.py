"""Every supported decoder-only family, as a tiny random model: compression, storage, kernels, export and prompts.

Families: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text-only), Phi-3, OPT (also with embeddings narrower
than its layers, as opt-350m), GPT-2 (``Conv1D`` layers, weight ``[in, out]``) and GPT-NeoX, each hidden 32,
2 layers, with the tiny BPE tokenizer of ``conftest`` (it adds no BOS and has no pad token; Qwen2's tokenizer
class gives it one). Gemma's embedding layer scales its rows by sqrt(hidden): the prompt tests catch a prompt
built from raw rows. The ``after_bos`` tests use the same tokenizer made to add a BOS token.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as tf
from lm_eval.models.huggingface import HFLM
from safetensors.torch import load_file
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from cpt_bench.assets.model import model_fingerprint
from cpt_bench.compress import CalibrationSettings, Spec, compress_model, export_gptq
from cpt_bench.compress.checkpoints import load_checkpoint
from cpt_bench.compress.kernels import UnsupportedLayerError
from cpt_bench.compress.layers import UnsupportedModelError, decoder_layers
from cpt_bench.compress.sequential import _capture_layer_inputs, _run_layer, compressible_linears
from cpt_bench.compress.storage import save_compressed
from cpt_bench.lmeval.adapter import CptLM, PromptAdapterError
from cpt_bench.models import CheckpointFolder, load_model
from cpt_bench.recovery.artifact import PromptArtifactError, export_peft, save_prompt
from cpt_bench.recovery.hard import HARD_PROMPTS
from cpt_bench.recovery.position import (
    AFTER_BOS,
    FIRST,
    META_KEY,
    PromptPositionError,
    adds_bos,
    resolve_position,
)
from cpt_bench.recovery.soft import initial_prompt, train_soft_prompt
from cpt_bench.recovery.target import describe_target
from cpt_bench.recovery.training import SoftPromptConfig, SoftPromptError, prompted_loss, validation_windows

from .compress_helpers import _one_thread, random_ids  # noqa: F401  (_one_thread: autouse fixture)
from .conftest import TINY_SEQLEN_TOKENS, build_tiny_tokenizer
from .prompt_helpers import instances, mc_pairs, rolling_texts, save_random_prompt
from .test_compress_export import decode_layer

HIDDEN, LAYERS, HEADS = 32, 2, 4
SETTINGS = CalibrationSettings(n_windows=2, seqlen=24)  # longer than the Gemma sliding window below
SLIDING_WINDOW = 16
SPECS = ["rtn-w4g32", "gptq-w4g32-actorder", "sparsegpt-50", "wanda-2:4", "magnitude-50", "sparsegpt-2:4+gptq-w4g32"]
CONTEXT_TOKENS = 40  # the cpt model's whole context: several rolling windows per text
N_PROMPT = 4
TOLERANCE = 1e-4


def _llama_like(**extra) -> dict:
    return {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 256, **extra}


_GEMMA = {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": SLIDING_WINDOW}
FAMILIES = {  # name -> (model class, config class, config fields besides the token ids)
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, _llama_like()),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, _llama_like()),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, _llama_like()),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, _llama_like(head_dim=8)),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, _llama_like(**_GEMMA)),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig,
               _llama_like(**_GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, _llama_like()),
    "opt": (tf.OPTForCausalLM, tf.OPTConfig, {"hidden_size": HIDDEN, "ffn_dim": 2 * HIDDEN, "num_hidden_layers": LAYERS,
                                              "num_attention_heads": HEADS, "max_position_embeddings": 256,
                                              "word_embed_proj_dim": HIDDEN}),
    "opt_projected": (tf.OPTForCausalLM, tf.OPTConfig,  # like opt-350m: embeddings narrower than the layers
                      {"hidden_size": HIDDEN, "ffn_dim": 2 * HIDDEN, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "max_position_embeddings": 256, "word_embed_proj_dim": 16}),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
                                                 "n_positions": 256}),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                                                           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                                           "max_position_embeddings": 256}),
}


@dataclass
class Family:
    """A tiny random model of one family saved with its tokenizer in ``folder`` (weights fp16-representable, so
    that a compressed checkpoint, which stores the uncompressed tensors in fp16, reloads them exactly)."""

    name: str
    folder: Path
    tokenizer: object
    checkpoints: dict[str, Path] = field(default_factory=dict)

    def load(self) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()


def save_family(name: str, tokenizer, folder: Path) -> Family:
    model_class, config_class, fields = FAMILIES[name]
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **fields)
    torch.manual_seed(0)
    model = model_class(config).eval()
    for param in model.parameters():
        param.data = param.data.half().float()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Family(name, folder, AutoTokenizer.from_pretrained(folder))


def bos_adding_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a BOS token ``<s>`` that it puts before every text (as Llama's and Gemma's do)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_tokenizer, tmp_path_factory) -> Family:
    return save_family(request.param, tiny_tokenizer, tmp_path_factory.mktemp(request.param))


def checkpoint(family: Family, text: str, tmp_path_factory) -> Path:
    """``family``'s model compressed by ``text`` into a checkpoint folder (made once per family and spec)."""
    if text not in family.checkpoints:
        model = family.load()
        spec = Spec.parse(text)
        result = compress_model(model, spec, random_ids(SETTINGS.n_windows, SETTINGS.seqlen), SETTINGS,
                                progress=False)
        folder = tmp_path_factory.mktemp(f"{family.name}-{text}")
        base = {"name": str(family.folder), "fingerprint": model_fingerprint(family.folder)}
        save_compressed(model, result, folder, base)
        family.tokenizer.save_pretrained(folder)
        family.checkpoints[text] = folder
        family.checkpoints[f"{text} logits"] = _logits(model)
    return family.checkpoints[text]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids(2, 20, seed=3)).logits


# --- compression ------------------------------------------------------------------------------------------------

def test_each_layer_gets_the_arguments_the_model_gives_it(family):
    """Replaying the captured calls layer by layer gives every layer's output of a real forward (Gemma's layers
    differ: one sliding-window, one global; GPT-2 passes its mask positionally)."""
    model = family.load()
    _, layers = decoder_layers(model)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    ids = random_ids(1, SETTINGS.seqlen)
    with torch.no_grad():
        model(ids)
        for hook in hooks:
            hook.remove()
        inputs, calls = _capture_layer_inputs(model, layers, ids)
        hidden = inputs[0]
        for layer, call, expected in zip(layers, calls, outputs, strict=True):
            hidden = _run_layer(layer, hidden, call)
            assert torch.equal(hidden, expected)


@pytest.mark.parametrize("text", SPECS)
def test_compressed_checkpoint_reloads_the_in_memory_model(family, text, tmp_path_factory):
    folder = checkpoint(family, text, tmp_path_factory)
    loaded = load_model(str(family.folder), CheckpointFolder(folder), device="cpu")
    assert loaded.compression == text and set(loaded.layer_modes) == set(compressible_linears(loaded.model))
    logits, expected = _logits(loaded.model), family.checkpoints[f"{text} logits"]
    spec = Spec.parse(text)
    if spec.quantization is None and spec.pruning.method == "sparsegpt":  # its updated weights are stored in fp16
        assert torch.allclose(logits, expected, atol=1e-3) and not torch.equal(logits, expected)
    else:
        assert torch.equal(logits, expected)


@pytest.mark.parametrize("text", ["rtn-w4g32", "gptq-w4g32-actorder"])
def test_real_kernels_agree_with_simulated(family, text, tmp_path_factory):
    folder = checkpoint(family, text, tmp_path_factory)
    model, modes = load_checkpoint(folder, "real", torch.float32)
    assert set(modes.values()) == {"int4 g32"}
    assert torch.allclose(_logits(model), family.checkpoints[f"{text} logits"], atol=1e-4)


def test_layers_without_a_kernel_are_refused_in_one_line(family, tmp_path_factory):
    with pytest.raises(UnsupportedLayerError, match="pruned without quantization") as caught:
        load_checkpoint(checkpoint(family, "wanda-2:4", tmp_path_factory), "real")
    assert "\n" not in str(caught.value)


def test_gptq_export_decodes_to_the_simulated_weights(family, tmp_path_factory, tmp_path):
    folder = checkpoint(family, "gptq-w4g32-actorder", tmp_path_factory)
    tensors = load_file(export_gptq(folder, tmp_path / "gptq") / "model.safetensors")
    model = load_checkpoint(folder)[0]
    for name, module in compressible_linears(model).items():
        weight = module.weight.t() if isinstance(module, tf.pytorch_utils.Conv1D) else module.weight
        assert torch.equal(decode_layer(tensors, name, 4, 1), weight), name


def test_a_layer_the_engine_does_not_know_is_refused_by_type():
    config = tf.MixtralConfig(vocab_size=64, num_local_experts=2, **_llama_like())
    with pytest.raises(UnsupportedModelError, match=r"holds weights in Mixtral\w+") as caught:
        compress_model(tf.MixtralForCausalLM(config), Spec.parse("rtn-w4"), progress=False)
    assert "\n" not in str(caught.value)
    with pytest.raises(UnsupportedModelError, match="cannot find the decoder layers of Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- prompts ----------------------------------------------------------------------------------------------------

def _cpt(folder: Path, max_length: int | None = CONTEXT_TOKENS, **kwargs) -> CptLM:
    """The ``cpt`` model on CPU in fp32; ``max_length`` None: the model's context (256 tokens here)."""
    return CptLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, max_length=max_length,
                 **kwargs)


def _scores(lm, rolling: bool = True) -> list[float]:
    scores = [score for score, _ in lm.loglikelihood(instances("loglikelihood", mc_pairs(4)))]
    if rolling:
        scores += lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in rolling_texts(30, 2)]))
    return scores


def test_soft_prompt_prefix_cache_concatenation_and_peft_agree(family, tmp_path):
    model = family.load()
    assert not adds_bos(family.tokenizer)
    prompt = save_random_prompt(tmp_path / "prompt", model, family.tokenizer, N_PROMPT)
    adapter = export_peft(prompt, tmp_path / "peft")
    peft = HFLM(pretrained=str(family.folder), peft=str(adapter), device="cpu", dtype="float32", batch_size=4,
                max_length=CONTEXT_TOKENS - N_PROMPT)
    reference = _scores(peft)
    for prefix_cache in (True, False):
        lm = _cpt(family.folder, soft_prompt=str(prompt), prefix_cache=prefix_cache)
        assert lm.prompt_info["position"] == FIRST
        assert _scores(lm) == pytest.approx(reference, abs=TOLERANCE)


def test_prompt_of_embedding_outputs_scores_as_its_tokens(family, tmp_path):
    """A soft prompt initialised from the text's tokens equals the hard prompt of that text and the plain model
    reading the text: prompts live in the embedding layer's output space (Gemma scales the rows)."""
    text = HARD_PROMPTS["paper"]
    n_tokens = len(family.tokenizer(text, add_special_tokens=False)["input_ids"])
    model = family.load()
    config = SoftPromptConfig(n_virtual_tokens=n_tokens, init="text", init_text=text)
    embeddings = initial_prompt(model, family.tokenizer, config)
    training = {"source": {"corpus": "none"}, "hyperparameters": {}, "curve": [], "train_seconds": 0.0}
    folder = save_prompt(tmp_path / "p", embeddings, describe_target(model, family.tokenizer, str(family.folder)),
                         "dense", training)
    plain = HFLM(pretrained=str(family.folder), device="cpu", dtype="float32", batch_size=4)
    pairs = mc_pairs(4)
    expected = [s for s, _ in plain.loglikelihood(instances("loglikelihood", [(text + c, x) for c, x in pairs]))]
    for kind in ({"soft_prompt": str(folder)}, {"hard_prompt": "paper"}):
        lm = _cpt(family.folder, max_length=None, **kind)
        assert _scores(lm, rolling=False) == pytest.approx(expected, abs=TOLERANCE)


# --- prompt position and tokenizer corner cases -----------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gemma3"])
def bos_family(request, tmp_path_factory) -> Family:
    """A family whose tokenizer adds a BOS token."""
    return save_family(request.param, bos_adding_tokenizer(), tmp_path_factory.mktemp(f"bos-{request.param}"))


def _save_prompt_at(folder: Path, family: Family, position: str) -> Path:
    prompt = save_random_prompt(folder, family.load(), family.tokenizer, N_PROMPT)
    meta_path = prompt / "prompt.json"
    meta = json.loads(meta_path.read_text())
    meta[META_KEY] = position  # as train_soft_prompt records it
    meta_path.write_text(json.dumps(meta))
    return prompt


def test_default_position_follows_the_tokenizer(bos_family, tiny_tokenizer):
    assert adds_bos(bos_family.tokenizer) and resolve_position(None, bos_family.tokenizer) == AFTER_BOS
    assert resolve_position(None, tiny_tokenizer) == FIRST  # has a BOS token but does not add it
    no_bos = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tiny_tokenizer.backend_tokenizer),
                                     eos_token="<|endoftext|>")
    assert resolve_position(None, no_bos) == FIRST
    with pytest.raises(PromptPositionError, match="after_bos needs a BOS token") as caught:
        resolve_position(AFTER_BOS, no_bos)
    assert "\n" not in str(caught.value)


def test_hard_prompt_after_bos_equals_conditioning_on_its_text(bos_family):
    text = HARD_PROMPTS["paper"]
    plain = HFLM(pretrained=str(bos_family.folder), device="cpu", dtype="float32", batch_size=4)
    pairs = mc_pairs(4)
    expected = [s for s, _ in plain.loglikelihood(instances("loglikelihood", [(text + c, x) for c, x in pairs]))]
    for prefix_cache in (True, False):
        lm = _cpt(bos_family.folder, max_length=None, hard_prompt="paper", prefix_cache=prefix_cache)
        assert lm.prompt_info["position"] == AFTER_BOS
        assert _scores(lm, rolling=False) == pytest.approx(expected, abs=TOLERANCE)


def test_soft_prompt_after_bos_paths_agree_with_a_hand_computation(bos_family, tmp_path):
    """Rolling windows past the first do not start with BOS: they get BOS + prompt before them."""
    prompt = _save_prompt_at(tmp_path / "p", bos_family, AFTER_BOS)
    by_cache, by_concat = (_cpt(bos_family.folder, soft_prompt=str(prompt), prefix_cache=on) for on in (True, False))
    assert by_cache.max_length == CONTEXT_TOKENS - N_PROMPT - 1  # BOS + prompt
    assert _scores(by_cache) == pytest.approx(_scores(by_concat), abs=TOLERANCE)
    whole = _cpt(bos_family.folder, max_length=None, soft_prompt=str(prompt))  # no request truncated
    model, bos = bos_family.load(), bos_family.tokenizer.bos_token_id
    embeddings = by_cache._prompt
    for (context, continuation), score in zip(mc_pairs(4), _scores(whole, rolling=False), strict=True):
        context_ids, continuation_ids = whole._encode_pair(context, continuation)
        assert context_ids[0] == bos
        ids = torch.tensor(context_ids + continuation_ids)
        embeds = model.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:1], embeddings, embeds[1:]])[None]
        with torch.no_grad():
            logprobs = model(inputs_embeds=embeds).logits[0, N_PROMPT:-1].log_softmax(-1)  # predicts ids[1:]
        hand = logprobs.gather(1, ids[1:, None])[-len(continuation_ids):].sum().item()
        assert score == pytest.approx(hand, abs=TOLERANCE)


def test_prompts_without_a_recorded_position_sit_first(bos_family, tmp_path):
    old = save_random_prompt(tmp_path / "old", bos_family.load(), bos_family.tokenizer, N_PROMPT)
    assert _cpt(bos_family.folder, soft_prompt=str(old)).prompt_info["position"] == FIRST
    with pytest.raises(PromptAdapterError, match="trained first; leave prompt_position out"):
        _cpt(bos_family.folder, soft_prompt=str(old), prompt_position=AFTER_BOS)
    new = _save_prompt_at(tmp_path / "new", bos_family, AFTER_BOS)
    with pytest.raises(PromptArtifactError, match="only prompts trained with prompt_position first export"):
        export_peft(new, tmp_path / "peft")


def test_bad_prompt_positions_are_refused_in_one_line(tiny_model_dir):
    with pytest.raises(PromptPositionError, match="prompt_position must be one of after_bos, first, got 'last'"):
        _cpt(tiny_model_dir, hard_prompt="paper", prompt_position="last")
    with pytest.raises(PromptAdapterError, match="without hard_prompt or soft_prompt"):
        _cpt(tiny_model_dir, prompt_position=FIRST)
    with pytest.raises(SoftPromptError, match="soft prompt setting prompt_position must be one of"):
        SoftPromptConfig(prompt_position="last")


def test_training_after_bos_scores_the_text_after_bos_and_prompt(bos_family, filled_fake_cache, tmp_path):
    """Training windows start with BOS; the loss of a prompt made of a text's embeddings equals the plain model's
    loss on BOS + text + window; the artifact records the position."""
    model, tokenizer = bos_family.load(), bos_family.tokenizer
    bos = tokenizer.bos_token_id
    config = SoftPromptConfig(n_virtual_tokens=3, steps=2, batch_size=2, seqlen=TINY_SEQLEN_TOKENS, eval_every=2,
                              eval_windows=2, precision="fp32")
    windows = validation_windows(torch.arange(1, 200), config, [bos])
    assert windows.shape == (2, TINY_SEQLEN_TOKENS) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[0, 1:], torch.arange(1, TINY_SEQLEN_TOKENS))
    text = tokenizer("river stone", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        prompt = model.get_input_embeddings()(torch.tensor(text))
        loss = prompted_loss(model, prompt, windows, 1)
        ids = torch.cat([windows[:, :1], torch.tensor(text).expand(2, -1), windows[:, 1:]], 1)
        labels = ids.clone()
        labels[:, : 1 + len(text)] = -100
        assert loss.item() == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), abs=1e-5)
    folder = train_soft_prompt(model, tokenizer, config, "wikipedia", tmp_path / "p", model_name="tiny")
    meta = json.loads((folder / "prompt.json").read_text())
    assert meta[META_KEY] == AFTER_BOS and all(math.isfinite(r["val_loss"]) for r in meta["curve"])


def test_tokenizer_without_a_pad_token(tiny_model_dir, tmp_path):
    """lm-eval gives the tokenizer a pad token; prompting does not depend on which."""
    model, tokenizer = (AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                        AutoTokenizer.from_pretrained(tiny_model_dir))
    assert tokenizer.pad_token is None
    prompt = save_random_prompt(tmp_path / "p", model, tokenizer, N_PROMPT)
    by_cache, by_concat = (_scores(_cpt(tiny_model_dir, soft_prompt=str(prompt), prefix_cache=on))
                           for on in (True, False))
    assert all(map(math.isfinite, by_cache)) and by_cache == pytest.approx(by_concat, abs=TOLERANCE)


# --- a small matrix run -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_a_small_matrix_runs_on_the_family(name, tiny_tokenizer, _filled_fake_cache, tmp_path, monkeypatch):
    """Compression, hard and soft prompts, the trivial-prefix control and both kinds of targets through
    ``run_matrix`` (GPT-2: Conv1D layers; Gemma 3: scaled embeddings and sliding-window layers)."""
    from cpt_bench.matrix import store
    from cpt_bench.matrix.run import run_matrix

    from .test_matrix import tiny_config, write_config

    shutil.copytree(_filled_fake_cache, tmp_path / "cache")
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    folder = save_family(name, tiny_tokenizer, tmp_path / name).folder
    targets = [{"task": "cpt_piqa", "limit": 2}]
    cells = store.read_cells(run_matrix(write_config(tmp_path, tiny_config(folder, targets=targets)), tmp_path / "run"))
    assert len(cells) == 8 and all(math.isfinite(cell["metric"]["value"]) for cell in cells.values())  # + trivial
