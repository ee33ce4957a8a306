"""Plot the demo model's training log (``training_log.json`` from ``python -m kvloom.demo_model.train``).

    python docs/measurements/plot_demo_training.py src/kvloom/demo_model/weights/training_log.json docs/demo-model/training.png

Left: the training loss per reply token (induction phase, then chats) and the held-out loss; right: the
held-out copy accuracy on repeated spans and, per task, the share of held-out replies greedy decoding
writes exactly (teacher-forced argmax). Needs matplotlib (the dev and bench extras have it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(log_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(Path(log_path).read_text())
    induction = log.get("induction", [])
    offset = induction[-1]["step"] if induction else 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if induction:
        left.plot([r["step"] for r in induction], [r["loss"] for r in induction], label="induction spans (train)")
    left.plot([offset + r["step"] for r in log["steps"]], [r["loss"] for r in log["steps"]], label="chats (train)")
    left.plot([offset + r["step"] for r in log["evals"]], [r["heldout_loss"] for r in log["evals"]], "o-",
              label="chats (held-out)")
    left.set_xlabel("step")
    left.set_ylabel("loss per reply token (nats)")
    left.set_yscale("log")
    left.legend()
    steps = [offset + r["step"] for r in log["evals"]]
    right.plot(steps, [r["span_copy_accuracy"] for r in log["evals"]], "k--", label="span copy (token accuracy)")
    for task in ("qa", "tool_call", "json", "code_edit", "summary", "copy"):
        right.plot(steps, [r["exact"][task] for r in log["evals"]], label=f"{task} exact")
    right.set_xlabel("step")
    right.set_ylabel("held-out share")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
