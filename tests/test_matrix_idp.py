"""IDP prompts in the transfer matrix: the ``prompts.idp`` config entry and its one-line refusals, the plan (every
level, every target but perplexity ones, members as the transfer settings apply them), a run on the tiny model with a
loglikelihood and a generative target (choices recorded per cell and per item), and the report's IDP table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from cpt_bench.matrix import store
from cpt_bench.matrix.config import ConfigError, config_from_dict, load_config
from cpt_bench.matrix.plan import (
    IDP_CHOICE_FRACTION,
    ITEM_SECONDS,
    describe,
    estimate_seconds,
    idp_choice_seconds,
    make_plan,
    shard_plan,
)
from tests.compress_helpers import _one_thread  # noqa: F401  (autouse)
from tests.test_matrix import matrix_cache, run_under  # noqa: F401  (module-scoped fixture)

SET = "idp-attention:hard-paper+trivial"


def planning_config(**idp) -> dict:
    return {"name": "idp-plan", "compression": {"specs": ["dense", "rtn-w4g32", "rtn-w3g32"]},
            "prompts": {"hard": ["paper", "text:The"],
                        "soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"]},
                        "idp": idp or {"sets": [["paper", "soft-wikipedia@rtn-w4g32"]]}},
            "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 10},
                        {"task": "cpt_coqa", "limit": 4, "gen_kwargs": {"max_gen_toks": 8}}]}


def idp_cells(plan) -> set[tuple[str, str, str]]:
    return {(c.compression, c.prompt.id, c.target.name) for c in plan.cells if c.prompt.kind == "idp"}


def test_idp_cells_run_at_every_level_on_every_target_but_perplexity_with_set_and_rule_in_their_id():
    config = config_from_dict(planning_config(sets=[["paper", "soft-wikipedia@rtn-w4g32"], ["hard-paper", "text:The"]],
                                              rules=["attention", "loss"]))
    assert config.prompts.idp.sets == [["hard-paper", "soft-wikipedia@rtn-w4g32"], ["hard-paper", "hard-text3"]]
    assert config_from_dict(config.to_dict()) == config  # what a run folder stores reads back the same
    plan = make_plan(config)
    prompts = [f"idp-{rule}:{members}" for members in ("hard-paper+soft-wikipedia@rtn-w4g32", "hard-paper+hard-text3")
               for rule in ("attention", "loss")]
    assert idp_cells(plan) == {(spec, prompt, task) for spec in ("dense", "rtn-w4g32", "rtn-w3g32")
                               for prompt in prompts for task in ("cpt_piqa", "cpt_coqa+max_gen_toks=8")}
    cell = next(c for c in plan.cells if c.prompt.id == prompts[0] and c.compression == "rtn-w3g32")
    assert cell.id == "rtn-w3g32__idp-attention-hard-paper+soft-wikipedia@rtn-w4g32__cpt_piqa"
    assert cell.record()["prompt_choice"]["members"] == ("hard-paper", "soft-wikipedia@rtn-w4g32")
    text = describe(plan, None)
    assert f"{prompts[0]} (6 cells)" in text and "not on perplexity targets" in text
    assert f"rtn-w3g32: {sum(c.compression == 'rtn-w3g32' for c in plan.cells)} cells; prompts" in text


def test_the_time_estimate_counts_the_choice_passes():
    """An IDP cell costs its scoring plus one context forward per member and document (by loss dearer than by
    attention); other cells pay nothing for it."""
    plan = make_plan(config_from_dict(planning_config(sets=[["paper", "text:The"]], rules=["attention", "loss"])))
    cells = {(c.compression, c.prompt.id, c.target.name): c for c in plan.cells}
    piqa, coqa = ("dense", "idp-attention:hard-paper+hard-text3", "cpt_piqa"), "cpt_coqa+max_gen_toks=8"
    assert idp_choice_seconds(cells[piqa]) == pytest.approx(2 * IDP_CHOICE_FRACTION["attention"] * ITEM_SECONDS)
    assert idp_choice_seconds(cells["dense", "idp-loss:hard-paper+hard-text3", "cpt_piqa"]) > \
        idp_choice_seconds(cells[piqa]) > 0
    assert idp_choice_seconds(cells["dense", "idp-attention:hard-paper+hard-text3", coqa]) > \
        idp_choice_seconds(cells[piqa])  # a generative context is longer than an item's
    assert idp_choice_seconds(cells["dense", "hard-paper", "cpt_piqa"]) == 0
    with_idp = estimate_seconds(plan)["cells"]
    plain = make_plan(config_from_dict(planning_config(sets=[["paper", "text:The"]]) | {
        "prompts": {"hard": ["paper", "text:The"], "soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w4g32"]}}}))
    assert with_idp > estimate_seconds(plain)["cells"]


def test_a_soft_member_is_applied_as_the_transfer_settings_say():
    """Without transfers across levels the soft member has no cell at another level: no IDP cell there either."""
    config = config_from_dict(planning_config() | {"transfer": {"compression_levels": False,
                                                                "compression_types": False}})
    assert {spec for spec, _, _ in idp_cells(make_plan(config))} == {"rtn-w4g32"}


def test_a_shard_holding_an_idp_group_builds_its_members_artifacts():
    """A shard of one group: the IDP group at rtn-w3g32 needs the soft member, trained at rtn-w4g32, built."""
    plan = make_plan(config_from_dict(planning_config()))
    groups = list(plan.groups())
    index = groups.index(next(key for key in groups if key[0] == "rtn-w3g32" and key[1].kind == "idp"))
    shard = shard_plan(plan, index, len(groups))
    assert [p.id for p in shard.soft_prompts] == ["soft-wikipedia@rtn-w4g32"]
    assert shard.compressed == ("rtn-w4g32", "rtn-w3g32")


def test_a_user_folder_is_a_member_kept_as_its_absolute_path(tmp_path):
    folder = tmp_path / "my-prompt"
    folder.mkdir()
    config = config_from_dict(planning_config(sets=[["paper", str(folder)]]))
    (prompt,) = config.prompts.idp_choices()
    assert prompt.members == ("hard-paper", str(folder.resolve())) and prompt.id == "idp-attention:hard-paper+my-prompt"
    plan = make_plan(config)
    assert len(idp_cells(plan)) == 6 and "soft-wikipedia@rtn-w4g32" in [p.id for p in plan.soft_prompts]


@pytest.mark.parametrize("idp, message", [
    ({"sets": [["paper", "soft-shakespeare@rtn-w4g32"]]},
     r"^prompts\.idp\.sets\[0\]\[1\]: got 'soft-shakespeare@rtn-w4g32', expected a prompt of this config \(hard-paper, "
     r"hard-text3, soft-wikipedia@rtn-w4g32, trivial\) or a soft-prompt folder"),
    ({"sets": [["paper"]]}, r"^prompts\.idp\.sets\[0\]: got \['paper'\], expected two or more prompts"),
    ({"sets": [["paper", "text:The"]], "rules": ["attn"]},
     r"^prompts\.idp\.rules\[0\]: got 'attn', expected one of attention, loss$"),
    ({"sets": [["paper", "text:Other"]]}, r"^prompts\.idp\.sets\[0\]\[1\]: got 'text:Other', expected a hard prompt "
                                          r"listed in prompts\.hard"),
    ({"sets": [["paper", "hard-paper"]]}, r"^prompts\.idp\.sets\[0\]\[1\]: 'hard-paper' repeats"),
    ({"sets": [["paper", "./no/such-folder"]]}, r"^prompts\.idp\.sets\[0\]\[1\]: got './no/such-folder', expected an "
                                                r"existing soft-prompt folder"),
    ({"sets": [["paper", "text:The"]], "rule": "loss"},
     r"^prompts\.idp\.rule: unknown key; expected one of rules, sets$"),
])
def test_bad_idp_entries_are_refused_in_one_line(idp, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_from_dict(planning_config(**idp))
    assert "\n" not in str(error.value)


def test_lora_adapters_are_no_idp_members():
    config = copy.deepcopy(planning_config(sets=[["paper", "lora-wikipedia@rtn-w4g32"]]))
    config["prompts"]["lora"] = {"rank": 2}
    with pytest.raises(ConfigError, match=r"got 'lora-wikipedia@rtn-w4g32', expected a prompt of this config"):
        config_from_dict(config)


# --- a run on the tiny model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def idp_run(matrix_cache, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """dense x (none, hard paper, the trivial control, IDP of the two) x (PIQA, CoQA generating 4 tokens)."""
    config = {"name": "tiny-idp", "model": str(tiny_model_dir), "device": "cpu", "batch_size": 4,
              "compression": {"specs": ["dense"]},
              "prompts": {"hard": ["paper"], "idp": {"sets": [["paper", "trivial"]]}},
              "targets": [{"task": "cpt_piqa", "limit": 4}, {"task": "cpt_coqa", "limit": 3,
                                                               "gen_kwargs": {"max_gen_toks": 4}}]}
    return run_under(matrix_cache, config, tmp_path_factory.mktemp("idp"))


def test_idp_cells_record_their_choices_per_cell_and_per_item(idp_run):
    cells = store.read_cells(idp_run)
    found = {record["cell"]["task"]: record for record in cells.values() if record["cell"]["prompt"] == SET}
    assert set(found) == {"cpt_piqa", "cpt_coqa+max_gen_toks=4"}
    for record in found.values():
        chosen, examples = record["prompt"]["chosen"], record["examples"]
        assert list(chosen) == ["hard-paper", "trivial"] and record["prompt"]["rule"] == "attention"
        # the set stores what its members store: the hard prompt nothing, the control its one embedding
        hard, control = record["prompt"]["prompts"].values()
        assert hard["stored_bytes"] == 0 and control["stored_bytes"] > 0
        assert record["prompt"]["stored_bytes"] == control["stored_bytes"]
        assert sum(chosen.values()) == len(examples["doc_ids"]) == record["cell"]["limit"]
        assert {member: examples["choices"].count(member) for member in chosen} == chosen
    assert "generations" in found["cpt_coqa+max_gen_toks=4"]["examples"]


def test_summary_and_report_set_idp_against_each_member_and_the_best_in_hindsight(idp_run):
    summary = json.loads((idp_run / store.SUMMARY_FILE).read_text(encoding="utf-8"))
    cells = {(c["prompt"], c["task"]): c for c in summary["cells"]}
    report = (idp_run / "report" / "report.md").read_text(encoding="utf-8")
    assert "## IDP prompts" in report
    for task in ("cpt_piqa", "cpt_coqa+max_gen_toks=4"):
        block = cells[SET, task]["idp"]
        values = {member: cells[member, task]["value"] for member in ("hard-paper", "trivial")}
        assert block["vs_members"]["hard-paper"]["estimate"] == pytest.approx(cells[SET, task]["value"]
                                                                             - values["hard-paper"])
        best = block["best_in_hindsight"]
        assert best["values"] == pytest.approx(values) and best["optimistic"]
        assert values[best["member"]] == max(values.values())
        assert best["estimate"] == pytest.approx(cells[SET, task]["value"] - values[best["member"]])
        chosen = " / ".join(f"{member} {count}" for member, count in block["chosen"].items())
        assert chosen in report
    assert "best single prompt in hindsight (chosen on the same items: optimistic)" in report


def test_the_matrix_page_entry_and_the_shipped_config_validate():
    """docs/matrix.md's ``prompts.idp`` example is a valid config entry; configs/idp.yaml plans its 4 IDP cells."""
    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "matrix.md").read_text(encoding="utf-8")
    snippet = page.split("## IDP prompts", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    prompts = yaml.safe_load(snippet)["prompts"]
    config = config_from_dict({"name": "doc", "compression": {"specs": ["dense", "rtn-w3g64"]}, "prompts": prompts,
                               "targets": [{"task": "cpt_piqa", "limit": 10}]})
    assert [p.id for p in config.prompts.idp_choices()] == [
        f"idp-{rule}:hard-paper+{member}" for member in ("soft-wikipedia@rtn-w3g64", "hard-text3")
        for rule in ("attention", "loss")]
    assert len(idp_cells(make_plan(load_config(repo / "configs" / "idp.yaml")))) == 4


def test_the_recovery_study_sets_idp_beside_every_method_at_both_levels_as_its_page_says():
    """configs/recovery-study.yaml: IDP of the hard prompt and each level's seed-0 soft prompt, on the zero-shot
    target at that level; docs/matrix.md states the plan's cell and group counts."""
    repo = Path(__file__).resolve().parents[1]
    plan = make_plan(load_config(repo / "configs" / "recovery-study.yaml"))
    levels = ("gptq-w3g64", "sparsegpt-50+gptq-w4g64")
    assert idp_cells(plan) == {(level, f"idp-attention:hard-paper+soft-wikipedia@{level}#s0", task)
                               for level in levels for task in ("cpt_piqa",)}
    page = " ".join((repo / "docs" / "matrix.md").read_text(encoding="utf-8").split())
    assert f"plans {len(plan.cells)} cells in {len(plan.groups())} groups" in page
