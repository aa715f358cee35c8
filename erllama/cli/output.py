"""How the CLI talks to people and to scripts: plain text or ``--json`` on stdout, messages and progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from erllama.store.store import PullEvent

__all__ = ["Output", "human_bytes"]


def human_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


class Output:
    """stdout for results (text, or one JSON document with ``--json``), stderr for everything else."""

    def __init__(self, *, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr

    def result(self, data: Any, text: str | None = None) -> None:
        """The command's result: ``data`` as JSON, or ``text`` (default: nothing) for people."""
        if self.as_json:
            self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        elif text is not None:
            self.out.write(text + ("" if text.endswith("\n") or not text else "\n"))
        self.out.flush()

    def write(self, text: str) -> None:
        """Streamed reply text (not in JSON mode)."""
        if not self.as_json:
            self.out.write(text)
            self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def table(self, headers: list[str], rows: list[list[str]]) -> str:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
        return "\n".join(lines)

    @contextmanager
    def pull_progress(self) -> Iterator[Any]:
        """A progress callback for ``ModelStore.pull``: a rich progress bar on a terminal, a line per step else."""
        if self.err.isatty() and not self.as_json:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())  # fmt: skip
            with Progress(*columns, console=Console(file=self.err), transient=False) as bar:
                tasks: dict[str, Any] = {}

                def on_event(e: PullEvent) -> None:
                    if e.completed is None:
                        bar.console.print(e.status)
                        return
                    task = tasks.get(e.status)
                    if task is None:
                        task = tasks[e.status] = bar.add_task(e.status, total=e.total)
                    bar.update(task, completed=e.completed, total=e.total)

                yield on_event
            return
        last_status, last_t = [""], [0.0]

        def on_line(e: PullEvent) -> None:
            now = time.monotonic()
            if e.completed is not None:
                if e.status == last_status[0] and now - last_t[0] < 2.0 and e.completed != e.total:
                    return
                total = f"/{human_bytes(e.total)}" if e.total else ""
                self.note(f"{e.status}: {human_bytes(e.completed)}{total}")
            elif e.status != last_status[0]:
                self.note(e.status)
            last_status[0], last_t[0] = e.status, now

        yield on_line
