"""Keep lm-eval's per-call noise out of our output: git's errors, warnings repeated per call, broken progress bars.

``quiet_lm_eval()`` wraps our ``simple_evaluate`` calls (``matrix.run.evaluate_group``,
``evaluate.run_evaluation``); ``logging_through_tqdm()`` wraps a progress bar that such calls run under.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_OUR_LOGGER = "cpt_bench"
_seen_warnings: set[tuple[str, int, str]] = set()  # (logger, level, message) shown once in this process


def quiet_git_commit_hash() -> str | None:
    """lm-eval's ``loggers.utils.get_git_commit_hash`` with git's stderr discarded.

    ``simple_evaluate`` runs ``git describe --always`` in the working folder on every call without redirecting
    stderr, so outside a git checkout each call prints ``fatal: not a git repository``; lm-eval offers no switch,
    hence this replacement (same result: the description, else the commit read from ``./.git``, else None).
    """
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())
    return described.stdout.strip().decode()


class OnceFilter(logging.Filter):
    """Passes each distinct (logger, level, message) warning once per process; our own records and records below
    WARNING always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.partition(".")[0] == _OUR_LOGGER:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in _seen_warnings:
            return False
        _seen_warnings.add(key)
        return True


def _loggers() -> list[logging.Logger]:
    """The root logger and every logger created so far."""
    named = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    return [logging.root, *(logger for logger in named if isinstance(logger, logging.Logger))]


def _is_ours(logger: logging.Logger) -> bool:
    return logger.name.partition(".")[0] == _OUR_LOGGER


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """While lm-eval runs: its git lookup is ``quiet_git_commit_hash`` and third-party warnings show once each.

    The filter sits on the loggers (a logger's filters see the records logged through it, whatever the handlers),
    so it covers lm-eval's, transformers' and datasets' loggers, configured or not.
    """
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    once, loggers = OnceFilter(), [logger for logger in _loggers() if not _is_ours(logger)]
    lm_eval.evaluator.get_git_commit_hash = quiet_git_commit_hash
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original
        for logger in loggers:
            logger.removeFilter(once)


@contextmanager
def logging_through_tqdm() -> Iterator[None]:
    """Log through ``tqdm.write`` while a progress bar runs, so log lines do not break the bar.

    Covers the root logger and every logger with a console handler of its own (lm-eval's, once ``lm_eval``'s
    logging is set up, does not propagate to the root).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    consoles = (sys.stdout, sys.stderr)
    loggers = [logger for logger in _loggers()[1:] if any(
        isinstance(handler, logging.StreamHandler) and handler.stream in consoles for handler in logger.handlers)]
    with logging_redirect_tqdm(loggers=[logging.root, *loggers]):
        yield
