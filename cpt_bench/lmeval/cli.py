"""``cpt-lm-eval``: the ``lm_eval`` command, flag for flag, with cpt_bench's model adapter registered."""

from __future__ import annotations


def main() -> None:
    """Register our adapter(s), then hand the command line to lm-eval unchanged."""
    from lm_eval.__main__ import cli_evaluate

    import cpt_bench.lmeval.adapter  # noqa: F401  (registers --model cpt)

    cli_evaluate()


if __name__ == "__main__":
    main()
