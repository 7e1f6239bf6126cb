"""The base of every error a user can fix; stages print these as one clear message, no traceback."""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """A mistake in settings, inputs or artifacts, with a message that says what to do."""


def is_user_error(error: BaseException) -> bool:
    """A PipelineError, or an OS error about a named file (a read-only store, a missing folder)."""
    return isinstance(error, PipelineError) or isinstance(error, OSError) and error.filename is not None


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, PipelineError):
        return f"error: cannot use {error.filename}: {error.strerror}. Check the path and its permissions."
    return "error: " + " ".join(str(error).split())  # one line, however the message was wrapped


def print_user_errors(kind, error, traceback) -> None:
    """sys.excepthook for scripts: a mistake the user can fix ends with its message alone (exit 1)."""
    if is_user_error(error):
        _close_progress_bars()  # so the message starts its own line, after any bar left half-drawn
        print(one_line(error), file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def show_user_errors_in_notebook() -> None:
    """In a Jupyter kernel, show a user error as its message alone instead of a long traceback."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell, kind, error, traceback, tb_offset=None):
        if not is_user_error(error):
            return shell.showtraceback((kind, error, traceback), tb_offset=tb_offset)
        message = one_line(error)
        shell._showtraceback(kind, error, [message])  # shown as the error, with the kernel's usual status
        return [message]

    shell.set_custom_exc((PipelineError, OSError), handler)


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
