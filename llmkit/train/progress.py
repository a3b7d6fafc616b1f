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
        self.room = 0  # columns left for the stats on a live bar
        if enabled and live and self.console.is_terminal:
            wide = self.console.width >= 140  # an 80-column terminal gets no bar and no elapsed time
            columns = [TextColumn("[bold]{task.description}"), *([BarColumn()] if wide else []), MofNCompleteColumn(),
                       TextColumn("{task.fields[stats]}"), *([TimeElapsedColumn()] if wide else []), TextColumn("ETA"),
                       TimeRemainingColumn()]
            fixed = len(description) + 2 * len(str(total)) + 1 + len("ETA") + len("0:00:00") + len(columns)
            self.room = self.console.width - fixed - (40 + len("0:00:00") if wide else 0)
            self.bar = Progress(*columns, console=self.console)
            self.task = self.bar.add_task(description, total=total, completed=start, stats="")
            self.bar.start()

    def update(self, step: int, stats: dict[str, float], eta: str, log_line: bool) -> None:
        if not self.enabled:
            return
        text = format_stats(stats)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=fit_stats(stats, self.room))
        elif log_line:
            self.console.print(f"step {step}/{self.total} | {text} | ETA {eta}", markup=False, soft_wrap=True)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def fit_stats(stats: dict[str, float], room: int) -> str:
    """format_stats in at most `room` columns: the loss, tokens/s and validation loss first, then the loss alone."""
    for keep in (None, ("loss", "tokens_per_s", "val_loss"), ("loss", "val_loss"), ("loss",)):
        text = format_stats(stats if keep is None else {k: v for k, v in stats.items() if k in keep})
        if len(text) <= room:
            return text
    return text


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
