"""The recovery-kind registry: every registered method offers what the matrix, the adapter and the reports use, and
those parts list the registry instead of naming kinds."""

from __future__ import annotations

import pytest
import torch

from cpt_bench.lmeval.adapter import ACCEPTED_MODEL_ARGS, RECOVERY_ARGS, CptLM, PromptAdapterError
from cpt_bench.matrix.store import SUMMARY_KEYS_BY_PROMPT_KIND
from cpt_bench.recovery import LEARNED_KINDS, RECOVERY_KINDS
from cpt_bench.recovery.hard import HardPromptKind, hard_prompt_text
from cpt_bench.recovery.kind import NoRecovery, RecoveryKind, registry
from cpt_bench.report.board_page import KIND_COLOURS

from .conftest import build_tiny_tokenizer


def _overrides(kind: RecoveryKind, method: str) -> bool:
    return getattr(type(kind), method) is not getattr(RecoveryKind, method)


@pytest.mark.parametrize("name", list(RECOVERY_KINDS))
def test_every_kind_offers_what_its_role_needs(name):
    kind = RECOVERY_KINDS[name]
    assert kind.name == name and kind.label and kind.colour.startswith("#")
    if kind.learned:
        assert kind.metadata_file and all(_overrides(kind, method) for method in ("train", "read_meta",
                                                                                  "describe_settings")), name
        assert {"source", "trained_at"} <= set(kind.summary_keys)
    if kind.model_arg:
        assert _overrides(kind, "apply") and kind.model_arg in ACCEPTED_MODEL_ARGS, name


def test_the_package_lists_the_registry():
    """Summary schema, leaderboard colours, learned kinds and the adapter's model_args all follow the registry."""
    assert list(SUMMARY_KEYS_BY_PROMPT_KIND) == list(KIND_COLOURS) == list(RECOVERY_KINDS)
    assert LEARNED_KINDS == ("soft", "lora")
    assert RECOVERY_ARGS == {"hard_prompt": RECOVERY_KINDS["hard"], "soft_prompt": RECOVERY_KINDS["soft"],
                             "lora": RECOVERY_KINDS["lora"], "eora": RECOVERY_KINDS["eora"],
                             "idp": RECOVERY_KINDS["idp"]}


def test_a_name_or_model_arg_registered_twice_is_refused():
    with pytest.raises(ValueError, match="same name or model_arg"):
        registry(NoRecovery(), NoRecovery())

    class Other(HardPromptKind):
        name = "other"

    with pytest.raises(ValueError, match="same name or model_arg"):
        registry(HardPromptKind(), Other())


def test_two_kinds_at_once_are_refused_naming_every_model_arg(tiny_model_dir):
    with pytest.raises(PromptAdapterError, match="^give one of hard_prompt, soft_prompt, lora, eora and idp, not "
                                                 "soft_prompt and hard_prompt$"):
        CptLM(pretrained=str(tiny_model_dir), soft_prompt="x", hard_prompt="paper")


def test_the_hard_kind_applies_the_texts_token_embeddings():
    tokenizer = build_tiny_tokenizer()
    embedding = torch.nn.Embedding(len(tokenizer), 8)
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: embedding
    kind = RECOVERY_KINDS["hard"]
    applied = kind.apply(model, tokenizer, "paper", kind.read("paper"), "tiny", False)
    ids = tokenizer(hard_prompt_text("paper"), add_special_tokens=False)["input_ids"]
    assert applied.model is model and applied.position is None and applied.tensors == []
    assert torch.equal(applied.prompt, embedding(torch.tensor(ids)))
    assert applied.info == {"kind": "hard", "text": hard_prompt_text("paper")}
