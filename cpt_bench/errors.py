"""The error policy of the command lines (``cpt-bench``, ``cpt-lm-eval``): bad input in one line, bugs in full.

- ``UserError``: a bad input; printed as ``<prog>: error: <message>`` on stderr, exit status 2. Every error class
  of cpt_bench derives from it, one per concern in the module that owns the concern (``corpus.CorpusError``,
  ``compress.spec.SpecError``, ``compress.layers.UnsupportedModelError``, ``recovery.position.PromptPositionError``,
  ``matrix.config.ConfigError``, ...), and is raised before anything heavy loads where the input allows.
- An ``OSError`` about a full disk or an unusable path (permissions, a file where a folder is expected): also
  one line, exit status 2.
- Anything else is a bug, including a ``ValueError`` or ``TypeError`` from a library called by our code: it keeps
  its full traceback, followed by ``BUG_NOTE`` saying it is a bug in cpt_bench and where to report it.
- ``cpt-lm-eval`` only: an exception whose traceback never passes through cpt_bench's code (the package or
  the task loaders in ``tasks/``) is lm-eval's own and is re-raised as lm-eval raises it, without the note.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

USER_ERROR_EXIT_CODE = 2
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)
BUG_NOTE = ("This is a bug in cpt_bench, not a problem with your input: please report it with the command and the "
            "traceback above (see 'Reporting a bug' in README.md).")
_PACKAGE_DIR = Path(__file__).resolve().parent
_OUR_CODE = (_PACKAGE_DIR, _PACKAGE_DIR.parent / "tasks")  # the package and the lm-eval task loaders


class UserError(Exception):
    """A bad input: one-line message naming the bad value and what was expected, exit code 2 in the CLIs."""


def os_error_message(exc: OSError) -> str | None:
    """One line for an OSError about a full disk or an unusable path (permissions, a file where a folder is
    expected), None for any other (those are bugs: they keep their traceback)."""
    if exc.errno in DISK_ERRNOS:
        verb = "cannot write"
    elif exc.errno in PATH_ERRNOS:
        verb = "cannot access"
    else:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return f"{verb}{where}: {exc.strerror}"


def passes_through_our_code(traceback: TracebackType | None) -> bool:
    """Whether any frame of ``traceback`` runs code of cpt_bench or of its ``tasks/`` folder."""
    while traceback is not None:
        path = Path(traceback.tb_frame.f_code.co_filename).resolve()
        if any(path.is_relative_to(folder) for folder in _OUR_CODE):
            return True
        traceback = traceback.tb_next
    return False


def run_command(prog: str, command: Callable[[], object], foreign_passes_through: bool = False) -> int:
    """Run ``command()`` under the error policy (module docstring); the exit status, 0 or 2.

    A bug is re-raised with ``BUG_NOTE`` attached (Python prints it after the traceback). With
    ``foreign_passes_through`` (``cpt-lm-eval``), an error that never passed through our code is re-raised as is.
    """
    try:
        command()
    except Exception as error:
        # the traceback's first frame is this function's; the command's frames follow
        if foreign_passes_through and not passes_through_our_code(error.__traceback__.tb_next):
            raise
        message = str(error) if isinstance(error, UserError) else None
        if isinstance(error, OSError):
            message = os_error_message(error)
        if message is None:
            error.add_note(BUG_NOTE)
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0
