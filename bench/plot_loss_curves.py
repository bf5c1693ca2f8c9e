"""Plot the loss curves of trainer runs (their metrics.jsonl) into one PNG and print the gap at the end.

    python bench/plot_loss_curves.py OUT.png bf16=RUN_A/metrics.jsonl fp8=RUN_B/metrics.jsonl [--last 20]

The first run is the reference: the end gap is each other run's mean loss over the last `--last` logged steps
relative to the reference's over the same steps. Needs matplotlib (`pip install matplotlib`; not a dependency of
ochat).
"""
import argparse
import json

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def read_curve(path: str) -> dict[int, float]:
    """step -> training loss, from a trainer's metrics.jsonl (eval lines skipped)."""
    rows = (json.loads(line) for line in open(path))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("png")
    p.add_argument("runs", nargs="+", help="LABEL=PATH/metrics.jsonl; the first is the reference")
    p.add_argument("--last", type=int, default=20, help="logged steps averaged for the end gap")
    a = p.parse_args()
    curves = {label: read_curve(path) for label, path in (r.split("=", 1) for r in a.runs)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), label=label, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.png, dpi=120)
    (ref_label, ref), *others = curves.items()
    for label, curve in others:
        steps = sorted(set(ref) & set(curve))[-a.last:]
        r, c = np.mean([ref[s] for s in steps]), np.mean([curve[s] for s in steps])
        print(f"steps {steps[0]}-{steps[-1]}: {ref_label} {r:.4f}, {label} {c:.4f} ({(c - r) / r:+.2%}); "
              f"last step {steps[-1]}: {ref[steps[-1]]:.4f} vs {curve[steps[-1]]:.4f} "
              f"({(curve[steps[-1]] - ref[steps[-1]]) / ref[steps[-1]]:+.2%})")


if __name__ == "__main__":
    main()
