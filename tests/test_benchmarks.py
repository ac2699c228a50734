"""Smoke tests of the benchmark scripts on tiny random models: they run end to end and write what they promise.
No timings are asserted (they depend on the machine)."""

from __future__ import annotations

import json
from pathlib import Path

from .compress_helpers import _one_thread  # noqa: F401  (autouse fixture)
from .test_families import bos_adding_tokenizer, save_family

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_generation_speed_runs_and_records_every_variant(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import generation_speed

    family = save_family("llama", bos_adding_tokenizer(), tmp_path / "model")
    out = tmp_path / "generation-speed.json"
    record = generation_speed.main(["--model", str(family.folder), "--n-tokens", "2", "--batch-size", "2",
                                    "--contexts", "3", "--min-context", "4", "--max-context", "9",
                                    "--max-gen-toks", "2", "--repeats", "2", "--out", str(out)])
    labels = [generation_speed.UNPROMPTED, generation_speed.CACHED, generation_speed.CONCATENATED]
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert list(record["seconds"]) == labels and all(len(record["seconds"][label]) == 2 for label in labels)
    assert record["ratio_to_unprompted"][generation_speed.UNPROMPTED] == 1.0
    assert record["cached_equals_concatenated"] is True
    assert len(record["context_tokens"]) == 3 and record["environment"]["versions"]
