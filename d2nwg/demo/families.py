"""What the digits demo generates, one *family* of models per ``d2nwg demo --model``:

- ``head``: a 5-way linear head ``[5, F] + [5]`` on the frozen backbone's features (the
  original demo; 6 tokens).
- ``mlp``: every layer of a 3-layer MLP on the raw 8x8 pixels, 64 -> 32 -> 32 -> 5.
- ``cnn``: two 3x3 conv layers (1 -> 8 -> 16 channels, each followed by ReLU and 2x2 max
  pooling) and a linear head, on the pixels.

The whole networks start from a *body* pretrained on all ten digits (a 10-way head on top,
discarded) and a fresh 5-way head; each zoo model fine-tunes all of its layers on its task.

Everything is batched over models: ``Params`` maps a parameter name to a ``[M, *shape]``
tensor of M models stacked, the names being those of the family's ``nn.Module`` (so one
model's state dict loads into :meth:`ModelFamily.module`). Many models of many tasks train
in one step: an einsum for heads, ``torch.func.functional_call`` under ``torch.vmap`` for
the networks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2nwg.demo.digits import WAYS, Digits, stack_tasks
from d2nwg.errors import ConfigError

Params = dict[str, torch.Tensor]  # name -> [M, *shape]: M models of one family, stacked
MODELS = ("head", "mlp", "cnn")
EVAL_MODELS = 128  # models per forward pass when scoring (bounds the CNN's activations)


@dataclass
class ModelFamily:
    """One kind of model the demo generates, and how a zoo of them trains.

    ``inputs``: which of the data's inputs it reads ("features" or "pixels"); ``head``: the
    names of its class layer's weight and bias (their rows are the task's classes, in label
    order); ``body``: the pretrained parameters the zoo models start from (None: heads start
    from scratch); ``batch``: training examples per model per step (0: the full train split).
    """

    name: str
    inputs: str
    head: tuple[str, str]
    lr: float
    weight_decay: float
    batch: int = 0
    body: dict[str, torch.Tensor] = field(default_factory=dict)
    factory: type[nn.Module] | None = None
    features: int = 0  # a head's input width F (networks read the 64 pixels)

    def module(self, ways: int = WAYS) -> nn.Module:
        """An ``nn.Module`` whose state dict has this family's names (one model)."""
        if self.factory is None:
            raise ConfigError(f"the {self.name!r} family has no module")
        return self.factory(ways)

    def init(self, num: int, generator: torch.Generator) -> Params:
        """``num`` models at the start of fine-tuning: the pretrained body (if any) and a head
        drawn as ``nn.Linear`` draws one (uniform, bound 1/sqrt(fan_in))."""
        w_name, b_name = self.head
        fan_in = self.head_shape[1]
        bound = 1.0 / fan_in**0.5
        w = (torch.rand(num, WAYS, fan_in, generator=generator) * 2 - 1) * bound
        b = (torch.rand(num, WAYS, generator=generator) * 2 - 1) * bound
        params = {k: v.expand(num, *v.shape).clone() for k, v in self.body.items()}
        params.update({w_name: w, b_name: b})
        return {k: params[k] for k in self.names}

    @functools.cached_property
    def _net(self) -> nn.Module:
        """One module, whose forward the batched logits call on each model's parameters."""
        return self.module()

    @property
    def names(self) -> list[str]:
        """Parameter names in the module's order."""
        if self.factory is None:
            return list(self.head)
        return list(self._net.state_dict())

    @property
    def head_shape(self) -> tuple[int, int]:
        """The class layer's weight shape ``(5, fan_in)``."""
        if self.factory is None:
            return (WAYS, self.features)
        return tuple(self._net.state_dict()[self.head[0]].shape)

    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, n, 5]`` of M models on their inputs ``x [M, n, D]``."""
        if self.factory is None:
            w, b = (params[k] for k in self.head)
            return torch.einsum("mnf,mcf->mnc", x, w) + b[:, None]
        net = self._net

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(net, p, (xi,))

        return torch.vmap(one)(dict(params), x)

    def permute_classes(self, params: Params, perm: torch.Tensor) -> Params:
        """The same models with their class rows reordered: row i of model m becomes its row
        ``perm[m, i]`` (``perm [M, 5]``)."""
        out = dict(params)
        for k in self.head:
            t = params[k]
            idx = perm.view(*perm.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            out[k] = t.gather(1, idx)
        return out


# ----------------------------------------------------------------------------------------
# Stacked parameters <-> state dicts, flat vectors.
# ----------------------------------------------------------------------------------------
def stack(state_dicts: Iterable[Mapping[str, torch.Tensor]], names: list[str]) -> Params:
    sds = list(state_dicts)
    return {k: torch.stack([sd[k] for sd in sds]).float() for k in names}


def unstack(params: Params) -> list[dict[str, torch.Tensor]]:
    M = next(iter(params.values())).shape[0]
    return [{k: v[m] for k, v in params.items()} for m in range(M)]


def select(params: Params, index: torch.Tensor | slice) -> Params:
    return {k: v[index] for k, v in params.items()}


def flat(params: Params) -> torch.Tensor:
    """``[M, P]``: every model's parameters as one vector (in name order)."""
    return torch.cat([v.flatten(1) for v in params.values()], 1)


# ----------------------------------------------------------------------------------------
# Batched scoring and training.
# ----------------------------------------------------------------------------------------
def accuracy(
    family: ModelFamily, params: Params, data: Digits, tasks: list[tuple[int, ...]], split: str
) -> torch.Tensor:
    """Accuracy ``[M]`` of model m on task m's ``split``."""
    X, Y, W = stack_tasks(data, tasks, split, family.inputs)
    hits = []
    with torch.no_grad():
        for s in range(0, len(tasks), EVAL_MODELS):
            part = select(params, slice(s, s + EVAL_MODELS))
            hits.append(family.logits(part, X[s : s + EVAL_MODELS]).argmax(-1))
    hit = (torch.cat(hits) == Y).float()
    return (hit * W).sum(1) / W.sum(1)


def train(
    family: ModelFamily,
    data: Digits,
    tasks: list[tuple[int, ...]],
    params: Params,
    steps: int,
    generator: torch.Generator | None = None,
    record: bool = False,
) -> tuple[Params, list[torch.Tensor]]:
    """Fine-tune M models (all their parameters) on their tasks' train splits with Adam, all
    at once: full batch, or ``family.batch`` examples per model per step drawn from
    ``generator``. Weight decay applies to weights, not biases.

    Returns the trained parameters and, with ``record``, the test accuracy ``[M]`` after every
    step (index 0 = before training)."""
    X, Y, Wt = stack_tasks(data, tasks, "train", family.inputs)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=family.lr)
    count = Wt.sum(1, keepdim=True)

    def snapshot() -> torch.Tensor:
        return accuracy(family, {k: v.detach() for k, v in leaves.items()}, data, tasks, "test")

    curve = [snapshot()] if record else []
    for _ in range(steps):
        x, y, w = X, Y, Wt
        if family.batch:  # real examples fill the first count[m] slots of row m
            idx = (torch.rand(len(tasks), family.batch, generator=generator) * count).long()
            x = X.gather(1, idx[..., None].expand(-1, -1, X.shape[2]))
            y, w = Y.gather(1, idx), torch.ones_like(idx, dtype=X.dtype)
        logits = family.logits(leaves, x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(w)
        loss = ((ce * w).sum(1) / w.sum(1)).sum()
        decay = [v.square().sum() for k, v in leaves.items() if k.endswith("weight")]
        loss = loss + family.weight_decay * sum(decay)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record:
            curve.append(snapshot())
    return {k: v.detach() for k, v in leaves.items()}, curve


# ----------------------------------------------------------------------------------------
# The families.
# ----------------------------------------------------------------------------------------
class DigitMLP(nn.Sequential):
    """64 pixels -> 32 -> 32 -> ``ways`` (ReLU between)."""

    def __init__(self, ways: int = WAYS, hidden: int = 32) -> None:
        super().__init__(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, ways),
        )  # fmt: skip


class DigitCNN(nn.Sequential):
    """64 pixels as a 1x8x8 image -> conv 8 -> pool -> conv 16 -> pool -> ``ways``."""

    def __init__(self, ways: int = WAYS) -> None:
        super().__init__(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 2 * 2, ways),
        )  # fmt: skip


NETWORKS: dict[str, type[nn.Module]] = {"mlp": DigitMLP, "cnn": DigitCNN}
# Fine-tuning of a network zoo model: Adam on minibatches; lr chosen so that the body moves
# per task (relative change of the hidden layer well above 0.1) and the zoo is accurate.
NETWORK_TRAINING = dict(lr=1e-2, weight_decay=1e-4, batch=64)


def pretrain_body(
    factory: type[nn.Module], data: Digits, seed: int, steps: int = 300
) -> dict[str, torch.Tensor]:
    """A ``factory`` network trained on the train split of all ten digits (full batch, Adam);
    its parameters without the 10-way head."""
    torch.manual_seed(seed)
    net = factory(10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = data.pixels["train"], data.labels["train"]
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = net.state_dict()
    head = list(sd)[-2:]  # the last layer's weight and bias
    return {k: v.detach().clone() for k, v in sd.items() if k not in head}


def family(name: str, data: Digits, seed: int = 0, pretrain_steps: int = 300) -> ModelFamily:
    """The family ``name`` (one of :data:`MODELS`) for ``data``; a network's body is
    pretrained here (``pretrain_steps`` full-batch Adam steps)."""
    if name == "head":
        return ModelFamily("head", "features", ("weight", "bias"), lr=0.05, weight_decay=1e-3,
                           features=data.feature_dim)  # fmt: skip
    if name not in NETWORKS:
        raise ConfigError(f"the digits demo's model is one of {MODELS}, not {name!r}")
    factory = NETWORKS[name]
    head = tuple(list(factory().state_dict())[-2:])
    body = pretrain_body(factory, data, seed, pretrain_steps)
    return ModelFamily(name, "pixels", head, body=body, factory=factory, **NETWORK_TRAINING)


def permute_hidden(
    fam: ModelFamily, state_dict: Mapping[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The same MLP with its hidden units randomly permuted, layer by layer (rows of a layer
    and the matching columns of the next): an exact symmetry, every output is unchanged."""
    if fam.name != "mlp":
        raise ConfigError(f"hidden-unit permutations are implemented for the mlp, not {fam.name!r}")
    names = fam.names  # weight, bias of each Linear, in order
    out = dict(state_dict)
    for i in range(0, len(names) - 2, 2):
        w, b, w_next = names[i], names[i + 1], names[i + 2]
        perm = torch.randperm(out[w].shape[0], generator=generator)
        out[w], out[b], out[w_next] = out[w][perm], out[b][perm], out[w_next][:, perm]
    return out


def body_change(fam: ModelFamily, params: Params) -> dict[str, float]:
    """Per body tensor: the mean over models of ``|W - W_body| / |W_body|`` (how far
    fine-tuning moved the pretrained body); {} for heads."""
    out = {}
    for k, w0 in fam.body.items():
        diff = (params[k] - w0).flatten(1).norm(dim=1) / w0.norm()
        out[k] = float(diff.mean())
    return out
