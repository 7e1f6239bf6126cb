"""The base of every error a user can fix; stages print these as one clear message, no traceback."""
from __future__ import annotations

import json
import os
import sys
import time


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
    """sys.excepthook for scripts: a mistake the user can fix ends with its message alone (exit 1).

    Under torchrun every process usually meets the same mistake: process 0 alone prints it, and each
    process writes it to the error file torchrun reads, so torchrun's failure report, printed last,
    ends with the line too (also when one process alone failed)."""
    if is_user_error(error):
        _close_progress_bars()  # so the message starts its own line, after any bar left half-drawn
        _tell_torchrun(one_line(error))
        if int(os.environ.get("RANK", "0")) == 0:
            print(one_line(error), file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def _tell_torchrun(line: str) -> None:
    """Write `line` where torchrun looks for a failed process's reason (TORCHELASTIC_ERROR_FILE), which its
    report shows in place of "To enable traceback see: ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            # the layout torchrun's own @record writes; the report shows py_callstack as the "traceback"
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the report then says less; the line itself was still printed


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
