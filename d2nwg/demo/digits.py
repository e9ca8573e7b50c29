"""The demo's data: scikit-learn's handwritten digits (8x8 images, shipped with the package,
no download), a backbone pretrained on all ten digits (whose features are the tasks'
conditions, and the inputs of the heads), 5-way tasks over digit subsets, batched per model.
The models themselves are in :mod:`d2nwg.demo.families`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

WAYS = 5
# The text condition of a task: the names of its classes in label order, one token per word.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT_DIM = 256  # width of the hashed n-gram featurizer's vectors (d2nwg.text.hashed_ngrams)


@dataclass
class Digits:
    """Backbone features of the digits, split per class into train / val / test."""

    features: dict[str, torch.Tensor]  # split -> [n, F]
    labels: dict[str, torch.Tensor]  # split -> [n] digit labels 0..9
    backbone: nn.Module
    pixels: dict[str, torch.Tensor]  # split -> [n, 64], scaled to [0, 1]

    @property
    def feature_dim(self) -> int:
        return self.features["train"].shape[1]


def load_digits(
    seed: int = 0, hidden: int = 128, feature_dim: int = 64, pretrain_steps: int = 300
) -> Digits:
    """Split the 1797 digits 50/20/30 per class and pretrain an MLP backbone on the train split
    of all ten digits (a 10-way linear head on top, discarded afterwards)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # pragma: no cover - the demo's dependency
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn") from exc
    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for digit in range(10):
        idx = torch.nonzero(y == digit).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_train, n_val = int(0.5 * idx.numel()), int(0.2 * idx.numel())
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    split = {k: torch.cat(v) for k, v in parts.items()}

    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU()
    )
    head = nn.Linear(feature_dim, 10)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-4)
    xt, yt = x[split["train"]], y[split["train"]]
    for _ in range(pretrain_steps):
        loss = F.cross_entropy(head(backbone(xt)), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval().requires_grad_(False)
    with torch.no_grad():
        feats = {k: backbone(x[v]) for k, v in split.items()}
    labels = {k: y[v] for k, v in split.items()}
    return Digits(feats, labels, backbone, {k: x[v] for k, v in split.items()})


# ----------------------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------------------
@dataclass
class TaskSplits:
    seen: list[tuple[int, ...]]  # in the zoo
    unseen: list[tuple[int, ...]]  # held out of generator training, known digits only
    novel: list[tuple[int, ...]]  # contain the novel digit, which no zoo task contains


def make_tasks(
    num_seen: int, num_unseen: int, num_novel: int, novel_digit: int = 9, seed: int = 0
) -> TaskSplits:
    """5-way tasks (class subsets, labels in ascending class order)."""
    g = torch.Generator().manual_seed(seed)
    known = [d for d in range(10) if d != novel_digit]
    pool = list(itertools.combinations(known, WAYS))
    order = torch.randperm(len(pool), generator=g).tolist()
    pool = [pool[i] for i in order]
    if num_seen + num_unseen > len(pool):
        raise ValueError(f"only {len(pool)} tasks without digit {novel_digit}")
    novel_pool = [t for t in itertools.combinations(range(10), WAYS) if novel_digit in t]
    novel = [
        novel_pool[i] for i in torch.randperm(len(novel_pool), generator=g)[:num_novel].tolist()
    ]
    return TaskSplits(pool[:num_seen], pool[num_seen : num_seen + num_unseen], novel)


def task_data(
    data: Digits, task: tuple[int, ...], split: str, inputs: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, D]`` (``inputs``: "features" or "pixels") and task labels ``[n]`` (0..4,
    ascending class order) of a split."""
    y = data.labels[split]
    keep = torch.isin(y, torch.tensor(task))
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[list(task)] = torch.arange(WAYS)
    source = data.features if inputs == "features" else data.pixels
    return source[split][keep], lut[y[keep]]


def support_set(
    data: Digits, task: tuple[int, ...], shots: int, generator: torch.Generator
) -> torch.Tensor:
    """The condition: ``shots`` training examples' features per class, ``[5, shots, F]``."""
    rows = []
    for digit in task:
        idx = torch.nonzero(data.labels["train"] == digit).squeeze(1)
        pick = idx[torch.randperm(idx.numel(), generator=generator)[:shots]]
        rows.append(data.features["train"][pick])
    return torch.stack(rows)


def name_condition(task: tuple[int, ...]) -> torch.Tensor:
    """The text condition of a task, ``[5, TEXT_DIM]``: its class names in label order (e.g.
    "zero one three five eight"), embedded by the fixed featurizer, one token per word."""
    from d2nwg.text import hashed_ngrams

    return hashed_ngrams([DIGIT_NAMES[d] for d in task], dim=TEXT_DIM)


# ----------------------------------------------------------------------------------------
# Tasks batched: one row per model.
# ----------------------------------------------------------------------------------------
def stack_tasks(
    data: Digits, tasks: list[tuple[int, ...]], split: str, inputs: str = "features"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``[M, n, D]``, task labels ``[M, n]`` and a mask of real examples ``[M, n]``
    (1.0 in the first ``count[m]`` slots) of each task's ``split``, padded to the longest."""
    xs, ys = zip(*(task_data(data, t, split, inputs) for t in tasks))
    n = max(x.shape[0] for x in xs)
    X = torch.zeros(len(tasks), n, xs[0].shape[1])
    Y = torch.zeros(len(tasks), n, dtype=torch.long)
    W = torch.zeros(len(tasks), n)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X[i, : len(x)], Y[i, : len(y)], W[i, : len(y)] = x, y, 1.0
    return X, Y, W


def feature_symmetry(
    weight: torch.Tensor, condition: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same task seen in a randomly rotated feature space: features ``x -> Q^T x`` and
    head ``W -> W Q`` for a random orthogonal Q, so ``W x`` (every logit) is unchanged.

    Zoo copies under this symmetry teach the generator the rule from a class's examples to its
    row of the head instead of a lookup of the nine digits it has seen, which is what lets it
    write a row for a digit that no zoo task contains.
    """
    F = weight.shape[-1]
    q, r = torch.linalg.qr(torch.randn(F, F, generator=generator))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed (Mezzadri 2007)
    return weight @ q, condition @ q
