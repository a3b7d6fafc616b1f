"""Terminal progress: a rich bar with loss, learning rate, tokens/s, MFU and ETA; plain lines when piped."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Shows the run on the main process: a live bar on a terminal, one line per log step otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, live: bool, description: str = "train"):
        self.console = Console(highlight=False)
        self.enabled = enabled
        self.total = total
        self.bar: Progress | None = None
        if enabled and live and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, stats="")
            self.bar.start()

    def update(self, step: int, stats: dict[str, float], eta: str, log_line: bool) -> None:
        if not self.enabled:
            return
        text = format_stats(stats)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=text)
        elif log_line:
            self.console.print(f"step {step}/{self.total} | {text} | ETA {eta}", markup=False, soft_wrap=True)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def format_stats(stats: dict[str, float]) -> str:
    parts = []
    for key, value in stats.items():
        if key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "tokens_per_s":
            parts.append(f"{value / 1000:.1f}k tok/s" if value >= 1000 else f"{value:.0f} tok/s")
        elif key == "mfu":
            parts.append(f"MFU {100 * value:.1f}%")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
