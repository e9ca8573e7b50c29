"""``d2nwg demo --lora``: generate PEFT LoRA adapters of a small ``transformers`` LLaMA for
unseen synthetic languages (needs the hf extra: ``pip install d2nwg[hf]``).

1. Tasks: synthetic languages, first-order Markov chains over the vocabulary whose transition
   logits are ``base + a U + b V`` for task parameters ``(a, b)`` in ``[-1, 1]^2`` (``U``,
   ``V`` fixed rank-2 directions). Seen tasks lie on a grid, unseen tasks are random points
   of the box: the generator has to interpolate between the languages it has seen.
2. The base, a ``transformers.LlamaForCausalLM`` from a small ``LlamaConfig`` (random init,
   no download), is pretrained on a mixture of all languages (a random ``(a, b)`` per
   sequence): a generic model that cannot know which one it reads. Saved to ``out/base``
   with ``save_pretrained``; everything after runs on the base loaded back from there.
3. The zoo: one LoRA adapter (``q_proj`` and ``v_proj``, rank 4) per (seen task, seed),
   fine-tuned many at once (:func:`d2nwg.demo.llama.batched_lora`) with the base frozen from
   ONE shared initialization (``B = 0``, ``A`` from one fixed seed; seeds differ in the
   training sequences). LoRA has a symmetry (``(A, B)`` and ``(MA, BM^-1)`` give the same
   update); a shared ``A`` start removes it, so adapters of nearby languages are close entry
   by entry, which is what the generator learns from. Each adapter is written by ``peft``
   (``save_pretrained``) to ``out/zoo/<task>_seed<j>/``, and the zoo is
   :meth:`d2nwg.ModelZoo.from_peft` of those folders. The condition of an adapter: ``shots``
   example sequences of its task through the base, final hidden states mean-pooled per
   sequence, ``[1, shots, D]``.
4. ``D2NWG.fit`` on the zoo; for each task of each split, ``candidates`` adapters are
   generated from fresh example sequences and written as PEFT folders
   (:meth:`d2nwg.D2NWG.save_peft`, ``out/candidates/<split>/``); each is loaded with
   ``PeftModel.from_pretrained`` on the base and scored there, the one with the lowest loss
   on validation sequences is kept and scored on test sequences. The best adapter of each
   unseen task is copied to ``out/adapters/<task>/``.

``results.json``: mean per-token test loss per split of the base, the base + generated adapter
and the base + trained adapter (the zoo's for seen tasks, one trained the same way for unseen
tasks), and the fraction of the base-to-trained gap the generated adapters close.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field

import torch

from d2nwg.demo.common import (
    DemoOptions,
    Stopwatch,
    fit_generator,
    sampling_used,
    write_report,
)
from d2nwg.demo.llama import (
    Adapter,
    LMConfig,
    adapter_shapes,
    build_base,
    finetune_adapters,
    init_adapter,
    lm_loss,
    load_base,
    peft_losses,
    pretrain,
    save_base,
    save_peft_adapters,
    sequence_features,
    stack_adapters,
    unstack_adapters,
)
from d2nwg.errors import ConfigError
from d2nwg.files import read_safetensors
from d2nwg.generator import D2NWG
from d2nwg.hf import PACKAGES, require
from d2nwg.hf.peft import WEIGHTS
from d2nwg.zoo import ModelZoo

METHODS = ("base", "generated", "trained")
SPLITS = ("seen", "unseen")
TARGET = 0.80  # fraction of the base-to-trained loss gap generated adapters should close
CONDITIONS = ("transitions", "hidden")  # how example sequences are summarised
SHARED_A_SEED = 12345  # every adapter of the demo starts from this A (and B = 0)


@dataclass
class LoraSettings:
    """Sizes of the LoRA demo (the defaults: under 6 minutes on a 2-core CPU)."""

    seen_grid: int = 8  # seen tasks: a seen_grid x seen_grid grid over the parameter box
    unseen: int = 16  # random points of the box
    eval_seen: int = 16  # seen tasks evaluated (spread over the grid)
    seeds: int = 2  # zoo adapters per seen task (different training sequences)
    views: int = 2  # zoo items per adapter, each with its own draw of example sequences
    shots: int = 16  # example sequences in a condition
    # how a condition summarises each example sequence: "transitions" (its bigram
    # frequencies) or "hidden" (the base's mean final hidden state; see conditions())
    condition: str = "transitions"
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
    # the VAE bounds the quality: its reconstructions of seen adapters closed 0.86 of the
    # gap after 500 steps, 0.97 after 1500 (seed 0; the generated ones then 0.85)
    vae_steps: int = 1500
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
        if self.condition not in CONDITIONS:
            raise ConfigError(
                f"LoraSettings.condition must be one of {CONDITIONS}, got {self.condition!r}"
            )
        if self.seq_len > self.lm.max_len:
            raise ConfigError(
                f"LoraSettings.seq_len={self.seq_len} exceeds LMConfig.max_len={self.lm.max_len}"
            )

    @classmethod
    def quick(cls) -> LoraSettings:
        """Fewer tasks and steps (checks that the pipeline runs)."""
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
def pretrain_base(lang: MarkovLanguages, s: LoraSettings, seed: int, folder: str) -> list[float]:
    """The base pretrained on the mixture of languages (random parameters per sequence),
    saved to ``folder`` with ``save_pretrained``; returns the loss per step."""
    model = build_base(s.lm, seed=seed)

    def batch(step: int, g: torch.Generator) -> torch.Tensor:
        params = torch.rand(s.pretrain_batch, 2, generator=g) * 2 - 1
        return lang.sample(params, 1, g)[:, 0]

    losses = pretrain(model, s.lm, batch, s.pretrain_steps, lr=s.pretrain_lr, seed=seed)
    save_base(model, folder)
    return losses


def train_adapters(
    base: torch.nn.Module, lang: MarkovLanguages, params: torch.Tensor, s: LoraSettings, seed: int
) -> Adapter:
    """One adapter per row of ``params [M, 2]``, all from the shared initialization, trained
    at once; stacked ``[M, ...]`` under PEFT's key names."""
    shared = init_adapter(adapter_shapes(base, s.lm), seed=SHARED_A_SEED)
    start = stack_adapters([shared] * params.shape[0])

    def batch(step: int, g: torch.Generator) -> torch.Tensor:
        return lang.sample(params, s.finetune_batch, g)

    return finetune_adapters(
        base, s.lm, start, batch, s.finetune_steps, s.finetune_lr, seed, s.finetune_a_lr_scale
    )


def transition_frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Each sequence's bigram frequencies: ``tokens [P, N, T]`` -> ``[P, N, vocab * vocab]``
    (entry ``i * vocab + j``: the fraction of its ``T - 1`` steps that go from i to j)."""
    pairs = tokens[..., :-1] * vocab + tokens[..., 1:]
    out = torch.zeros(*tokens.shape[:-1], vocab * vocab)
    return out.scatter_add_(-1, pairs, torch.full(pairs.shape, 1.0 / pairs.shape[-1]))


def conditions(
    base: torch.nn.Module, lang: MarkovLanguages, params: torch.Tensor, s: LoraSettings, seed: int
) -> torch.Tensor:
    """Generator conditions ``[P, 1, shots, F]`` from ``shots`` fresh example sequences per
    task (one "class"): per sequence, its transition frequencies (``F = vocab^2``, the
    sufficient statistic of a Markov chain), or with ``s.condition == "hidden"`` the base's
    final hidden states mean-pooled over its positions (``F = D``)."""
    g = torch.Generator().manual_seed(seed)
    tokens = lang.sample(params, s.shots, g)
    if s.condition == "hidden":
        return sequence_features(base, tokens)[:, None]
    return transition_frequencies(tokens, s.lm.vocab)[:, None]


def build_zoo(
    base: torch.nn.Module,
    lang: MarkovLanguages,
    seen: torch.Tensor,
    s: LoraSettings,
    seed: int,
    folder: str,
) -> tuple[ModelZoo, Adapter]:
    """``seeds`` adapters per seen task, written by peft to ``folder/task<i>_seed<j>``, each
    entered ``views`` times with its own condition (:meth:`ModelZoo.from_peft`); returns the
    zoo and the stacked adapters (task-major: task i, seed j at i * seeds + j)."""
    params = seen.repeat_interleave(s.seeds, 0)
    adapters = train_adapters(base, lang, params, s, seed=seed + 1)
    folders = [
        os.path.join(folder, f"task{i // s.seeds:03d}_seed{i % s.seeds}")
        for i in range(params.shape[0])
    ]
    save_peft_adapters(base, s.lm, unstack_adapters(adapters), folders)
    conds = [conditions(base, lang, params, s, seed=seed + 10 + v) for v in range(s.views)]
    items = [(i, v) for i in range(params.shape[0]) for v in range(s.views)]
    zoo = ModelZoo.from_peft(
        [folders[i] for i, _ in items],
        conditions=[conds[v][i] for i, v in items],
        meta=[{"task": params[i].tolist(), "seed": i % s.seeds, "view": v} for i, v in items],
    )
    return zoo, adapters


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def read_adapters(folders: list[str]) -> Adapter:
    """The weights of PEFT adapter folders, stacked ``[F, ...]``."""
    return stack_adapters([read_safetensors(os.path.join(f, WEIGHTS))[1] for f in folders])


def evaluate_split(
    gen: D2NWG,
    base: torch.nn.Module,
    lang: MarkovLanguages,
    params: torch.Tensor,
    trained: Adapter,
    s: LoraSettings,
    seed: int,
    folder: str,
    sampling: dict | None = None,
) -> dict:
    """Per-task test losses ``[P]`` of every method and of the true chain (a floor), the
    validation loss of every candidate ``[P, K]``, and the folder of each task's best
    candidate. The candidates are PEFT folders in ``folder``, scored through
    ``PeftModel.from_pretrained``; ``peft_vs_batched`` is the largest difference between
    that score and the batched path's on the same weights (the best candidates' test loss)."""
    g = torch.Generator().manual_seed(seed + 303)
    val = lang.sample(params, s.val_seqs, g)
    test = lang.sample(params, s.test_seqs, g)
    K, P = s.candidates, params.shape[0]
    cond = conditions(base, lang, params, s, seed=seed + 404)
    folders = gen.save_peft(folder, list(cond), num_samples=K, seed=seed, **(sampling or {}))
    # one forward pass per candidate: its task's validation and test sequences
    per_seq = peft_losses(base, folders, torch.cat([val, test], 1).repeat_interleave(K, 0))
    val_loss = per_seq[:, : s.val_seqs].mean(1).view(P, K)
    test_loss = per_seq[:, s.val_seqs :].mean(1).view(P, K)
    pick = val_loss.argmin(1)
    best = [folders[p * K + int(k)] for p, k in enumerate(pick)]
    generated = test_loss[torch.arange(P), pick]
    batched = lm_loss(base, s.lm, test, read_adapters(best))
    return {
        "base": lm_loss(base, s.lm, test),
        "generated": generated,
        "trained": lm_loss(base, s.lm, test, trained),
        "generated_mean": test_loss.mean(1),
        "true_chain": lang.entropy(params, test),
        "candidates_val": val_loss,
        "best_folders": best,
        "peft_vs_batched": float((generated - batched).abs().max()),
    }


def gap_closed(base: float, generated: float, trained: float) -> float:
    """``(base - generated) / (base - trained)``: 1 = as good as a trained adapter."""
    return (base - generated) / (base - trained) if base != trained else float("nan")


def run(options: DemoOptions | None = None, settings: LoraSettings | None = None) -> dict | None:
    """The whole LoRA demo; returns the results (None on ranks other than 0 under torchrun)."""
    o = options or DemoOptions()
    if o.condition != "dataset":
        raise ConfigError(f"the LoRA demo's conditions are example sequences, not {o.condition!r}")
    for package in PACKAGES:  # before any work: MissingDependencyError names the extra
        require(package)
    s = settings or (LoraSettings.quick() if o.quick else LoraSettings())
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads or threads)
    try:
        return _run(o, s)
    finally:
        torch.set_num_threads(threads)


def _workdir(out: str) -> str:
    """Where this process writes the base and the zoo: ``out``, or under ``torchrun`` (every
    rank builds the same zoo from the same seeds) ``out/rank<r>`` for ranks other than 0, so
    that no two processes write one file."""
    rank = int(os.environ.get("RANK", "0"))
    return os.path.abspath(out if rank == 0 else os.path.join(out, f"rank{rank}"))


def _run(o: DemoOptions, s: LoraSettings) -> dict | None:
    watch = Stopwatch()
    work = _workdir(o.out)
    base_dir = os.path.join(work, "base")
    with watch.stage("pretrain"):
        lang = MarkovLanguages.make(s.lm.vocab, s.seq_len, s.scale, o.seed)
        tasks = make_tasks(s, o.seed)
        pre_losses = pretrain_base(lang, s, o.seed, base_dir)
        # from here on the base is the saved one, as a user of out/base would load it
        base = load_base(base_dir)
    with watch.stage("zoo"):
        zoo, zoo_adapters = build_zoo(base, lang, tasks.seen, s, o.seed, os.path.join(work, "zoo"))
        seen_idx = eval_seen_indices(tasks.seen.shape[0], s.eval_seen)
        unseen_trained = train_adapters(base, lang, tasks.unseen, s, seed=o.seed + 1)

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
            name: evaluate_split(
                gen,
                base,
                lang,
                params,
                trained,
                s,
                o.seed,
                os.path.join(o.out, "candidates", name),
                o.sampling(),
            )  # fmt: skip
            for name, (params, trained) in splits.items()
        }
        adapters = export_best(per_split["unseen"]["best_folders"], tasks.unseen, o.out)
    results = _results(s, o.quick, splits, per_split, zoo, gen, pre_losses, watch.total())
    results["tasks"]["seen_grid"] = tasks.seen.tolist()
    results["sampling"] = sampling_used(gen, o)
    results["files"] = {"base": "base", "adapters": adapters}
    from d2nwg.demo.report import lora_plots, lora_table

    write_report(results, o.out, lora_table, lora_plots)
    return results


def export_best(best: list[str], params: torch.Tensor, out: str) -> dict[str, dict]:
    """Copy the best generated adapter of each unseen task to ``out/adapters/unseen_<i>``
    (a PEFT folder for ``PeftModel.from_pretrained`` on ``out/base``); returns
    ``{name: {"task": [a, b], "folder": path relative to out}}``."""
    found = {}
    for i, (folder, p) in enumerate(zip(best, params.tolist())):
        name = f"unseen_{i:02d}"
        dest = os.path.join(out, "adapters", name)
        shutil.rmtree(dest, ignore_errors=True)  # a rerun into the same out replaces it
        shutil.copytree(folder, dest)
        found[name] = {"task": p, "folder": os.path.join("adapters", name)}
    return found


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
        "zoo": {
            "items": len(zoo),
            "adapters": len(zoo) // s.views,
            "symmetry": "shared A init",
            "folders": "zoo",  # PEFT adapter folders, read with ModelZoo.from_peft
        },
        # generated adapters are scored through PeftModel.from_pretrained; the batched path
        # (base, trained) on the best ones' weights differs from that by at most this much
        "peft_vs_batched": max(v["peft_vs_batched"] for v in per_split.values()),
        "pretrain_loss": {"first": pre_losses[0], "last": sum(pre_losses[-10:]) / 10},
        "settings": _jsonable(dataclasses.asdict(s)),
        "generator": {"config": gen.config.to_dict()},
        "seconds": seconds,
    }


def _jsonable(d: dict) -> dict:
    return {k: _jsonable(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
            for k, v in d.items()}  # fmt: skip
