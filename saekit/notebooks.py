"""Run the pipeline's notebooks headless and keep the executed copies under store/notebooks/.

    python -m saekit.notebooks 03_analyze_training.ipynb [--KEY=value ...]

from any folder: a notebook that is not in the working folder is looked for in the project's.

Settings overrides reach the notebook through SAE_ARGS, as when a user starts Jupyter with it.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from nbclient.exceptions import CellExecutionError

from .base.atomic import atomic_path
from .base.errors import PipelineError, print_user_errors
from .base.settings import PROJECT_ROOT, check_flags, load_settings
from .evaluation.verdict import terminal_lines

KERNEL_LOG_LEVEL = "--IPKernelApp.log_level=ERROR"


def run_notebook(notebook: str | Path, args: list[str] | None = None, timeout: int = 3600) -> Path:
    """Execute `notebook` top to bottom; return the path of the executed copy (and its .html)."""
    import nbformat
    from nbclient import NotebookClient

    args = list(args or [])
    check_flags(args, set())  # notebooks take no flags: `--TOP_K 16` would otherwise be run without it
    settings = load_settings(args)
    notebook = Path(notebook)
    if not notebook.is_file() and (PROJECT_ROOT / notebook).is_file():
        notebook = PROJECT_ROOT / notebook  # a stage's notebook named from another folder
    if not notebook.is_file():
        raise NotebookError(f"no notebook {notebook}; the stages are 03_analyze_training.ipynb, "
                            "04_name_sae_concepts.ipynb and 05_show_concepts.ipynb")
    nb = nbformat.read(notebook, as_version=4)
    previous = os.environ.get("SAE_ARGS")
    os.environ["SAE_ARGS"] = shlex.join(args)
    try:
        # the kernel logs at ERROR only: its warning about TCP without encryption (the kernel is local,
        # its ports on loopback) reached the terminal late, after the one-line error it would hide
        NotebookClient(nb, timeout=timeout, kernel_name="python3", extra_arguments=[KERNEL_LOG_LEVEL],
                       resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    except CellExecutionError:
        message = _user_error_shown(nb)
        if message is None:
            raise
        raise NotebookError(message.removeprefix("error: ")) from None
    finally:
        if previous is None:
            os.environ.pop("SAE_ARGS", None)
        else:
            os.environ["SAE_ARGS"] = previous
    out = settings.store / "notebooks" / notebook.name
    with atomic_path(out) as tmp:
        nbformat.write(nb, tmp)
    html = offline_html(nb)
    with atomic_path(out.with_suffix(".html")) as tmp:
        tmp.write_text(html)
    return out


# nbconvert's lab template loads require.js and MathJax from cdnjs, the widget manager from unpkg and
# mermaid from cdnjs, so offline a page lost its progress bars. The notebooks need none of them (no
# math, no diagrams); progress-bar widgets are shown by the text that tqdm writes beside them.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock html_head_js_requirejs %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
"""
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def offline_html(nb) -> str:
    """The executed notebook as one HTML page that loads nothing from the network: no scripts from a
    CDN and no widget state, each widget output replaced by its text fallback."""
    import copy

    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is not None and _WIDGET_VIEW in data:
                del data[_WIDGET_VIEW]
                if not data:
                    continue
            outputs.append(output)
        if "outputs" in cell:
            cell.outputs = outputs
    exporter = HTMLExporter(extra_loaders=[DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2", embed_images=True)
    html, _ = exporter.from_notebook_node(nb)
    return html


class NotebookError(PipelineError):
    """A notebook stopped on a mistake the user can fix; the message is the notebook's own."""


def _user_error_shown(nb) -> str | None:
    """The one-line message a stage showed for a user error (errors.show_user_errors_in_notebook), if
    that is how the notebook stopped; None for any other error, which keeps its traceback."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                lines = output.get("traceback", [])
                return lines[0] if len(lines) == 1 and lines[0].startswith("error: ") else None
    return None


if __name__ == "__main__":
    sys.excepthook = print_user_errors
    if len(sys.argv) > 1 and sys.argv[1] in ("--help", "-h"):
        print(__doc__.strip() + "\n\nSettings: --KEY=value for any name in config.py, or --preset=NAME "
              "(docs/settings.md lists them all).")
        sys.exit(0)
    if len(sys.argv) < 2:
        sys.exit("usage: python -m saekit.notebooks NOTEBOOK.ipynb [--KEY=value ...]")
    executed = run_notebook(sys.argv[1], sys.argv[2:])
    print(f"executed {executed}")
    report = executed.parent.parent / "analysis.json"
    if executed.name.startswith("03_") and report.is_file():  # the verdict is stage 03's last word in the terminal
        print("\n".join(terminal_lines(json.loads(report.read_text()))))
