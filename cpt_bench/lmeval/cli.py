"""``cpt-lm-eval``: the ``lm_eval`` command, flag for flag, with cpt_bench's model adapter registered."""

from __future__ import annotations

import sys

from cpt_bench.assets.cache import CacheError

USER_ERROR_EXIT_CODE = 2


def user_error(error: BaseException) -> bool:
    """Whether ``error`` is cpt_bench's one-line report of a bad input (e.g. bad ``--model_args`` of the ``cpt``
    model): a ``ValueError`` or ``CacheError`` raised in cpt_bench's own code. Errors raised elsewhere, lm-eval's
    and the libraries' included, keep their traceback."""
    if not isinstance(error, ValueError | CacheError) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_globals.get("__name__", "").startswith("cpt_bench.")


def main() -> None:
    """Register our adapter(s), then hand the command line to lm-eval unchanged; cpt_bench's bad-input errors
    are printed as one line (``cpt-lm-eval: error: ...``, exit status 2), lm-eval's own ones as lm-eval does."""
    from lm_eval.__main__ import cli_evaluate

    import cpt_bench.lmeval.adapter  # noqa: F401  (registers --model cpt)

    try:
        cli_evaluate()
    except Exception as error:
        if not user_error(error):
            raise
        print(f"cpt-lm-eval: error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
