"""Quality against sampler steps: the digits demo's generator sampled by every sampler at
5 to 50 steps, every split, best and mean of the candidates.

``python -m d2nwg.demo.steps [--quick] [--out DIR] [--reuse]`` runs the digits demo (or, with
``--reuse``, loads the generator and results a previous run left in ``DIR``), then samples the
same candidates of the same tasks (same support sets, same seed) with each (sampler, steps)
and writes ``steps.json``, ``steps.md`` (a table) and ``steps.png``. Only sampling differs
between the rows, so the curve says what steps cost and nothing else.
"""

from __future__ import annotations

import argparse
import os

import torch

import d2nwg
from d2nwg.demo import SPLITS, DemoSettings, generate_candidates
from d2nwg.demo import run as run_demo
from d2nwg.demo.common import DemoOptions
from d2nwg.demo.digits import load_digits, make_tasks
from d2nwg.files import read_json, save_json
from d2nwg.generator import D2NWG

STEPS = (5, 8, 10, 15, 25, 50)


def curve(
    gen: D2NWG,
    o: DemoOptions,
    s: DemoSettings,
    splits: dict[str, list[tuple[int, ...]]],
    samplers: tuple[str, ...],
    steps: tuple[int, ...],
) -> dict:
    """``{sampler: {steps: {split: {"best", "mean"}}}}``: test accuracy of the candidate
    picked on validation, and of all candidates, averaged over the split's tasks."""
    data = load_digits(o.seed)
    out: dict = {}
    for sampler in samplers:
        for n in steps:
            row = {}
            for split, tasks in splits.items():
                g = torch.Generator().manual_seed(o.seed + 1)  # the demo's support sets
                c = generate_candidates(
                    gen, data, tasks, s, o.seed, g, {"sampler": sampler, "steps": n}
                )
                pick = c["val"].argmax(1)
                best = c["test"][torch.arange(len(tasks)), pick]
                row[split] = {"best": float(best.mean()), "mean": float(c["test"].mean())}
            out.setdefault(sampler, {})[str(n)] = row
            print(f"{sampler:9s} {n:3d} steps: " + ", ".join(
                f"{k} {v['best']:.3f}/{v['mean']:.3f}" for k, v in row.items()))  # fmt: skip
    return out


def table(results: dict) -> str:
    """Markdown: one row per (sampler, steps), best and mean per split, and each as a
    difference from the reference (the demo's default sampler at 25 steps)."""
    ref = results["reference"]
    head = (
        "| sampler | steps | "
        + " | ".join(f"{s} best | {s} mean" for s in SPLITS)
        + " | worst diff to ref |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(SPLITS))]
    for sampler, rows in results["curve"].items():
        for n, row in rows.items():
            diffs = [row[s][k] - ref[s][k] for s in SPLITS for k in ("best", "mean")]
            cells = " | ".join(f"{row[s]['best']:.3f} | {row[s]['mean']:.3f}" for s in SPLITS)
            lines.append(f"| {sampler} | {n} | {cells} | {min(diffs):+.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str | None:
    from d2nwg.demo.report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(SPLITS), figsize=(4 * len(SPLITS), 6.5), sharex=True)
    for j, split in enumerate(SPLITS):
        for i, kind in enumerate(("best", "mean")):
            ax = axes[i][j]
            for sampler, rows in results["curve"].items():
                xs = [int(n) for n in rows]
                ax.plot(xs, [rows[n][split][kind] for n in rows], marker="o", label=sampler)
            ax.axhline(results["zoo"][split], color="k", ls="--", lw=1, label="zoo")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(STEPS, [str(n) for n in STEPS])
            ax.set_title(f"{split}: generated_{kind}")
            if i == 1:
                ax.set_xlabel("sampler steps")
    axes[0][0].set_ylabel("test accuracy")
    axes[1][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(options: DemoOptions, reuse: bool = False, samplers=None, steps=STEPS) -> dict:
    o = options
    s = DemoSettings.quick() if o.quick else DemoSettings()
    results_path = os.path.join(o.out, "results.json")
    demo = read_json(results_path) if reuse else run_demo(o, s)
    gen = D2NWG.load(os.path.join(o.out, "generator"))
    tasks = make_tasks(s.seen, s.unseen, s.novel, seed=o.seed)
    splits = {"seen": tasks.seen[: max(s.unseen, 10)], "unseen": tasks.unseen, "novel": tasks.novel}
    samplers = tuple(samplers or d2nwg.SAMPLERS)
    results = {
        "quick": o.quick,
        "steps": list(steps),
        "default": {"sampler": gen.config.sampler, "steps": gen.config.sample_steps},
        "zoo": {k: v["zoo"] for k, v in demo["accuracy"].items()},
        "curve": curve(gen, o, s, splits, samplers, steps),
    }
    default = gen.config.sampler
    results["reference"] = (
        results["curve"].get(default, {}).get("25")
        or curve(gen, o, s, splits, (default,), (25,))[default]["25"]
    )
    save_json(os.path.join(o.out, "steps.json"), results)
    with open(os.path.join(o.out, "steps.md"), "w") as f:
        f.write(table(results) + "\n")
    print(table(results))
    path = plot(results, os.path.join(o.out, "steps.png"))
    if path:
        print(f"wrote {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m d2nwg.demo.steps", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="steps_out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse", action="store_true", help="the generator and results.json in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", choices=d2nwg.SAMPLERS)
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    a = p.parse_args(argv)
    o = DemoOptions(a.out, "auto", a.seed, a.quick, progress=False)
    run(o, a.reuse, a.samplers, tuple(a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
