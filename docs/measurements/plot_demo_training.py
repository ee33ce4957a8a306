"""Plot the demo model's training: one or more ``training_log.json`` files from
``python -m kvloom.demo_model.train``, run one after the other (a run started with ``--init`` from
the previous one's checkpoint), on one time axis.

    python docs/measurements/plot_demo_training.py docs/demo-model/training.png \\
        docs/demo-model/runs/stage1-training_log.json src/kvloom/demo_model/weights/training_log.json

Left: the training loss per reply token of each lesson and of the chats, and the held-out loss; right:
the held-out accuracy of the copying lesson the run checks and, per task, the share of held-out
replies greedy decoding writes exactly (teacher-forced argmax). Needs matplotlib (the dev and bench
extras have it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TASKS = ("qa", "tool_call", "json", "code_edit", "summary", "copy")


def main(out_path: str, log_paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    start = 0.0
    for n, path in enumerate(log_paths, 1):
        log: dict[str, Any] = json.loads(Path(path).read_text())
        old = "repeat_steps" not in log["args"]  # run 5's log: its "induction" rows were repeated spans
        lessons = {"repeat": "repeated spans", "induction": "repeated spans" if old else "chunks copied by content"}
        for key in ("repeat", "induction"):
            rows = log.get(key, [])
            if rows:
                name = lessons.get(key, key)
                left.plot([start + r["seconds"] / 60 for r in rows], [r["loss"] for r in rows], label=f"{n}: {name}")
        left.plot([start + r["seconds"] / 60 for r in log["steps"]], [r["loss"] for r in log["steps"]],
                  label=f"{n}: chats (train)")
        left.plot([start + r["seconds"] / 60 for r in log["evals"]], [r["heldout_loss"] for r in log["evals"]],
                  "o-", label=f"{n}: chats (held-out)")
        minutes = [start + r["seconds"] / 60 for r in log["evals"]]
        right.plot(minutes, [r["span_copy_accuracy"] for r in log["evals"]], "k--" if n == 1 else "k:",
                   label=f"{n}: held-out {'repeated spans' if old else 'chunks copied by content'}")
        for i, task in enumerate(TASKS):
            right.plot(minutes, [r["exact"][task] for r in log["evals"]], color=f"C{i}",
                       label=f"{task} exact" if n == len(log_paths) else None)
        start += log["evals"][-1]["seconds"] / 60
        if n < len(log_paths):
            for axis in (left, right):
                axis.axvline(start, color="grey", linewidth=0.8)
    left.set_xlabel("minutes of training (2-core AMD EPYC)")
    left.set_ylabel("loss per trained token (nats)")
    left.set_yscale("log")
    left.legend(fontsize=7)
    right.set_xlabel("minutes of training")
    right.set_ylabel("held-out share")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
