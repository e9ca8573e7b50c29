"""``d2nwg demo``: train a generator of digit-task heads and show that its weights work.

1. A backbone pretrained on all ten digits; 5-way tasks over digit subsets (labels in
   ascending class order). Digit 9 is *novel*: no zoo task contains it.
2. A zoo: one head per (seen task, seed), fine-tuned on the frozen backbone's features; the
   condition of each is a support set of example features per class ``[5, shots, F]``.
   Each head also enters the zoo in ``symmetries`` randomly rotated feature spaces (head and
   examples rotated alike, so every logit is unchanged): the generator must then learn the
   rule from examples to weights, not a table of the nine digits it has seen.
3. ``D2NWG.fit`` on the zoo (under ``torchrun``, with DDP over the ranks).
4. For every task of the three splits (seen, unseen class combinations, novel-class tasks)
   ``candidates`` heads are generated: ``generated_best`` is picked on the validation split
   and scored on the test split, ``generated_mean`` averages all candidates; ``zoo`` is a head
   trained on that task the way zoo heads are, ``random`` a randomly initialized head.
5. Fine-tuning from the best generated head and from a random head: steps until 95% of the
   zoo head's accuracy.

With ``DemoOptions(condition="text")`` (``d2nwg demo --condition text``) a task's condition is
the names of its classes in label order ("zero one three five eight"), one token per word,
embedded by the fixed hashed n-gram featurizer :func:`d2nwg.text.hashed_ngrams` (no download).
Then: no rotated copies (``symmetries`` is 0: a rotated head would carry the same words, so the
zoo would hold several different heads for one condition, and the rotation can't be read from
text), and no novel split (the word "nine" appears in no zoo condition, so its hashed vector
has no learned meaning: no text generator could write its row). The zoo heads and the zoo and
random baselines are the very heads of the dataset demo (the same random streams).

Writes ``results.json``, the generator (``generator/``), plots and prints a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from d2nwg.demo.common import (
    DemoOptions,
    Stopwatch,
    fit_generator,
    sampling_used,
    write_report,
)
from d2nwg.demo.digits import (
    TEXT_DIM,
    Digits,
    accuracy,
    feature_symmetry,
    load_digits,
    make_tasks,
    name_condition,
    random_heads,
    support_set,
    train_heads,
)
from d2nwg.errors import ConfigError
from d2nwg.generator import D2NWG
from d2nwg.zoo import ModelZoo

METHODS = ("generated_best", "generated_mean", "zoo", "random")
SPLITS = ("seen", "unseen", "novel")
DEMO_CONDITIONS = ("dataset", "text")  # of a task: support-set features, or its class names
TEXT_SPLITS = ("seen", "unseen")  # no novel split: a word no zoo condition holds means nothing


@dataclass
class DemoSettings:
    seen: int = 100  # zoo tasks (of the 126 without the novel digit)
    unseen: int = 20
    novel: int = 20
    seeds: int = 3  # zoo heads per seen task
    symmetries: int = 3  # rotated copies of each zoo head (besides the head itself; text: 0)
    shots: int = 20  # support examples per class (the condition)
    head_steps: int = 100  # fine-tuning steps of a zoo head
    candidates: int = 20  # generated heads per task
    finetune_steps: int = 60
    finetune_tasks: int = 10
    vae_steps: int = 500
    diffusion_steps: int = 1500
    window: int = 0  # tokens per denoiser window (0: a head is one window)

    @classmethod
    def quick(cls) -> DemoSettings:
        """Fewer tasks, models and steps (under a minute on a CPU)."""
        tasks = dict(seen=40, unseen=10, novel=5, finetune_tasks=5)
        models = dict(seeds=2, symmetries=1, candidates=5)
        steps = dict(finetune_steps=40, vae_steps=150, diffusion_steps=250)
        return cls(**tasks, **models, **steps)


def build_zoo(
    data: Digits,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    seed: int,
    condition: str = "dataset",
) -> tuple[ModelZoo, torch.Tensor]:
    """One head per (task, seed), all trained at once; returns the zoo and their test accuracy.
    ``condition``: "dataset" (support sets) or "text" (class names; ``s.symmetries`` must be
    0 then)."""
    if condition == "text" and s.symmetries:
        raise ConfigError("a text zoo has no rotated copies: the words can't say the rotation")
    g = torch.Generator().manual_seed(seed)
    zoo_tasks = [t for t in tasks for _ in range(s.seeds)]
    w, b = random_heads(len(zoo_tasks), data.feature_dim, g)
    w, b, _ = train_heads(data, zoo_tasks, w, b, s.head_steps)
    zoo = ModelZoo()
    for i, task in enumerate(zoo_tasks):
        cond = name_condition(task) if condition == "text" else support_set(data, task, s.shots, g)
        meta = {"task": list(task), "seed": i % s.seeds}
        zoo.add({"weight": w[i], "bias": b[i]}, condition=cond, meta=meta)
        for k in range(s.symmetries):
            rw, rc = feature_symmetry(w[i], cond, g)
            zoo.add({"weight": rw, "bias": b[i]}, condition=rc, meta={**meta, "rotation": k + 1})
    return zoo, accuracy(w, b, data, zoo_tasks, "test")


def _heads(sds: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([sd["weight"] for sd in sds]).float(), torch.stack(
        [sd["bias"] for sd in sds]
    ).float()


def evaluate_split(
    gen: D2NWG,
    data: Digits,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    zoo_heads: tuple[torch.Tensor, torch.Tensor] | None,
    seed: int,
    sampling: dict | None = None,
    condition: str = "dataset",
) -> dict:
    """Accuracy of every method on each task of one split, and the best generated heads."""
    g = torch.Generator().manual_seed(seed + 1)
    generated = generate_candidates(gen, data, tasks, s, seed, g, sampling or {}, condition)
    w, b, val, test = (generated[k] for k in ("w", "b", "val", "test"))
    K = s.candidates
    pick = val.argmax(1)
    if zoo_heads is None:  # a head trained on the task the way zoo heads are
        zw, zb = random_heads(len(tasks), data.feature_dim, g)
        zoo_heads = train_heads(data, tasks, zw, zb, s.head_steps)[:2]
    rw, rb = random_heads(len(tasks), data.feature_dim, g)
    rows = torch.arange(len(tasks))
    return {
        "generated_best": test[rows, pick],
        "generated_mean": test.mean(1),
        "zoo": accuracy(*zoo_heads, data, tasks, "test"),
        "random": accuracy(rw, rb, data, tasks, "test"),
        "best_heads": (
            w.view(len(tasks), K, *w.shape[1:])[rows, pick],
            b.view(len(tasks), K, -1)[rows, pick],
        ),
    }


def generate_candidates(
    gen: D2NWG,
    data: Digits,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    seed: int,
    g: torch.Generator,
    sampling: dict,
    condition: str = "dataset",
) -> dict[str, torch.Tensor]:
    """``s.candidates`` generated heads per task (support sets drawn from ``g``, or the
    tasks' class names with ``condition="text"``) and their validation and test accuracy
    ``[tasks, K]``."""
    # drawn for text too, so that g's later draws (the baselines) are the dataset demo's
    conds = torch.stack([support_set(data, t, s.shots, g) for t in tasks])
    if condition == "text":
        conds = torch.stack([name_condition(t) for t in tasks])
    K = s.candidates
    w, b = _heads(gen.generate(conds, num_samples=K, seed=seed, **sampling))
    rep = [t for t in tasks for _ in range(K)]
    val = accuracy(w, b, data, rep, "val").view(len(tasks), K)
    test = accuracy(w, b, data, rep, "test").view(len(tasks), K)
    return {"w": w, "b": b, "val": val, "test": test}


def finetune_comparison(
    data: Digits, tasks, best_heads, zoo_acc: torch.Tensor, s: DemoSettings, seed: int
) -> dict:
    """Fine-tuning curves (test accuracy per step) from generated and from random heads."""
    n = min(len(tasks), s.finetune_tasks)
    tasks, zoo_acc = tasks[:n], zoo_acc[:n]
    target = 0.95 * zoo_acc
    curves, steps = {}, {}
    rw, rb = random_heads(n, data.feature_dim, torch.Generator().manual_seed(seed + 2))
    for name, (w, b) in (
        ("generated", (best_heads[0][:n], best_heads[1][:n])),
        ("random", (rw, rb)),
    ):
        _, _, curve = train_heads(data, tasks, w, b, s.finetune_steps, record=True)
        acc = torch.stack(curve)  # [steps + 1, n]
        reached = acc >= target
        # first step at which each task reaches its target (steps + 1 when it never does)
        first = torch.where(
            reached.any(0), reached.float().argmax(0), torch.full((n,), s.finetune_steps + 1)
        )
        curves[name] = acc.mean(1).tolist()
        steps[name] = float(first.float().mean())
    return {"target": "0.95 x zoo accuracy", "tasks": n, "steps_to_target": steps, "curves": curves}


def run(options: DemoOptions | None = None, settings: DemoSettings | None = None) -> dict | None:
    """The whole demo; returns the results (None on ranks other than 0 under torchrun)."""
    o = options or DemoOptions()
    if o.condition not in DEMO_CONDITIONS:
        raise ConfigError(
            f"the digits demo's condition is one of {DEMO_CONDITIONS}, not {o.condition!r}"
        )
    text = o.condition == "text"
    s = settings or (DemoSettings.quick() if o.quick else DemoSettings())
    if text:  # rotated copies would pair one condition with several heads (see the docstring)
        s = dataclasses.replace(s, symmetries=0)
    watch = Stopwatch()
    with watch.stage("data_and_zoo"):
        data = load_digits(o.seed)
        tasks = make_tasks(s.seen, s.unseen, s.novel, seed=o.seed)
        zoo, zoo_acc = build_zoo(data, tasks.seen, s, o.seed, o.condition)

    # A head row is one 64-value token; rotated rows span all 64 directions, so the VAE keeps
    # a 64-wide latent (no compression) instead of the default C / 4.
    gen, ctx = fit_generator(
        zoo,
        o,
        watch,
        latent_dim=data.feature_dim,
        vae_steps=s.vae_steps,
        diffusion_steps=s.diffusion_steps,
        window=s.window,
        class_rows=["weight"],  # row k from class k's token: README, "Class rows"
    )
    if not ctx.is_main:
        return None

    splits = {"seen": tasks.seen[: max(s.unseen, 10)], "unseen": tasks.unseen, "novel": tasks.novel}
    if text:
        splits = {k: splits[k] for k in TEXT_SPLITS}
    with watch.stage("evaluate"):
        seen_heads = zoo_heads_of(zoo)
        per_split = {}
        for name, task_list in splits.items():
            heads = None
            if name == "seen":
                heads = (seen_heads[0][: len(task_list)], seen_heads[1][: len(task_list)])
            per_split[name] = evaluate_split(
                gen, data, task_list, s, heads, o.seed, o.sampling(), o.condition
            )
    with watch.stage("finetune"):
        unseen = per_split["unseen"]
        ft = finetune_comparison(
            data, splits["unseen"], unseen["best_heads"], unseen["zoo"], s, o.seed
        )

    results = {
        "world_size": ctx.world_size,
        "quick": o.quick,
        "condition": o.condition,
        "sampling": sampling_used(gen, o),
        "methods": list(METHODS),  # the columns of the table and the bars of the plots
        "tasks": {k: [list(t) for t in v] for k, v in splits.items()},
        "accuracy": {k: {m: float(v[m].mean()) for m in METHODS} for k, v in per_split.items()},
        "per_task_accuracy": {k: {m: v[m].tolist() for m in METHODS} for k, v in per_split.items()},
        "zoo": {
            "models": len(zoo),
            "trained_heads": int(zoo_acc.numel()),
            "mean_test_accuracy": float(zoo_acc.mean()),
        },
        "finetune": ft,
        "generator": {"config": gen.config.to_dict(), "parameters": _count(gen)},
        "seconds": watch.total(),
    }
    if text:
        results["text"] = {
            "featurizer": f"d2nwg.text.hashed_ngrams(class names, dim={TEXT_DIM})",
            "symmetries": 0,
            "no_novel_split": "a word that no zoo condition holds (nine) has a hashed vector "
            "the generator never learned to read; a featurizer without meaning can't generalize",
        }
    results["ratios_to_zoo"] = {
        k: {m: v[m] / v["zoo"] for m in ("generated_best", "generated_mean")}
        for k, v in results["accuracy"].items()
    }
    from d2nwg.demo.report import plots, table

    write_report(results, o.out, table, plots)
    return results


def zoo_heads_of(zoo: ModelZoo) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed-0 (unrotated) zoo head of every seen task, in task order."""
    items = [it for it in zoo if it.meta["seed"] == 0 and "rotation" not in it.meta]
    return _heads([it.state_dict for it in items])


def _count(gen: D2NWG) -> dict[str, int]:
    n = {
        "vae": sum(p.numel() for p in gen.vae.parameters()),
        "denoiser": sum(p.numel() for p in gen.model.denoiser.parameters()),
    }
    if gen.model.encoder is not None:
        n["encoder"] = sum(p.numel() for p in gen.model.encoder.parameters())
    return n
