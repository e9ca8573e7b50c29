"""``d2nwg demo``: train a generator of digit-task models and show that its weights work.

``--model`` picks what is generated (:mod:`d2nwg.demo.families`): ``head`` (the default), a
5-way linear head on a frozen pretrained backbone, or a whole network on the pixels, ``mlp``
(64 -> 32 -> 32 -> 5) or ``cnn`` (two 3x3 conv layers and a linear head), each zoo model
fine-tuning all its layers from a body pretrained on all ten digits. The condition is the same
for every model: the support set's backbone features (so that only what is generated differs
between the three; the backbone's features also tell the digits apart better than pixels).

1. A backbone pretrained on all ten digits; 5-way tasks over digit subsets (labels in
   ascending class order). Digit 9 is *novel*: no zoo task contains it.
2. A zoo: one head per (seen task, seed), fine-tuned on the frozen backbone's features; the
   condition of each is a support set of example features per class ``[5, shots, F]``.
   Each head also enters the zoo in ``symmetries`` randomly rotated feature spaces (head and
   examples rotated alike, so every logit is unchanged): the generator must then learn the
   rule from examples to weights, not a table of the nine digits it has seen.
3. ``D2NWG.fit`` on the zoo (under ``torchrun``, with DDP over the ranks).
4. For every task of the three splits (seen, unseen class combinations, novel-class tasks)
   ``candidates`` models are generated: ``generated_best`` is picked on the validation split
   and scored on the test split, ``generated_mean`` averages all candidates; ``zoo`` is a model
   trained on that task the way zoo models are, ``random`` a random head (on the pretrained
   body, for a network). The memorization baselines (:mod:`d2nwg.demo.baselines`):
   ``retrieval``, ``zoo_average`` and ``zoo_noised``; and where quality is lost: the zoo's
   models after a VAE round trip, the candidates' distances to the zoo and to each other.
5. Fine-tuning from the best generated model and from a random head: steps until 95% of the
   zoo model's accuracy.

Copies under a symmetry (``symmetries``) are on for heads only: a rotation of the frozen
feature space maps a head and its condition alike, so the zoo teaches a rule. A network reads
pixels, which no rotation of the condition describes; its exact symmetry, permuting hidden
units (the mlp's copies with ``symmetries > 0``), leaves the condition as it is, so the zoo
pairs one condition with several weight vectors: measured on the mlp's ``--quick`` preset, one
copy each brought ``generated_best`` from 0.58 / 0.52 / 0.40 to 0.41 / 0.33 / 0.25 (seen /
unseen / novel) and the VAE round trip from 0.82 to 0.70, so networks default to none.

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

from d2nwg.demo import baselines as B
from d2nwg.demo import families as Fm
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
    feature_symmetry,
    load_digits,
    make_tasks,
    name_condition,
    support_set,
)
from d2nwg.demo.families import MODELS, ModelFamily, Params
from d2nwg.errors import ConfigError
from d2nwg.generator import D2NWG
from d2nwg.zoo import ModelZoo

GENERATED = ("generated_best", "generated_mean")
BASELINES = ("retrieval", "zoo_average", "zoo_noised")  # what a memorizer of the zoo gets
METHODS = (*GENERATED, "zoo", "random", *BASELINES)
SPLITS = ("seen", "unseen", "novel")
DEMO_CONDITIONS = ("dataset", "text")  # of a task: support-set features, or its class names
TEXT_SPLITS = ("seen", "unseen")  # no novel split: a word no zoo condition holds means nothing


QUICK_NETWORK_STEPS = 200  # diffusion steps of --quick for whole networks (heads: 250)


@dataclass
class DemoSettings:
    seen: int = 100  # zoo tasks (of the 126 without the novel digit)
    unseen: int = 20
    novel: int = 20
    seeds: int = 3  # zoo models per seen task
    symmetries: int = 3  # rotated copies of each zoo head (besides the head itself; text: 0)
    shots: int = 20  # support examples per class (the condition)
    head_steps: int = 100  # fine-tuning steps of a zoo model
    candidates: int = 20  # generated models per task
    finetune_steps: int = 60
    finetune_tasks: int = 10
    vae_steps: int = 500  # 0: the library's default
    diffusion_steps: int = 1500  # 0: the library's default
    window: int = 0  # tokens per denoiser window (0: a model is one window)
    class_rows: bool = True  # the class layer's rows follow the condition's classes

    @classmethod
    def quick(cls) -> DemoSettings:
        """Fewer tasks, models and steps (heads: 37 s on a 2-core CPU; see for_model)."""
        tasks = dict(seen=40, unseen=10, novel=5, finetune_tasks=5)
        models = dict(seeds=2, symmetries=1, candidates=5)
        steps = dict(finetune_steps=40, vae_steps=150, diffusion_steps=250)
        return cls(**tasks, **models, **steps)

    @classmethod
    def for_model(cls, model: str, quick: bool = False) -> DemoSettings:
        """The preset of ``d2nwg demo --model model [--quick]``. Whole networks: no rotated
        copies, and the generator's training steps are the library's defaults (0) in the
        default run."""
        s = cls.quick() if quick else cls()
        if model == "head":
            return s
        if model not in MODELS:
            raise ConfigError(f"the digits demo's model is one of {MODELS}, not {model!r}")
        s = dataclasses.replace(s, symmetries=0)
        if quick:  # 56 tokens a model: fewer steps keep the MLP's quick run under 90 s
            return dataclasses.replace(s, diffusion_steps=QUICK_NETWORK_STEPS)
        return dataclasses.replace(s, vae_steps=0, diffusion_steps=0)


def build_zoo(
    data: Digits,
    family: ModelFamily,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    seed: int,
    condition: str = "dataset",
) -> tuple[ModelZoo, Params, torch.Tensor]:
    """One model per (task, seed), all trained at once; returns the zoo, the trained models
    ``[tasks * seeds, ...]`` (task-major) and their test accuracy. ``condition``: "dataset"
    (support sets) or "text" (class names; ``s.symmetries`` must be 0 then, and for networks)."""
    if condition == "text" and s.symmetries:
        raise ConfigError("a text zoo has no rotated copies: the words can't say the rotation")
    if family.name == "cnn" and s.symmetries:
        raise ConfigError(
            f"symmetries={s.symmetries}: copies are for heads (rotations) and the mlp "
            "(hidden-unit permutations) only"
        )
    g = torch.Generator().manual_seed(seed)
    zoo_tasks = [t for t in tasks for _ in range(s.seeds)]
    params, _ = Fm.train(family, data, zoo_tasks, family.init(len(zoo_tasks), g), s.head_steps, g)
    zoo = ModelZoo()
    for i, (task, sd) in enumerate(zip(zoo_tasks, Fm.unstack(params))):
        cond = name_condition(task) if condition == "text" else support_set(data, task, s.shots, g)
        meta = {"task": list(task), "seed": i % s.seeds}
        zoo.add(sd, condition=cond, meta=meta)
        for k in range(s.symmetries):
            if family.name == "head":
                rw, rc = feature_symmetry(sd["weight"], cond, g)
                zoo.add({**sd, "weight": rw}, condition=rc, meta={**meta, "rotation": k + 1})
            else:  # the same function, the same condition
                copy = Fm.permute_hidden(family, sd, g)
                zoo.add(copy, condition=cond, meta={**meta, "permutation": k + 1})
    return zoo, params, Fm.accuracy(family, params, data, zoo_tasks, "test")


def task_conditions(
    data: Digits, tasks: list[tuple[int, ...]], s: DemoSettings, g: torch.Generator, condition: str
) -> torch.Tensor:
    """The conditions ``[tasks, ...]`` of an evaluation split: support sets drawn from ``g``,
    or the tasks' class names with ``condition="text"``."""
    # drawn for text too, so that g's later draws (the baselines) are the dataset demo's
    conds = torch.stack([support_set(data, t, s.shots, g) for t in tasks])
    if condition == "text":
        conds = torch.stack([name_condition(t) for t in tasks])
    return conds


def generate_candidates(
    gen: D2NWG,
    data: Digits,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    seed: int,
    g: torch.Generator,
    sampling: dict,
    condition: str = "dataset",
    family: ModelFamily | None = None,
    conds: torch.Tensor | None = None,
) -> dict:
    """``s.candidates`` generated models per task (``family``: heads by default) and their
    validation and test accuracy ``[tasks, K]``; ``params`` ``[tasks * K, ...]`` task-major.
    ``conds``: the tasks' conditions (default: :func:`task_conditions` drawn from ``g``)."""
    family = family or Fm.family("head", data)
    if conds is None:
        conds = task_conditions(data, tasks, s, g, condition)
    K = s.candidates
    params = Fm.stack(gen.generate(conds, num_samples=K, seed=seed, **sampling), family.names)
    return {"params": params, **scores(family, params, data, tasks, K)}


def scores(
    family: ModelFamily, params: Params, data: Digits, tasks: list[tuple[int, ...]], K: int
) -> dict[str, torch.Tensor]:
    """Validation and test accuracy ``[tasks, K]`` of ``K`` models per task (task-major), and
    the test accuracy ``[tasks]`` of the one picked on validation (``best``) and of all
    (``mean``); ``pick``: the index of the picked model in ``params``."""
    rep = [t for t in tasks for _ in range(K)]
    val = Fm.accuracy(family, params, data, rep, "val").view(len(tasks), K)
    test = Fm.accuracy(family, params, data, rep, "test").view(len(tasks), K)
    rows = torch.arange(len(tasks))
    pick = val.argmax(1)
    return {"val": val, "test": test, "best": test[rows, pick], "mean": test.mean(1),
            "pick": rows * K + pick}  # fmt: skip


def evaluate_split(
    gen: D2NWG,
    data: Digits,
    family: ModelFamily,
    tasks: list[tuple[int, ...]],
    s: DemoSettings,
    zoo_models: Params | None,
    memory: B.ZooMemory,
    seed: int,
    sampling: dict | None = None,
    condition: str = "dataset",
) -> dict:
    """Accuracy ``[tasks]`` of every method of :data:`METHODS` on each task of one split, the
    best generated models (``best_models``), the retrieved zoo tasks and the distances.
    ``zoo_models``: the zoo's model of each task (None, for tasks outside the zoo: one is
    trained here, the way zoo models are)."""
    g = torch.Generator().manual_seed(seed + 1)
    conds = task_conditions(data, tasks, s, g, condition)
    K = s.candidates
    cands = generate_candidates(
        gen, data, tasks, s, seed, g, sampling or {}, condition, family, conds
    )
    in_zoo = zoo_models is not None
    if not in_zoo:
        zoo_models = Fm.train(family, data, tasks, family.init(len(tasks), g), s.head_steps, g)[0]
    random = family.init(len(tasks), g)
    retrieved, index = memory.retrieve(B.embed(gen, conds))
    # zoo_noised: the task's own zoo model if the zoo has one, else the retrieved model
    noise = torch.Generator().manual_seed(seed + 3)
    base = zoo_models if in_zoo else retrieved
    noisy = scores(family, B.noised(base, B.spread(cands["params"], K), K, noise), data, tasks, K)
    vectors = Fm.flat(cands["params"]).view(len(tasks), K, -1)  # [tasks, K, P]
    apart = [B.pairwise_mean(v) for v in vectors] if K > 1 else []  # none with one candidate

    def acc(params: Params) -> torch.Tensor:
        return Fm.accuracy(family, params, data, tasks, "test")

    return {
        "generated_best": cands["best"],
        "generated_mean": cands["mean"],
        "zoo": acc(zoo_models),
        "random": acc(random),
        "retrieval": acc(retrieved),
        "zoo_average": acc(memory.average(len(tasks))),
        "zoo_noised": noisy["best"],
        "zoo_noised_mean": noisy["mean"],
        "best_models": Fm.select(cands["params"], cands["pick"]),
        "retrieved_tasks": [list(memory.tasks[i]) for i in index.tolist()],
        "nearest_zoo": memory.nearest_distance(cands["params"]),
        "generated_pairwise": torch.tensor(apart),
    }


def finetune_comparison(
    data: Digits,
    family: ModelFamily,
    tasks: list[tuple[int, ...]],
    best_models: Params,
    zoo_acc: torch.Tensor,
    s: DemoSettings,
    seed: int,
) -> dict:
    """Fine-tuning curves (test accuracy per step) from the best generated models and from
    random heads (on the pretrained body, for networks), on the same minibatches."""
    n = min(len(tasks), s.finetune_tasks)
    tasks, zoo_acc = tasks[:n], zoo_acc[:n]
    target = 0.95 * zoo_acc
    starts = {
        "generated": Fm.select(best_models, slice(0, n)),
        "random": family.init(n, torch.Generator().manual_seed(seed + 2)),
    }
    curves, steps = {}, {}
    for name, params in starts.items():
        batches = torch.Generator().manual_seed(seed + 4)
        _, curve = Fm.train(family, data, tasks, params, s.finetune_steps, batches, record=True)
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
    s = settings or DemoSettings.for_model(o.model, o.quick)
    if text:  # rotated copies would pair one condition with several heads (see the docstring)
        s = dataclasses.replace(s, symmetries=0)
    if o.window is not None:
        s = dataclasses.replace(s, window=o.window)
    watch = Stopwatch()
    with watch.stage("data_and_zoo"):
        data = load_digits(o.seed)
        family = Fm.family(o.model, data, o.seed)
        tasks = make_tasks(s.seen, s.unseen, s.novel, seed=o.seed)
        zoo, zoo_params, zoo_acc = build_zoo(data, family, tasks.seen, s, o.seed, o.condition)

    # row k of the class layer from class k's condition token: README, "Class rows"
    config = {"window": s.window, "class_rows": [family.head[0]] if s.class_rows else None}
    if family.name == "head":
        # A head row is one 64-value token; rotated rows span all 64 directions, so the VAE
        # keeps a 64-wide latent (no compression) instead of the default C / 4. Networks use
        # the library's defaults throughout.
        config["latent_dim"] = data.feature_dim
    gen, ctx = fit_generator(
        zoo, o, watch, vae_steps=s.vae_steps, diffusion_steps=s.diffusion_steps, **config
    )
    if not ctx.is_main:
        return None

    splits = {"seen": tasks.seen[: max(s.unseen, 10)], "unseen": tasks.unseen, "novel": tasks.novel}
    if text:
        splits = {k: splits[k] for k in TEXT_SPLITS}
    with watch.stage("evaluate"):
        memory = B.ZooMemory.of(gen, zoo, family)
        seen_models = Fm.select(zoo_params, slice(0, len(splits["seen"]) * s.seeds, s.seeds))
        per_split = {
            name: evaluate_split(
                gen,
                data,
                family,
                task_list,
                s,
                seen_models if name == "seen" else None,
                memory,
                o.seed,
                o.sampling(),
                o.condition,
            )  # fmt: skip
            for name, task_list in splits.items()
        }
        roundtrip = Fm.accuracy(
            family, B.vae_roundtrip(gen, seen_models), data, splits["seen"], "test"
        )
    with watch.stage("finetune"):
        unseen = per_split["unseen"]
        ft = finetune_comparison(
            data, family, splits["unseen"], unseen["best_models"], unseen["zoo"], s, o.seed
        )

    same_task = memory.same_task_distance()
    results = {
        "model": family.name,
        "world_size": ctx.world_size,
        "quick": o.quick,
        "condition": o.condition,
        "sampling": sampling_used(gen, o),
        "tokens": gen.tokenizer.num_tokens,  # per model
        "window": gen.windows.size,  # tokens per denoiser window
        "methods": list(METHODS),  # the columns of the table and the bars of the plots
        "tasks": {k: [list(t) for t in v] for k, v in splits.items()},
        "accuracy": {k: {m: float(v[m].mean()) for m in METHODS} for k, v in per_split.items()},
        "per_task_accuracy": {k: {m: v[m].tolist() for m in METHODS} for k, v in per_split.items()},
        "zoo": {
            "models": len(zoo),
            "trained_models": int(zoo_acc.numel()),
            "mean_test_accuracy": float(zoo_acc.mean()),
        },
        "body_change": Fm.body_change(family, zoo_params),
        "vae_roundtrip": {
            "tasks": "seen",
            "zoo": float(per_split["seen"]["zoo"].mean()),
            "roundtrip": float(roundtrip.mean()),
        },
        "diversity": {
            k: {
                "generated_pairwise": _mean(v["generated_pairwise"]),
                "zoo_same_task_pairwise": same_task,
            }
            for k, v in per_split.items()
        },
        "novelty": {
            k: {
                "nearest_zoo": float(v["nearest_zoo"].mean()),
                "zoo_same_task": same_task,
                "per_candidate": v["nearest_zoo"].tolist(),  # task-major
            }
            for k, v in per_split.items()
        },
        "retrieved_tasks": {k: v["retrieved_tasks"] for k, v in per_split.items()},
        "zoo_noised_mean": {k: float(v["zoo_noised_mean"].mean()) for k, v in per_split.items()},
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


def _mean(values: torch.Tensor) -> float | None:
    """The mean, or None (JSON null) for no values."""
    return float(values.mean()) if values.numel() else None


def _count(gen: D2NWG) -> dict[str, int]:
    n = {
        "vae": sum(p.numel() for p in gen.vae.parameters()),
        "denoiser": sum(p.numel() for p in gen.model.denoiser.parameters()),
    }
    if gen.model.encoder is not None:
        n["encoder"] = sum(p.numel() for p in gen.model.encoder.parameters())
    return n
