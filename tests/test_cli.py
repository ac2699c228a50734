"""The cpt-bench command line on the tiny model and fake cache."""

from __future__ import annotations

import json

import pytest

from cpt_bench.cli import main

from .conftest import TINY_SEQLEN_TOKENS


def test_evaluate_writes_results_with_provenance(filled_fake_cache, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--tasks", "cpt_piqa,cpt_ppl_milton", "--limit", "2",
                 "--ppl-limit", "2", "--seqlen", str(TINY_SEQLEN_TOKENS), "--batch-size", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"cpt_piqa", "cpt_ppl_milton"}
    assert [results["n-samples"][name]["effective"] for name in ("cpt_piqa", "cpt_ppl_milton")] == [2, 2]
    meta = results["cpt_bench"]
    assert meta["settings"]["seqlen_tokens"] == TINY_SEQLEN_TOKENS and meta["wall_seconds"] > 0
    assert meta["peak_memory_bytes"] > 0 and meta["peak_memory_kind"] == "cpu_peak_rss"
    env = meta["environment"]
    assert env["versions"]["torch"] != "missing" and env["versions"]["lm_eval"] != "missing"
    assert env["seeds"]["random_seed"] == 0 and env["hardware"]["cpu_count"] >= 1 and "commit" in env["git"]
    assert "cpt_piqa" in (out / "results.md").read_text()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--limit", "0"], "limit_items must be a positive count or omitted, got 0"),
    (["evaluate", "--ppl-limit", "-3"], "limit_windows must be a positive count or omitted, got -3"),
    (["evaluate", "--seqlen", "0"], "seqlen and batch size must be positive"),
    (["evaluate", "--tasks", ""], "no tasks given"),
    (["evaluate", "--model", "{tiny}", "--tasks", "cpt_piqa,cpt_nope"],
     "unknown task(s) cpt_nope; expected lm-eval task or group names"),
    (["evaluate", "--model", "/no/such/model/folder"], "could not load model '/no/such/model/folder'"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, filled_fake_cache, tiny_model_dir):
    assert main([arg.format(tiny=tiny_model_dir) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("cpt-bench: error:") and "\n" not in err
