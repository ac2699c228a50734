"""Budget-matched recovery baselines on the tiny model: LoRA adapters (trained, stored as PEFT folders, scored in
plain lm-eval exactly as by the ``cpt`` model) and the ``kd`` objective (it lowers the KL it optimises)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_bench.compress.sequential import compress_model
from cpt_bench.compress.spec import Spec
from cpt_bench.lmeval.adapter import CptLM, PromptAdapterError
from cpt_bench.matrix import store
from cpt_bench.matrix.config import ConfigError, config_from_dict
from cpt_bench.matrix.plan import describe, make_plan, prompt_training
from cpt_bench.recovery.lora import METADATA, PEFT_WEIGHTS, LoraError, LoraSettings, read_lora, train_lora
from cpt_bench.recovery.soft import train_soft_prompt
from cpt_bench.recovery.training import SoftPromptConfig, kd_loss

from .conftest import TINY_SEQLEN_TOKENS
from .prompt_helpers import instances, mc_pairs, rolling_texts
from .test_matrix import TRAINING, run_under, tiny_config, writable_cache
from .test_recovery import summary_cells

SOURCE = "wikipedia"


def _settings(**overrides) -> SoftPromptConfig:
    base = {"n_virtual_tokens": 4, "lr": 0.1, "warmup_steps": 1, "steps": 6, "batch_size": 2,
            "seqlen": TINY_SEQLEN_TOKENS, "eval_every": 3, "eval_windows": 4, "precision": "fp32"}
    return SoftPromptConfig(**(base | overrides))


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        folder)


def _compressed(folder):
    """The tiny model with 2-bit round-to-nearest weights: far from the dense model, so there is a gap to close."""
    model, tokenizer = _load(folder)
    compress_model(model, Spec.parse("rtn-w2g32"), progress=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, _filled_fake_cache, tmp_path_factory):
    """A LoRA adapter trained on the dense tiny model (rank 2 on q / v projections)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPT_BENCH_CACHE", str(_filled_fake_cache))
        model, tokenizer = _load(tiny_model_dir)
        settings = LoraSettings(rank=2, alpha=4, target_modules=["q_proj", "v_proj"], lr=0.05)
        return train_lora(model, tokenizer, _settings(), settings, SOURCE, tmp_path_factory.mktemp("lora") / "a",
                          model_name="tiny")


def test_lora_training_lowers_validation_loss_and_writes_a_peft_folder(lora_dir):
    meta = read_lora(lora_dir)
    curve = meta["curve"]
    assert [r["step"] for r in curve] == [0, 3, 6] and meta["improved"]
    assert min(r["val_loss"] for r in curve[1:]) < curve[0]["val_loss"]
    # rank 2 on q (32 -> 32) and v (32 -> 16) in 2 layers: 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert meta["trainable_parameters"] == 448
    assert meta["hyperparameters"]["lr"] == 0.05 and meta["hyperparameters"]["lora"]["rank"] == 2
    assert meta["tokens_seen"] == 6 * 2 * TINY_SEQLEN_TOKENS and meta["peak_memory_bytes"] > 0
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj",
                                                                                                      "v_proj"]


def test_lora_scores_identically_in_plain_lm_eval_and_through_cpt(tiny_model_dir, lora_dir):
    """Per-sample loglikelihoods (multiple choice and rolling) of ``hf ... peft=DIR`` and ``cpt ... lora=DIR``."""
    plain = HFLM(pretrained=str(tiny_model_dir), peft=str(lora_dir), device="cpu", dtype="float32", batch_size=4)
    ours = CptLM(pretrained=str(tiny_model_dir), lora=str(lora_dir), device="cpu", dtype="float32", batch_size=4)
    unadapted = CptLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    mc = instances("loglikelihood", mc_pairs())
    rolling = instances("loglikelihood_rolling", [(text,) for text in rolling_texts(n_words=40)])
    for requests, score in ((mc, lambda lm, r: [s for s, _ in lm.loglikelihood(r)]),
                            (rolling, lambda lm, r: lm.loglikelihood_rolling(r))):
        expected = score(plain, requests)
        assert score(ours, requests) == expected  # identical, not approximately equal
        assert score(unadapted, requests) != expected  # the adapter changes the scores
    assert ours.prompt_info["kind"] == "lora" and ours.prompt_info["trainable_parameters"] == 448
    assert ours.memory_record()["adapter_bytes"] == 448 * 4


def test_kd_prompt_lowers_the_kl_to_the_dense_model(tiny_model_dir, filled_fake_cache, tmp_path):
    student, tokenizer = _compressed(tiny_model_dir)
    teacher, _ = _load(tiny_model_dir)
    folder = train_soft_prompt(student, tokenizer, _settings(objective="kd", steps=9, lr=0.01), SOURCE,
                               tmp_path / "kd", model_name="tiny", compression="rtn-w2g32", teacher=teacher)
    meta = json.loads((folder / "prompt.json").read_text())
    kl = [record["val_kl"] for record in meta["curve"]]
    assert min(kl[1:]) < 0.8 * kl[0] and meta["hyperparameters"]["objective"] == "kd"
    assert meta["best"]["selected_on"] == "val_kl" and meta["best"]["val_kl"] == min(kl) and meta["improved"]
    assert 0 < meta["teacher_seconds"] < meta["train_seconds"]


def test_kd_lora_lowers_the_kl_to_the_dense_model(tiny_model_dir, filled_fake_cache, tmp_path):
    student, tokenizer = _compressed(tiny_model_dir)
    teacher, _ = _load(tiny_model_dir)
    folder = train_lora(student, tokenizer, _settings(objective="kd", steps=12), LoraSettings(rank=2, lr=0.01),
                        SOURCE, tmp_path / "kd", model_name="tiny", compression="rtn-w2g32", teacher=teacher)
    kl = [record["val_kl"] for record in read_lora(folder)["curve"]]
    assert min(kl[1:]) < kl[0], kl  # B starts at 0: step 0 is the compressed model, whose KL is small here


def test_kd_loss_by_hand(tiny_model_dir):
    """KL(teacher || student) per position on the tokens both predict: zero for the model against itself without a
    prompt, and the hand formula for a prompted model against another one."""
    model, _ = _load(tiny_model_dir)
    other, _ = _compressed(tiny_model_dir)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(0, 32)
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
        assert kd_loss(model, empty, ids, 1, teacher).item() == pytest.approx(0, abs=1e-6)
        prompt = torch.randn(3, 32) * 0.1
        embeds = torch.cat([model.get_input_embeddings()(ids[:, :1]), prompt.expand(2, -1, -1),
                            other.get_input_embeddings()(ids[:, 1:])], 1)
        student = other(inputs_embeds=embeds).logits[:, 3:-1].log_softmax(-1)  # predictions of tokens 1 .. 11
        reference = teacher[:, :-1].log_softmax(-1)
        by_hand = (reference.exp() * (reference - student)).sum(-1).mean()
        assert kd_loss(other, prompt, ids, 1, teacher).item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rank": 0}, "LoRA setting rank must be a positive integer, got 0"),
    ({"objectives": ["mse"]}, "LoRA setting objectives must be a non-empty list of distinct objectives"),
    ({"target_modules": []}, "LoRA setting target_modules must be a non-empty list"),
    ({"dropout": 1.5}, r"LoRA setting dropout must be a number in \[0, 1\)"),
])
def test_bad_lora_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(LoraError, match=message) as caught:
        LoraSettings(**overrides)
    assert "\n" not in str(caught.value)


def test_lora_folder_checks_before_loading(tiny_model_dir, lora_dir, tmp_path):
    with pytest.raises(PromptAdapterError, match="give one of hard_prompt, soft_prompt, lora, eora and idp, not "
                                                 "lora and hard_prompt"):
        CptLM(pretrained=str(tiny_model_dir), lora=str(lora_dir), hard_prompt="paper")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("adapter_config.json", PEFT_WEIGHTS, METADATA):
        (damaged / name).write_bytes((lora_dir / name).read_bytes())
    (damaged / PEFT_WEIGHTS).write_bytes(b"x" + (lora_dir / PEFT_WEIGHTS).read_bytes()[1:])
    with pytest.raises(LoraError, match="fails its sha256 check"):
        CptLM(pretrained=str(tiny_model_dir), lora=str(damaged))
    with pytest.raises(LoraError, match="is not a LoRA folder: adapter_config.json is missing"):
        CptLM(pretrained=str(tiny_model_dir), lora=str(tmp_path))


# --- PEFT LoRA folders written elsewhere ---------------------------------------------------------------------------

def _peft_folder(model, folder, config):
    from peft import get_peft_model

    torch.manual_seed(0)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA written by PEFT itself on the tiny model, with random B (PEFT's init_lora_weights=False) so it acts."""
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return _peft_folder(_load(tiny_model_dir)[0], tmp_path_factory.mktemp("peft") / "a", config)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT 0.21 on transformers 5
def test_a_lora_folder_written_by_peft_scores_as_plain_peft(tiny_model_dir, peft_dir):
    from peft import PeftModel

    assert not (peft_dir / METADATA).exists()
    plain = HFLM(pretrained=str(tiny_model_dir), peft=str(peft_dir), device="cpu", dtype="float32", batch_size=4)
    ours = CptLM(pretrained=str(tiny_model_dir), lora=str(peft_dir), device="cpu", dtype="float32", batch_size=4)
    mc = instances("loglikelihood", mc_pairs())
    assert [s for s, _ in ours.loglikelihood(mc)] == [s for s, _ in plain.loglikelihood(mc)]
    reference = PeftModel.from_pretrained(_load(tiny_model_dir)[0], str(peft_dir)).eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.model(ids).logits
        assert torch.equal(logits, reference(ids).logits)
        assert not torch.equal(logits, _load(tiny_model_dir)[0](ids).logits)  # the adapter acts
    info = ours.prompt_info
    stored = [param for name, param in reference.named_parameters() if ".lora_" in name]
    assert info["kind"] == "lora" and info["format"] == "peft" and info["trained_on"] is None
    assert info["trainable_parameters"] == sum(param.numel() for param in stored)
    verification = info["verification"]
    assert verification["base_model"] == {"adapter_config": str(tiny_model_dir), "loaded": str(tiny_model_dir),
                                          "same_name": True}
    assert verification["tensors_shape_checked"] == len(stored) and verification["modules_found"] == len(stored) // 2
    assert verification["training_record"] is False and verification["tensors_not_shape_checked"] == []


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT 0.21 on transformers 5
def test_peft_folders_that_are_no_lora_or_do_not_fit_are_refused(tiny_model_dir, peft_dir, tmp_path):
    from peft import LoraConfig, PromptTuningConfig, TaskType
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = _load(tiny_model_dir)
    prompt = _peft_folder(model, tmp_path / "prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                         num_virtual_tokens=2))
    with pytest.raises(LoraError, match="is a PEFT folder of peft_type 'PROMPT_TUNING', not LORA") as caught:
        CptLM(pretrained=str(tiny_model_dir), lora=str(prompt))
    assert "\n" not in str(caught.value)
    wider = LlamaForCausalLM(LlamaConfig(**(model.config.to_dict() | {"hidden_size": 48})))
    other = _peft_folder(wider, tmp_path / "other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\."
                                        r"weight has shape \[2, 48\], but model\.layers\.0\.self_attn\.q_proj of "
                                        r"model .* needs \[2, 32\]"):
        CptLM(pretrained=str(tiny_model_dir), lora=str(other))
    (other / PEFT_WEIGHTS).rename(other / "adapter_model.bin")
    with pytest.raises(LoraError, match=r"adapter_model.safetensors is missing \(pickled adapter_model.bin"):
        CptLM(pretrained=str(tiny_model_dir), lora=str(other))


# --- in the matrix -----------------------------------------------------------------------------------------------

def baselines_config(model, **prompts) -> dict:
    """dense, rtn-w4g32 x (none, hard, and at rtn-w4g32 where they are trained: soft lm, soft kd, LoRA lm) x ppl and
    PIQA."""
    soft = {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"], "training": TRAINING, "objectives": ["lm", "kd"]}
    prompts = {"hard": ["paper"], "soft": soft, "lora": {"rank": 2, "lr": 0.01}, **prompts}
    return tiny_config(model, name="baselines", prompts=prompts,
                       transfer={"compression_levels": False, "compression_types": False})


def test_objectives_and_lora_expand_to_their_artifacts_and_cells():
    plan = make_plan(config_from_dict(baselines_config("embedded") | {"prompts": {
        "soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"], "objectives": ["lm", "kd"], "seeds": [0, 1],
                 "controls": ["init"]}, "lora": {"objectives": ["lm", "kd"]}}}))
    learned = [f"{how}-wikipedia@rtn-w4g32#s{seed}" for how in ("soft", "soft+kd", "lora", "lora+kd")
               for seed in (0, 1)]
    assert [p.id for p in plan.soft_prompts] == [*learned, "init@rtn-w4g32", "trivial"]  # one init for all of them
    assert [prompt_training(plan.config, p).objective for p in plan.soft_prompts] == ["lm", "lm", "kd", "kd"] * 2 + [
        "lm", "lm"]
    at_level = {c.prompt.id for c in plan.cells if c.compression == "rtn-w4g32"}
    assert at_level == {"none", *learned, "init@rtn-w4g32", "trivial"}
    cell = next(c for c in plan.cells if c.prompt.id == "lora-wikipedia@rtn-w4g32#s1")
    assert cell.id.startswith("rtn-w4g32__lora-wikipedia@rtn-w4g32-s1__")
    assert "4 LoRA adapters (lora-wikipedia@rtn-w4g32#s0" in describe(plan) and "LoRA adapters: rank 4" in describe(
        plan)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c | {"kernels": "real"}, r"^kernels: got 'real', expected simulated with prompts\.lora"),
    (lambda c: c | {"prompts": {"lora": {"rank": 2}}}, r"^prompts\.lora: given without soft prompts"),
    (lambda c: c | {"prompts": {"soft": c["prompts"]["soft"] | {"objectives": ["lm", "lm"]}}},
     r"^prompts\.soft\.objectives\[1\]: 'lm' repeats objectives\[0\]; expected each once$"),
    (lambda c: c | {"prompts": {"soft": c["prompts"]["soft"] | {"training": {"objective": "kd"}}}},
     r"^prompts\.soft\.training\.objective: got 'kd', expected left out: list the objectives"),
    (lambda c: c | {"prompts": {**c["prompts"], "lora": {"rank": -1}}},
     r"^prompts\.lora: LoRA setting rank must be a positive integer, got -1$"),
])
def test_bad_lora_and_objective_configs_fail_with_their_key_path(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(change(baselines_config("embedded")))


@pytest.fixture(scope="module")
def baselines_run(_filled_fake_cache, tiny_model_dir, tmp_path_factory):
    cache = writable_cache(_filled_fake_cache, tmp_path_factory, "baselines-cache")
    return run_under(cache, baselines_config(tiny_model_dir), tmp_path_factory.mktemp("baselines"))


def test_lora_and_kd_cells_record_their_method_and_budget(baselines_run, tiny_model_dir):
    cells = store.read_cells(baselines_run)
    assert len(cells) == 3 * 2 + 6 * 2  # dense: none, hard, trivial; rtn: those, soft, soft+kd, lora; 2 targets
    lora = cells["rtn-w4g32__lora-wikipedia@rtn-w4g32__cpt_ppl_wikipedia"]["prompt"]
    assert lora["kind"] == "lora" and lora["objective"] == "lm" and lora["trainable_parameters"] > 0
    assert lora["tokens_seen"] == TRAINING["steps"] * TRAINING["batch_size"] * TRAINING["seqlen"]
    assert lora["train_peak_memory_bytes"] > 0 and lora["hyperparameters"]["lr"] == 0.01
    kd = cells["rtn-w4g32__soft+kd-wikipedia@rtn-w4g32__cpt_ppl_wikipedia"]["prompt"]
    assert kd["objective"] == "kd" and kd["trainable_parameters"] == TRAINING["n_virtual_tokens"] * 32
    assert kd["teacher_seconds"] > 0
    folder = baselines_run / "prompts" / "lora-wikipedia@rtn-w4g32"
    assert read_lora(folder)["compression"] == "rtn-w4g32" and (folder / "adapter_config.json").is_file()
    summary = json.loads((baselines_run / "summary.json").read_text())
    prompts = {p["id"]: p for p in summary["prompts"]}
    assert prompts["lora-wikipedia@rtn-w4g32"]["kind"] == "lora"
    assert prompts["soft+kd-wikipedia@rtn-w4g32"]["objective"] == "kd"
    assert "gap_closed" in summary_cells(baselines_run)["rtn-w4g32__lora-wikipedia@rtn-w4g32__cpt_ppl_wikipedia"]


def test_report_has_a_methods_table_per_level(baselines_run):
    report = (baselines_run / "report" / "report.md").read_text()
    assert "## Recovery methods per compression level" in report
    assert "### rtn-w4g32: recovery methods and their budget; trained on wikipedia" in report
    header = next(line for line in report.splitlines() if line.startswith("| method"))
    assert "trainable params" in header and "gap closed, cpt_ppl_wikipedia" in header and "vs none, cpt_piqa" in header
    for label in ("hard:paper", "soft:wikipedia@rtn-w4g32", "soft+kd:wikipedia@rtn-w4g32", "lora:wikipedia@rtn-w4g32"):
        assert re.search(rf"^\| {re.escape(label)} .*\|", report, re.M), label


def test_the_recorded_seed_fixes_the_adapter_whatever_the_global_generator_held(tiny_model_dir, filled_fake_cache,
                                                                                 tmp_path):
    digests = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model, tokenizer = _load(tiny_model_dir)
        folder = train_lora(model, tokenizer, _settings(steps=2, eval_every=2), LoraSettings(rank=2),
                            SOURCE, tmp_path / str(global_seed), model_name="tiny")
        digests.append(read_lora(folder)["sha256"])
    assert digests[0] == digests[1]
