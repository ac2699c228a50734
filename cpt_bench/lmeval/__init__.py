"""lm-eval integration: the ``cpt`` model adapter, ``cpt-lm-eval``, our task folder, and the ``lmeval:`` corpus kind
(registered here, so that every user of this package can name an lm-eval task as a corpus)."""

from cpt_bench.corpus import register_corpus_kind
from cpt_bench.lmeval.corpus_kind import LMEVAL_CORPUS

register_corpus_kind(LMEVAL_CORPUS)
