"""Recovery methods: what conditions or corrects a (possibly compressed) frozen model to recover its quality.

``RECOVERY_KINDS`` registers every method (a ``kind.RecoveryKind`` each, in the order reports list them): ``none``,
text prompts (``hard``), learned soft prompts (``soft``), LoRA adapters (``lora``), training-free low-rank
corrections (``eora``) and sets of prompts chosen per document (``idp``); ``kind`` says what each
offers the matrix, the ``cpt`` adapter and the reports. Besides them:
``training`` holds the training loop and settings the learned kinds share, ``soft_init`` a soft prompt's
initialisations, ``artifact`` a soft prompt on disk (and its PEFT export), ``controls`` the untrained control
prompts, ``position`` where a prompt sits, ``target`` the identity of the model an artifact fits, and
``cli_commands`` ``cpt-bench prompt``. To add a method: one module with a ``RecoveryKind`` subclass, its test,
and its line below.
"""

from cpt_bench.recovery.eora import EoraKind
from cpt_bench.recovery.hard import HardPromptKind
from cpt_bench.recovery.idp import IdpKind
from cpt_bench.recovery.kind import NoRecovery, RecoveryKind, registry
from cpt_bench.recovery.lora import LoraKind
from cpt_bench.recovery.soft import SoftPromptKind

RECOVERY_KINDS: dict[str, RecoveryKind] = registry(
    NoRecovery(),
    HardPromptKind(),
    SoftPromptKind(),
    LoraKind(),
    EoraKind(),
    IdpKind(),
)
LEARNED_KINDS = tuple(name for name, kind in RECOVERY_KINDS.items() if kind.learned)

__all__ = ["LEARNED_KINDS", "RECOVERY_KINDS", "RecoveryKind"]
