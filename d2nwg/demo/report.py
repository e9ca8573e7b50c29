"""The demo's printed table and PNG plots (matplotlib is optional: without it, no plots).

The methods compared are those the demo lists in ``results["methods"]`` (``d2nwg.demo.METHODS``,
``d2nwg.demo.lora.METHODS``): the demos import this module, never the other way round.
"""

from __future__ import annotations

import os


def table(results: dict) -> str:
    acc = results["accuracy"]
    methods = results["methods"]
    lines = [
        f"{results.get('model', 'head')}: {results.get('tokens', '?')} tokens per model, "
        f"window {results.get('window', '?')}",
        f"{'split':8s} "
        + " ".join(f"{m:>14s}" for m in methods)
        + f" {'best/zoo':>9s} {'mean/zoo':>9s}",
    ]
    for split, row in acc.items():
        ratio = results["ratios_to_zoo"][split]
        lines.append(
            f"{split:8s} "
            + " ".join(f"{row[m]:14.4f}" for m in methods)
            + f" {ratio['generated_best']:9.3f} {ratio['generated_mean']:9.3f}"
        )
    if "vae_roundtrip" in results:  # where quality is lost
        rt = results["vae_roundtrip"]
        lines.append(
            f"VAE round trip of zoo models ({rt['tasks']} tasks): {rt['roundtrip']:.4f} "
            f"(zoo {rt['zoo']:.4f})"
        )
        for split, d in results["novelty"].items():
            apart = results["diversity"][split]["generated_pairwise"]
            lines.append(
                f"{split}: candidate to nearest zoo model {d['nearest_zoo']:.3f}, candidates "
                f"to each other {_number(apart)}, zoo models of one task to each other "
                f"{_number(d['zoo_same_task'])}"
            )
    if results.get("body_change"):
        lines.append(
            "body change (mean |W - W_pretrained| / |W_pretrained| of the zoo): "
            + ", ".join(f"{k} {v:.3f}" for k, v in results["body_change"].items())
        )
    ft = results["finetune"]["steps_to_target"]
    lines.append(
        f"fine-tuning steps to 95% of zoo accuracy (unseen tasks): generated "
        f"{ft['generated']:.1f}, random {ft['random']:.1f}"
    )
    sec = results["seconds"]
    lines.append(
        "seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sec.items())
        + f" (world size {results['world_size']})"
    )
    return "\n".join(lines)


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plots(results: dict, log: list[dict], out: str) -> list[str]:
    """accuracy.png, finetune.png, novelty.png, losses.png in ``out``; [] without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    acc = results["accuracy"]
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(acc))]
        ax.bar(xs, [acc[s][m] for s in acc], width, label=m)
    ax.set_xticks(range(len(acc)), list(acc))
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    model = results.get("model", "head")
    ax.set_title(f"5-way digit tasks ({model}): generated vs zoo, random and memorization")
    ax.legend(fontsize=7, loc="upper center", ncol=4, frameon=False)
    written.append(_save(fig, out, "accuracy.png"))

    ft = results["finetune"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in ft["curves"].items():
        ax.plot(range(len(curve)), curve, label=f"from {name} weights")
    zoo = sum(results["per_task_accuracy"]["unseen"]["zoo"][: ft["tasks"]]) / ft["tasks"]
    ax.axhline(0.95 * zoo, color="gray", ls="--", label="95% of zoo accuracy")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test accuracy (unseen tasks)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "finetune.png"))

    if "novelty" in results:
        written.append(_novelty_plot(plt, results, out, "novelty.png"))
    if log:
        written.append(_loss_plot(plt, log, out, "losses.png"))
    return written


def _novelty_plot(plt, results: dict, out: str, name: str) -> str:
    """Per split, each candidate's distance to its nearest zoo model, against the distance
    between zoo models of one task (a replica of the zoo would sit far left of that line)."""
    novelty = results["novelty"]
    fig, axes = plt.subplots(1, len(novelty), figsize=(3.3 * len(novelty), 3), sharex=True)
    axes = axes if len(novelty) > 1 else [axes]
    for ax, (split, d) in zip(axes, novelty.items()):
        ax.hist(d["per_candidate"], bins=20, color="C0", label="candidate to nearest zoo")
        if d["zoo_same_task"] is not None:
            ax.axvline(d["zoo_same_task"], color="k", ls="--", label="zoo seeds of a task")
        ax.set_title(split)
        ax.set_xlabel("L2 distance in weight space")
    axes[0].legend(fontsize=7)
    return _save(fig, out, name)


def _loss_plot(plt, log: list[dict], out: str, name: str) -> str:
    """Both training stages' loss curves, from the generator's loss log."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, stage in zip(axes, ("vae", "diffusion")):
        rows = [r for r in log if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_yscale("log")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
    return _save(fig, out, name)


def _pyplot():
    """matplotlib.pyplot on the Agg backend; None, with a note, when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# The LoRA demo (d2nwg demo --lora).
# ----------------------------------------------------------------------------------------
def lora_table(results: dict) -> str:
    """Mean per-token test loss per split and method, and the gap closed."""
    cols = (*results["methods"], "true_chain")
    lines = [f"{'split':8s} " + " ".join(f"{m:>10s}" for m in cols) + f" {'gap closed':>11s}"]
    for split, row in results["loss"].items():
        lines.append(
            f"{split:8s} "
            + " ".join(f"{row[m]:10.4f}" for m in cols)
            + f" {results['gap_closed'][split]:11.3f}"
        )
    lines.append(
        f"gap closed = (base - generated) / (base - trained); target on unseen tasks: "
        f">= {results['target']:.2f}"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
    return "\n".join(lines)


def lora_plots(results: dict, log: list[dict], out: str) -> list[str]:
    """lora_loss.png (losses per split; gap closed per unseen task in the task plane) in
    ``out``; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    loss = results["loss"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.25
    methods = results["methods"]
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(loss))]
        ax.bar(xs, [loss[s][m] for s in loss], width, label=m)
    floor = [loss[s]["true_chain"] for s in loss]
    ax.scatter(range(len(loss)), floor, color="k", marker="_", s=400, label="true chain")
    ax.set_xticks(
        range(len(loss)), [f"{s}\n(gap closed {results['gap_closed'][s]:.2f})" for s in loss]
    )
    low = min(floor) - 0.05
    ax.set_ylim(low, max(loss[s]["base"] for s in loss) + 0.05)
    ax.set_ylabel("test loss per token")
    ax.set_title("LlamaForCausalLM + PEFT LoRA on synthetic languages")
    ax.legend(fontsize=8)

    per = results["per_task_loss"]["unseen"]
    closed = [
        (b - g) / (b - t) if b != t else 0.0
        for b, g, t in zip(per["base"], per["generated"], per["trained"])
    ]
    seen = results["tasks"]["seen_grid"]
    ax2.scatter(
        [p[0] for p in seen], [p[1] for p in seen], color="lightgray", s=12, label="zoo tasks"
    )
    pts = results["tasks"]["unseen"]
    sc = ax2.scatter([p[0] for p in pts], [p[1] for p in pts], c=closed, cmap="viridis",
                     vmin=0, vmax=1.2, s=40, label="unseen tasks")  # fmt: skip
    fig.colorbar(sc, ax=ax2, label="gap closed")
    ax2.set_xlabel("task parameter a")
    ax2.set_ylabel("task parameter b")
    ax2.set_title("unseen tasks: gap closed by the generated adapter")
    ax2.legend(fontsize=8, loc="lower left")
    written = [_save(fig, out, "lora_loss.png")]
    if log:
        written.append(_loss_plot(plt, log, out, "lora_losses.png"))
    return written
