"""``cpt-lm-eval``: the ``lm_eval`` command, flag for flag, with cpt_bench's model adapter registered."""

from __future__ import annotations

import sys

from cpt_bench.errors import run_command


def main() -> None:
    """Register our adapter(s), then hand the command line to lm-eval unchanged, under ``errors.run_command``'s
    policy: cpt_bench's bad-input errors in one line (``cpt-lm-eval: error: ...``, exit status 2), its bugs with
    their traceback and a note, and lm-eval's own errors exactly as lm-eval raises them."""
    from lm_eval.__main__ import cli_evaluate

    import cpt_bench.lmeval.adapter  # noqa: F401  (registers --model cpt)

    status = run_command("cpt-lm-eval", cli_evaluate, foreign_passes_through=True)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
