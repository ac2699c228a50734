"""SQuAD 2.0's answer normalisation, exact match and token F1, for lm-eval's ``coqa`` task under transformers 5.

lm-eval 0.4.13's ``coqa`` scores with ``transformers.data.metrics.squad_metrics.compute_exact`` and
``compute_f1``; transformers 5 removed that module, so the built-in task cannot even be imported. These are the
definitions of the official SQuAD 2.0 evaluation script (which that module carried), registered under the old
module name so lm-eval's own ``coqa`` functions run unchanged.
"""

from __future__ import annotations

import collections
import re
import string
import sys
import types

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_MODULE = "transformers.data.metrics.squad_metrics"


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def get_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 when the normalised answers are equal, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Harmonic mean of token precision and recall of the normalised answers (1 when both are empty)."""
    gold, pred = get_tokens(a_gold), get_tokens(a_pred)
    if not gold or not pred:
        return float(gold == pred)
    same = sum((collections.Counter(gold) & collections.Counter(pred)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def provide_transformers_module() -> None:
    """Make ``import transformers.data.metrics.squad_metrics`` work: a no-op where transformers still has it."""
    try:
        import transformers.data.metrics.squad_metrics  # noqa: F401
    except ImportError:
        package = sys.modules.setdefault(_MODULE.rsplit(".", 1)[0], types.ModuleType(_MODULE.rsplit(".", 1)[0]))
        package.squad_metrics = sys.modules.setdefault(_MODULE, sys.modules[__name__])
