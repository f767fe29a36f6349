"""The demo through papermill: the notebooks in ``notebooks/``, chained on the embedded sink.

``run_notebook_demo`` writes the demo's contact file and template, starts a Sink (refusing two
addresses, to show bounces), and executes ``01_import_contacts`` … ``05_dashboard`` and then
``scheduled_campaign`` headless, each on the same workspace database. The executed notebooks,
the dashboard as a self-contained HTML file, the database and the sink's Maildir are left in
the output folder.

Kernels: papermill starts the kernel named ``mailkit``, which ``ensure_kernel`` installs into
this interpreter's prefix (the venv) when it is missing or points at another Python, so the
notebooks always run with the same installed mailkit as the caller.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .demo import SEGMENT, SENDER, SUBJECT, TEMPLATE_HTML, build_demo_contacts
from .errors import ConfigError
from .sink import Sink

__all__ = [
    "DEMO_NOTEBOOKS",
    "KERNEL_NAME",
    "NOTEBOOK_DIR",
    "ensure_kernel",
    "execute_notebook",
    "run_notebook_demo",
]

KERNEL_NAME = "mailkit"
#: The repository's notebooks folder (next to the package in a source checkout).
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
DEMO_NOTEBOOKS = (
    "01_import_contacts",
    "02_build_segment",
    "03_compose_and_preview",
    "04_dispatch",
    "05_dashboard",
    "scheduled_campaign",
)


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure kernelspec ``name`` runs this very interpreter; return its name."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        if spec.argv and Path(spec.argv[0]) == Path(sys.executable):
            return name
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=name, display_name=f"Python ({name})", prefix=sys.prefix)
    return name


def execute_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: Mapping[str, Any],
    *,
    cwd: str | Path | None = None,
    timeout: float = 300,
) -> Path:
    """Execute a notebook (a name in ``notebooks/`` or a path) with papermill; return ``output``.

    A failing cell raises papermill's PapermillExecutionError, which names the cell's
    exception and message; the output notebook is written up to the failure either way.
    """
    import papermill

    source = Path(notebook)
    if not source.suffix:
        source = NOTEBOOK_DIR / f"{notebook}.ipynb"
    if not source.exists():
        raise ConfigError(f"notebook {source} does not exist; the notebooks are in {NOTEBOOK_DIR}")
    papermill.execute_notebook(
        str(source),
        str(output),
        parameters=dict(parameters),
        kernel_name=ensure_kernel(),
        cwd=str(cwd) if cwd is not None else None,
        progress_bar=False,
        execution_timeout=timeout,
        # Widget state would embed each widget's JavaScript (plotly.js is 4 MB) in every
        # output; the facts are in the outputs and the run-record cell.
        store_widget_state=False,
    )
    return Path(output)


def run_notebook_demo(directory: Path, *, echo: Callable[[str], None] = print) -> Path:
    """Run the notebooks headless in ``directory`` (emptied first); return the dashboard path."""
    started = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    directory = directory.resolve()
    executed = directory / "executed"
    executed.mkdir()
    db_url = f"sqlite:///{directory / 'mailkit.db'}"
    contacts = directory / "contacts_cp932.csv"
    refused = build_demo_contacts(contacts)
    template_path = directory / "spring.html"
    template_path.write_text(TEMPLATE_HTML, encoding="utf-8")
    dashboard = directory / "dashboard.html"
    replies = {
        addr: f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown" for addr in refused
    }
    with Sink(maildir=directory / "maildir", rcpt_replies=replies) as sink:
        echo(f"embedded SMTP sink on {sink.url} (refuses {len(refused)} addresses)")
        runs: dict[str, dict[str, Any]] = {
            "01_import_contacts": {"contacts_path": str(contacts), "list_name": "会員"},
            "02_build_segment": {"segment": SEGMENT},
            "03_compose_and_preview": {
                "template_name": "spring-sale",
                "subject": SUBJECT,
                "html_path": str(template_path),
                "segment": SEGMENT,
                "campaign_name": "春のセール",
                "from_addr": SENDER,
            },
            "04_dispatch": {
                "campaign_name": "春のセール",
                "smtp_url": sink.url,
                "send": True,
                "paced": False,  # the local sink is no carrier to be gentle with
            },
            "05_dashboard": {
                "campaign_name": "春のセール",
                "html_path": str(dashboard),
                "widget": False,  # headless: nobody to ship plotly.js to
            },
            "scheduled_campaign": {
                "campaign_name": "大阪会員へのお知らせ",
                "template_name": "spring-sale",
                "segment": "prefecture == '大阪府'",
                "from_addr": SENDER,
                "smtp_url": sink.url,
                "paced": False,
            },
        }
        for name in DEMO_NOTEBOOKS:
            step = time.perf_counter()
            output = executed / f"{name}.ipynb"
            execute_notebook(name, output, {"db_url": db_url, **runs[name]}, cwd=directory)
            echo(f"ran {name} in {time.perf_counter() - step:.1f} s -> {output}")
        received = sink.count
    echo(f"the sink received {received} messages ({directory / 'maildir'})")
    echo(f"dashboard: {dashboard}")
    echo(f"notebook demo finished in {time.perf_counter() - started:.1f} s")
    return dashboard


if __name__ == "__main__":  # python -m mailkit.demo_notebooks [DIR]
    run_notebook_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output/notebooks"))
