"""The demo's data: scikit-learn's handwritten digits (8x8 images, shipped with the package,
no download), a backbone pretrained on all ten digits, 5-way tasks over digit subsets and a
zoo of task heads.

Everything is batched over models: a task head is a linear layer ``[5, F] + [5]`` on the
frozen backbone's features, and many heads (of many tasks and seeds) train in one einsum.
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
    return Digits(feats, {k: y[v] for k, v in split.items()}, backbone)


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


def task_data(data: Digits, task: tuple[int, ...], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[n, F]`` and task labels ``[n]`` (0..4, ascending class order) of a split."""
    y = data.labels[split]
    keep = torch.isin(y, torch.tensor(task))
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[list(task)] = torch.arange(WAYS)
    return data.features[split][keep], lut[y[keep]]


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
# Heads, batched over models.
# ----------------------------------------------------------------------------------------
def _stack_tasks(data: Digits, tasks: list[tuple[int, ...]], split: str):
    xs, ys = zip(*(task_data(data, t, split) for t in tasks))
    n = max(x.shape[0] for x in xs)
    X = torch.zeros(len(tasks), n, data.feature_dim)
    Y = torch.zeros(len(tasks), n, dtype=torch.long)
    W = torch.zeros(len(tasks), n)
    for i, (x, y) in enumerate(zip(xs, ys)):
        X[i, : len(x)], Y[i, : len(y)], W[i, : len(y)] = x, y, 1.0
    return X, Y, W


def head_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[M, n, 5]`` of heads ``weight [M, 5, F]``, ``bias [M, 5]`` on ``x [M, n, F]``."""
    return torch.einsum("mnf,mcf->mnc", x, weight) + bias[:, None]


def accuracy(
    weight: torch.Tensor, bias: torch.Tensor, data: Digits, tasks: list[tuple[int, ...]], split: str
) -> torch.Tensor:
    """Accuracy ``[M]`` of head m on task m's ``split``."""
    X, Y, W = _stack_tasks(data, tasks, split)
    with torch.no_grad():
        hit = (head_logits(weight, bias, X).argmax(-1) == Y).float()
    return (hit * W).sum(1) / W.sum(1)


def random_heads(
    num: int, feature_dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialization (kaiming uniform, bound 1/sqrt(F))."""
    bound = 1.0 / feature_dim**0.5
    w = (torch.rand(num, WAYS, feature_dim, generator=generator) * 2 - 1) * bound
    b = (torch.rand(num, WAYS, generator=generator) * 2 - 1) * bound
    return w, b


def train_heads(
    data: Digits,
    tasks: list[tuple[int, ...]],
    weight: torch.Tensor,
    bias: torch.Tensor,
    steps: int,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    record: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Fine-tune M heads on their tasks' train splits (full batch, Adam), all at once.

    Returns the trained weights and, with ``record``, the test accuracy ``[M]`` after every
    step (index 0 = before training)."""
    X, Y, Wt = _stack_tasks(data, tasks, "train")
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    curve = [accuracy(weight.detach(), bias.detach(), data, tasks, "test")] if record else []
    for _ in range(steps):
        logits = head_logits(weight, bias, X)
        ce = F.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="none").view_as(Wt)
        loss = ((ce * Wt).sum(1) / Wt.sum(1)).sum() + weight_decay * weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record:
            curve.append(accuracy(weight.detach(), bias.detach(), data, tasks, "test"))
    return weight.detach(), bias.detach(), curve


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
