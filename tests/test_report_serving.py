"""``report.serving``: memory saved by compression against what a prompt costs to serve, by hand on a fixture."""

from __future__ import annotations

import json
from pathlib import Path

from cpt_bench.report import write_report
from cpt_bench.report.serving import FP16_BYTES, generation_tables, serving_tables
from cpt_bench.report.tables import Summary

FIXTURES = Path(__file__).parent / "fixtures"
KV_VALUES = 2 * 30 * 3 * 64  # keys and values, 30 layers, 3 kv heads of 64: one position's scalars
DENSE_FP16 = 269_060_352


def _summary_with_memory() -> dict:
    """The report fixture as cells with the memory record write it."""
    summary = json.loads((FIXTURES / "matrix_summary.json").read_text(encoding="utf-8"))
    for compression in summary["compressions"]:
        compression["dense_fp16_bytes"] = DENSE_FP16
    for prompt in summary["prompts"]:
        if prompt["kind"] != "none":
            prompt.update(kv_values_per_token=KV_VALUES, embedding_bytes=prompt["n_tokens"] * 576 * 4,
                          adapter_bytes=0)
    resident = {"dense": 538_000_000, "rtn-w3g64": 400_000_000}  # sparsegpt-2:4 predates the record
    for cell in summary["cells"]:
        cell["resident_bytes"] = resident.get(cell["compression"])
    return summary


def test_saved_bytes_and_prompt_caches_by_hand():
    (table,) = serving_tables(Summary(_summary_with_memory()))
    rows = {(row[0], row[1]): row for row in table.rows}
    kv = 20 * KV_VALUES * FP16_BYTES  # a 20-token soft prompt's fp16 cache per sequence: 460,800 bytes
    saved = DENSE_FP16 - 95_000_000
    row = rows[("rtn-w3g64", "soft (20 tokens)")]
    assert row[2:] == [f"{saved / 1e6:.1f}", "138.0", f"{20 * 576 * 4 / 1e3:.1f}", f"{kv / 1e3:.1f}",
                       f"{kv / 1e6:.1f}", f"{32 * kv / 1e6:.1f}", f"{saved // kv:,}"]
    assert rows[("rtn-w3g64", "hard (24 tokens)")][5] == f"{24 * KV_VALUES * FP16_BYTES / 1e3:.1f}"
    assert rows[("sparsegpt-2:4", "soft (20 tokens)")][3] == "–"  # no resident record for that level
    assert not any(row[0] == "dense" for row in table.rows)  # dense saves nothing


def test_summaries_without_the_memory_record_have_no_serving_section(tmp_path):
    plain = json.loads((FIXTURES / "matrix_summary.json").read_text(encoding="utf-8"))
    assert serving_tables(Summary(plain)) == []
    paths = write_report(_summary_with_memory(), tmp_path)
    assert "## Memory saved by compression vs memory the prompt costs" in paths[0].read_text(encoding="utf-8")
    assert tmp_path / "serving-cost.png" in paths


def test_generation_table_holds_the_prompt_cache_per_sequence_and_its_reads_over_the_decode(tmp_path):
    summary = _summary_with_memory()
    assert generation_tables(Summary(summary)) == []  # no generative target
    summary["targets"][0]["max_gen_toks"] = 16
    (table,) = generation_tables(Summary(summary))
    assert table.title.startswith(f"Prompt cache during generation on {summary['targets'][0]['task']}")
    rows = {(row[0], row[1]): row for row in table.rows}
    kv = 20 * KV_VALUES * FP16_BYTES
    assert rows[("rtn-w3g64", "soft (20 tokens)")][2:] == [f"{kv / 1e3:.1f}", f"{32 * kv / 1e6:.1f}",
                                                           f"{16 * kv / 1e6:.1f}"]
    assert not any(row[1].startswith("lora") for row in table.rows)  # an adapter holds no cache
    paths = write_report(summary, tmp_path)
    assert "## Prompt cache during generation" in paths[0].read_text(encoding="utf-8")
