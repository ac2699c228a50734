"""The ``cpt`` model for lm-eval: Hugging Face's HFLM that also understands cpt_bench model names.

``pretrained=embedded`` resolves to the cached embedded default model, so lm-eval command lines
need no cache path. Registered under the name ``cpt`` when this module is imported (``cpt-lm-eval``
does that, since lm-eval has no plugin discovery).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (fills the registry first: registering into an empty one hides the built-ins)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from cpt_bench.assets.model import resolve_model


@register_model("cpt")
class CptLM(HFLM):
    """HFLM whose ``pretrained`` may be a cpt_bench model name (``embedded``) as well as a path or Hub id."""

    def __init__(self, pretrained: str = "embedded", **kwargs):
        if isinstance(pretrained, str):
            pretrained = resolve_model(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
