"""Memorization baselines and where quality is lost: what a generator must beat to be more
than a lookup of its zoo, and how far its samples are from the zoo's models.

- ``retrieval``: the zoo model whose condition is nearest to the task's, by the generator's
  own condition encoder (its per-class tokens, matched class to class: the best of the 5!
  orders, and the retrieved model's class rows reordered to match);
- ``zoo_average``: the mean of the zoo's models (one model for every task);
- ``zoo_noised``: a zoo model of the task (the retrieved one where the task is not in the zoo)
  plus Gaussian noise as wide as the generated candidates' spread around their mean;
- distances: each candidate to its nearest zoo model, candidates to each other, and zoo models
  of one task (different seeds) to each other; a replica of the zoo sits far below the last;
- the VAE round trip: zoo models encoded and decoded by the generator's VAE, no diffusion.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from d2nwg.demo.families import ModelFamily, Params, flat, select, stack, unstack
from d2nwg.generator import D2NWG
from d2nwg.zoo import ModelZoo

EMBED_BATCH = 256  # conditions per encoder call


def embed(gen: D2NWG, conditions: torch.Tensor) -> torch.Tensor:
    """The condition encoder's tokens ``[N, K, E]`` of raw conditions ``[N, ...]`` (for a
    dataset condition one token per class, in label order)."""
    parts = [
        gen.encode_condition(conditions[s : s + EMBED_BATCH]).tokens.float().cpu()
        for s in range(0, conditions.shape[0], EMBED_BATCH)
    ]
    return torch.cat(parts)


@dataclass
class ZooMemory:
    """What a memorizer of the zoo knows: its models (without the copies under symmetries),
    their tasks and their conditions as the generator's encoder embeds them."""

    family: ModelFamily
    params: Params  # [Z, ...]
    tasks: list[tuple[int, ...]]
    tokens: torch.Tensor  # [Z, K, E]

    @classmethod
    def of(cls, gen: D2NWG, zoo: ModelZoo, family: ModelFamily) -> ZooMemory:
        items = [it for it in zoo if not {"rotation", "permutation"} & set(it.meta)]
        params = stack((it.state_dict for it in items), family.names)
        tokens = embed(gen, torch.stack([it.condition for it in items]))
        return cls(family, params, [tuple(it.meta["task"]) for it in items], tokens)

    def retrieve(self, tokens: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """For each query ``tokens [Q, K, E]``: the nearest zoo model under the best class
        matching, its class rows reordered to the query's order, and its index ``[Q]``.
        Conditions whose token count is not the number of classes are compared as they come
        (no reordering)."""
        ways = self.family.head_shape[0]
        d = torch.cdist(tokens[:, None], self.tokens[None]).square()  # [Q, Z, K, K]
        if tokens.shape[1] == ways:
            perms = torch.tensor(list(itertools.permutations(range(ways))))  # [P, ways]
        else:
            perms = torch.arange(tokens.shape[1])[None]
        rows = torch.arange(perms.shape[1])
        cost = d[:, :, rows[None], perms].sum(-1)  # [Q, Z, P]: sum_i d[q, z, i, perm[i]]
        best = cost.flatten(1).argmin(1)
        z, p = best // perms.shape[0], best % perms.shape[0]
        params = select(self.params, z)
        if perms.shape[1] == ways:
            params = self.family.permute_classes(params, perms[p])
        return params, z

    def average(self, num: int) -> Params:
        """The mean of the zoo's models, ``num`` copies."""
        return {
            k: v.mean(0, keepdim=True).expand(num, *v.shape[1:]) for k, v in self.params.items()
        }

    def same_task_distance(self) -> float | None:
        """Mean distance between zoo models of the same task (different seeds); None with one
        seed per task."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(self.tasks):
            groups.setdefault(t, []).append(i)
        vecs = flat(self.params)
        per = [pairwise_mean(vecs[idx]) for idx in groups.values() if len(idx) > 1]
        return float(torch.tensor(per).mean()) if per else None

    def nearest_distance(self, candidates: Params) -> torch.Tensor:
        """Distance ``[N]`` of each model to its nearest zoo model."""
        return torch.cdist(flat(candidates), flat(self.params)).min(1).values


def pairwise_mean(vectors: torch.Tensor) -> float:
    """Mean distance over the distinct pairs of ``vectors [n, P]`` (n >= 2)."""
    n = vectors.shape[0]
    d = torch.cdist(vectors, vectors)
    return float(d.sum() / (n * (n - 1)))


def spread(candidates: Params, per_task: int) -> Params:
    """Per task and tensor, the std of the candidates ``[T * K, ...]`` around their mean:
    ``[T, 1, ..., 1]`` (one number per task and tensor)."""
    out = {}
    for k, v in candidates.items():
        g = v.view(-1, per_task, *v.shape[1:])
        dev = (g - g.mean(1, keepdim=True)).flatten(1)
        out[k] = dev.pow(2).mean(1).sqrt().view(-1, *([1] * (v.dim() - 1)))
    return out


def noised(base: Params, std: Params, per_task: int, generator: torch.Generator) -> Params:
    """``per_task`` copies of each base model ``[T, ...]`` plus Gaussian noise of std
    ``std[k] [T, 1, ...]`` per tensor: ``[T * per_task, ...]`` (task-major)."""
    out = {}
    for k, v in base.items():
        rep = v.repeat_interleave(per_task, 0)
        noise = torch.randn(rep.shape, generator=generator)
        out[k] = rep + noise * std[k].repeat_interleave(per_task, 0)
    return out


@torch.no_grad()
def vae_roundtrip(gen: D2NWG, params: Params) -> Params:
    """The models encoded to latent means by the generator's VAE and decoded again (what the
    VAE alone loses; no diffusion)."""
    names = list(params)
    tokens = gen.tokenizer.tokenize(unstack(params)).to(next(gen.vae.parameters()).device)
    gen.vae.eval()
    decoded = gen.vae.decode(gen.vae.encode_mean(tokens)).float().cpu()
    return stack(gen.tokenizer.detokenize(decoded), names)
