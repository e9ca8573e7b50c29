"""``d2nwg demo --lora``: generate LoRA adapters of a tiny LLaMA for unseen synthetic languages.

1. Tasks: synthetic languages, first-order Markov chains over the vocabulary whose transition
   logits are ``base + a U + b V`` for task parameters ``(a, b)`` in ``[-1, 1]^2`` (``U``,
   ``V`` fixed rank-2 directions). Seen tasks lie on a grid, unseen tasks are random points
   of the box: the generator has to interpolate between the languages it has seen.
2. The base :class:`~d2nwg.demo.lm.TinyLlama` is pretrained on a mixture of all languages
   (a random ``(a, b)`` per sequence): a generic model that cannot know which one it reads.
3. The zoo: one LoRA adapter (q and v projections, rank 4) per (seen task, seed), fine-tuned
   with the base frozen from ONE shared initialization (``B = 0``, ``A`` from one fixed
   seed; seeds differ in the training sequences). LoRA has a symmetry (``(A, B)`` and
   ``(MA, BM^-1)`` give the same update); a shared ``A`` start removes it, so adapters of
   nearby languages are close entry by entry, which is what the generator learns from.
   The condition of an adapter: ``shots`` example sequences of its task through the base
   model, final hidden states mean-pooled per sequence, ``[1, shots, D]``.
4. ``D2NWG.fit`` on the zoo; for each task of each split, ``candidates`` adapters are
   generated from fresh example sequences, the one with the lowest loss on validation
   sequences is kept and scored on test sequences.

``results.json``: mean per-token test loss per split of the base, the base + generated adapter
and the base + trained adapter (the zoo's for seen tasks, one trained the same way for unseen
tasks), and the fraction of the base-to-trained gap the generated adapters close.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from d2nwg.demo.common import (
    DemoOptions,
    Stopwatch,
    fit_generator,
    sampling_used,
    write_report,
)
from d2nwg.demo.lm import (
    Adapter,
    LMConfig,
    TinyLlama,
    finetune_adapters,
    init_adapter,
    lm_loss,
    pretrain,
    sequence_features,
    stack_adapters,
)
from d2nwg.errors import ConfigError
from d2nwg.generator import D2NWG
from d2nwg.zoo import ModelZoo

METHODS = ("base", "generated", "trained")
SPLITS = ("seen", "unseen")
TARGET = 0.70  # fraction of the base-to-trained loss gap generated adapters should close


@dataclass
class LoraSettings:
    """Sizes of the LoRA demo (the defaults: under 10 minutes on a 2-core CPU)."""

    seen_grid: int = 8  # seen tasks: a seen_grid x seen_grid grid over the parameter box
    unseen: int = 16  # random points of the box
    eval_seen: int = 16  # seen tasks evaluated (spread over the grid)
    seeds: int = 2  # zoo adapters per seen task (different training sequences)
    views: int = 2  # zoo items per adapter, each with its own draw of example sequences
    shots: int = 16  # example sequences in a condition
    seq_len: int = 32
    scale: float = 0.9  # strength of the task directions U, V
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_steps: int = 120
    finetune_batch: int = 8  # sequences per adapter per step
    finetune_lr: float = 2e-2
    finetune_a_lr_scale: float = 1 / 16  # A learns 16x slower than B (LoRA+), stays near A0
    val_seqs: int = 32
    test_seqs: int = 64
    candidates: int = 10  # generated adapters per task
    vae_steps: int = 500
    diffusion_steps: int = 1500
    gen_hidden: int = 0  # denoiser width / depth (0: D2NWGConfig's rule)
    gen_depth: int = 0
    # CPU threads for the run (restored afterwards). On this project's shared 2-core machine,
    # 40 pretraining steps took 8.5 s with 1 thread and 179 s with 2 (OpenMP threads spinning
    # against other processes); these models are too small to gain from more.
    threads: int = 1
    lm: LMConfig = field(default_factory=LMConfig)

    def __post_init__(self) -> None:
        if self.seen_grid < 2 or self.unseen < 1 or self.eval_seen < 1 or self.candidates < 1:
            raise ConfigError("LoraSettings: seen_grid >= 2, unseen, eval_seen and candidates >= 1")
        if self.seq_len > self.lm.max_len:
            raise ConfigError(
                f"LoraSettings.seq_len={self.seq_len} exceeds LMConfig.max_len={self.lm.max_len}"
            )

    @classmethod
    def quick(cls) -> LoraSettings:
        """Fewer tasks and steps (about two minutes on a CPU; checks that the pipeline runs)."""
        tasks = dict(seen_grid=6, unseen=8, eval_seen=8, seeds=1, candidates=6)
        steps = dict(pretrain_steps=250, finetune_steps=80, vae_steps=200, diffusion_steps=400)
        return cls(**tasks, **steps)

    @classmethod
    def tiny(cls) -> LoraSettings:
        """For the test: every stage runs, nothing is trained to convergence (seconds)."""
        tasks = dict(seen_grid=3, unseen=2, eval_seen=2, seeds=1, views=1, candidates=2)
        data = dict(shots=4, seq_len=16, pretrain_batch=32, val_seqs=4, test_seqs=8)
        steps = dict(pretrain_steps=60, finetune_steps=25, vae_steps=20, diffusion_steps=20)
        lm = LMConfig(dim=32, layers=1, heads=2, ffn=64, max_len=16)
        return cls(**tasks, **data, **steps, pretrain_lr=1e-2, gen_hidden=32, gen_depth=1, lm=lm)


# ----------------------------------------------------------------------------------------
# Tasks: synthetic languages.
# ----------------------------------------------------------------------------------------
@dataclass
class MarkovLanguages:
    """First-order Markov chains with transition logits ``base + sum_k p_k dirs[k]``."""

    base: torch.Tensor  # [V, V]
    dirs: torch.Tensor  # [K, V, V]
    seq_len: int

    @classmethod
    def make(cls, vocab: int, seq_len: int, scale: float, seed: int) -> MarkovLanguages:
        """A peaked random base chain and two rank-2 task directions."""
        g = torch.Generator().manual_seed(seed + 101)

        def rank1() -> torch.Tensor:
            return torch.outer(torch.randn(vocab, generator=g), torch.randn(vocab, generator=g))

        base = torch.randn(vocab, vocab, generator=g) * 1.5
        dirs = torch.stack([(rank1() + rank1()) * scale for _ in range(2)])
        return cls(base, dirs, seq_len)

    def logits(self, params: torch.Tensor) -> torch.Tensor:
        """Transition logits ``[P, V, V]`` (row: current symbol) of tasks ``params [P, 2]``."""
        return self.base + torch.einsum("pk,kij->pij", params, self.dirs)

    def sample(self, params: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` sequences of each task: tokens ``[P, n, seq_len]`` (first symbol uniform)."""
        P, V = params.shape[0], self.base.shape[0]
        probs = self.logits(params).softmax(-1)
        x = torch.randint(V, (P, n), generator=generator)
        rows = torch.arange(P)[:, None]
        out = [x]
        for _ in range(self.seq_len - 1):
            x = torch.multinomial(probs[rows, x].view(-1, V), 1, generator=generator).view(P, n)
            out.append(x)
        return torch.stack(out, -1)

    def entropy(self, params: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The true chain's mean per-token loss ``[P]`` on ``tokens [P, N, T]`` (a floor)."""
        logp = self.logits(params).log_softmax(-1)
        P = params.shape[0]
        rows = torch.arange(P)[:, None, None]
        return -logp[rows, tokens[:, :, :-1], tokens[:, :, 1:]].mean((1, 2))


@dataclass
class LoraTasks:
    seen: torch.Tensor  # [S, 2] task parameters on a grid
    unseen: torch.Tensor  # [U, 2] random points of the box


def make_tasks(s: LoraSettings, seed: int) -> LoraTasks:
    g = torch.Generator().manual_seed(seed + 202)
    axis = torch.linspace(-1, 1, s.seen_grid)
    seen = torch.cartesian_prod(axis, axis)
    unseen = torch.rand(s.unseen, 2, generator=g) * 2 - 1
    return LoraTasks(seen, unseen)


def eval_seen_indices(num_seen: int, count: int) -> list[int]:
    """``count`` seen tasks spread over the grid."""
    count = min(count, num_seen)
    return torch.linspace(0, num_seen - 1, count).round().long().tolist()


# ----------------------------------------------------------------------------------------
# Base model, zoo, conditions.
# ----------------------------------------------------------------------------------------
def pretrain_base(lang: MarkovLanguages, s: LoraSettings, seed: int) -> tuple[TinyLlama, list]:
    """The base pretrained on the mixture of languages (random parameters per sequence)."""
    model = TinyLlama(s.lm, seed=seed)

    def batch(step: int, g: torch.Generator) -> torch.Tensor:
        params = torch.rand(s.pretrain_batch, 2, generator=g) * 2 - 1
        return lang.sample(params, 1, g)[:, 0]

    return model, pretrain(model, batch, s.pretrain_steps, lr=s.pretrain_lr, seed=seed)


def train_adapters(
    model: TinyLlama,
    lang: MarkovLanguages,
    params: torch.Tensor,
    s: LoraSettings,
    seed: int,
) -> Adapter:
    """One adapter per row of ``params [M, 2]``, all from the shared initialization; stacked."""
    start = stack_adapters([init_adapter(s.lm, seed=SHARED_A_SEED)] * params.shape[0])

    def batch(step: int, g: torch.Generator) -> torch.Tensor:
        return lang.sample(params, s.finetune_batch, g)

    return finetune_adapters(
        model, start, batch, s.finetune_steps, s.finetune_lr, seed, s.finetune_a_lr_scale
    )


SHARED_A_SEED = 12345  # every adapter of the demo starts from this A (and B = 0)


def conditions(
    model: TinyLlama, lang: MarkovLanguages, params: torch.Tensor, s: LoraSettings, seed: int
) -> torch.Tensor:
    """Generator conditions ``[P, 1, shots, D]``: ``shots`` fresh example sequences per task
    through the base, final hidden states mean-pooled per sequence (one "class")."""
    g = torch.Generator().manual_seed(seed)
    return sequence_features(model, lang.sample(params, s.shots, g))[:, None]


def build_zoo(
    model: TinyLlama, lang: MarkovLanguages, seen: torch.Tensor, s: LoraSettings, seed: int
) -> tuple[ModelZoo, Adapter]:
    """``seeds`` adapters per seen task, each entered ``views`` times with its own condition;
    returns the zoo and the stacked adapters (task-major: task i, seed j at i * seeds + j)."""
    params = seen.repeat_interleave(s.seeds, 0)
    adapters = train_adapters(model, lang, params, s, seed=seed + 1)
    zoo = ModelZoo()
    conds = [conditions(model, lang, params, s, seed=seed + 10 + v) for v in range(s.views)]
    for i in range(params.shape[0]):
        sd = {k: v[i] for k, v in adapters.items()}
        meta = {"task": params[i].tolist(), "seed": i % s.seeds}
        for v in range(s.views):
            zoo.add(sd, condition=conds[v][i], meta={**meta, "view": v})
    return zoo, adapters


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def evaluate_split(
    gen: D2NWG,
    model: TinyLlama,
    lang: MarkovLanguages,
    params: torch.Tensor,
    trained: Adapter,
    s: LoraSettings,
    seed: int,
    sampling: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task test losses ``[P]`` of every method, the true chain's (a floor), and the
    validation loss of every candidate ``[P, K]``."""
    g = torch.Generator().manual_seed(seed + 303)
    val = lang.sample(params, s.val_seqs, g)
    test = lang.sample(params, s.test_seqs, g)
    K, P = s.candidates, params.shape[0]
    cond = conditions(model, lang, params, s, seed=seed + 404)
    sds = gen.generate(list(cond), num_samples=K, seed=seed, **(sampling or {}))
    cands = stack_adapters(sds)  # [P*K, ...]
    val_loss = lm_loss(model, val.repeat_interleave(K, 0), cands).view(P, K)
    pick = torch.arange(P) * K + val_loss.argmin(1)
    best = {k: v[pick] for k, v in cands.items()}
    return {
        "base": lm_loss(model, test),
        "generated": lm_loss(model, test, best),
        "trained": lm_loss(model, test, trained),
        "generated_mean": lm_loss(model, test.repeat_interleave(K, 0), cands).view(P, K).mean(1),
        "true_chain": lang.entropy(params, test),
        "candidates_val": val_loss,
    }


def gap_closed(base: float, generated: float, trained: float) -> float:
    """``(base - generated) / (base - trained)``: 1 = as good as a trained adapter."""
    return (base - generated) / (base - trained) if base != trained else float("nan")


def run(options: DemoOptions | None = None, settings: LoraSettings | None = None) -> dict | None:
    """The whole LoRA demo; returns the results (None on ranks other than 0 under torchrun)."""
    o = options or DemoOptions()
    if o.condition != "dataset":
        raise ConfigError(f"the LoRA demo's conditions are example sequences, not {o.condition!r}")
    s = settings or (LoraSettings.quick() if o.quick else LoraSettings())
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads or threads)
    try:
        return _run(o, s)
    finally:
        torch.set_num_threads(threads)


def _run(o: DemoOptions, s: LoraSettings) -> dict | None:
    watch = Stopwatch()
    with watch.stage("pretrain"):
        lang = MarkovLanguages.make(s.lm.vocab, s.seq_len, s.scale, o.seed)
        tasks = make_tasks(s, o.seed)
        model, pre_losses = pretrain_base(lang, s, o.seed)
    with watch.stage("zoo"):
        zoo, zoo_adapters = build_zoo(model, lang, tasks.seen, s, o.seed)
        seen_idx = eval_seen_indices(tasks.seen.shape[0], s.eval_seen)
        unseen_trained = train_adapters(model, lang, tasks.unseen, s, seed=o.seed + 1)

    # One token per LoRA factor (r x D = 256 values): 8 tokens for q and v of 2 layers, which
    # keeps the denoiser fast on a CPU (the default 64-value chunks give 32 tokens).
    gen, ctx = fit_generator(
        zoo,
        o,
        watch,
        chunk_size=s.lm.lora_rank * s.lm.dim,
        vae_steps=s.vae_steps,
        vae_batch=128,  # the zoo has only a few thousand chunks
        diffusion_steps=s.diffusion_steps,
        hidden_dim=s.gen_hidden,
        depth=s.gen_depth,
    )
    if not ctx.is_main:
        return None

    seed0 = torch.tensor(seen_idx) * s.seeds  # the seed-0 zoo adapter of each task
    splits = {
        "seen": (tasks.seen[seen_idx], {k: v[seed0] for k, v in zoo_adapters.items()}),
        "unseen": (tasks.unseen, unseen_trained),
    }
    with watch.stage("evaluate"):
        per_split = {
            name: evaluate_split(gen, model, lang, params, trained, s, o.seed, o.sampling())
            for name, (params, trained) in splits.items()
        }
    results = _results(s, o.quick, splits, per_split, zoo, gen, pre_losses, watch.total())
    results["tasks"]["seen_grid"] = tasks.seen.tolist()
    results["sampling"] = sampling_used(gen, o)
    from d2nwg.demo.report import lora_plots, lora_table

    write_report(results, o.out, lora_table, lora_plots)
    return results


def _results(s, quick, splits, per_split, zoo, gen, pre_losses, seconds) -> dict:
    keys = (*METHODS, "generated_mean", "true_chain")
    loss = {k: {m: float(v[m].mean()) for m in keys} for k, v in per_split.items()}
    return {
        "quick": quick,
        "methods": list(METHODS),  # the table's columns and the plot's bars (and the true chain)
        "loss": loss,
        "gap_closed": {
            k: gap_closed(v["base"], v["generated"], v["trained"]) for k, v in loss.items()
        },
        "gap_closed_mean_candidate": {
            k: gap_closed(v["base"], v["generated_mean"], v["trained"]) for k, v in loss.items()
        },
        "target": TARGET,
        "per_task_loss": {k: {m: v[m].tolist() for m in keys} for k, v in per_split.items()},
        "tasks": {k: p.tolist() for k, (p, _) in splits.items()},
        "zoo": {"items": len(zoo), "adapters": len(zoo) // s.views, "symmetry": "shared A init"},
        "pretrain_loss": {"first": pre_losses[0], "last": sum(pre_losses[-10:]) / 10},
        "settings": _jsonable(dataclasses.asdict(s)),
        "generator": {"config": gen.config.to_dict()},
        "seconds": seconds,
    }


def _jsonable(d: dict) -> dict:
    return {k: _jsonable(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
            for k, v in d.items()}  # fmt: skip
