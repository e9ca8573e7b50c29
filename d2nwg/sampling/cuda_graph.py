"""CUDA graphs of the sampling loop (``sample(..., cuda_graph=True)``).

One captured loop per (model, shapes, flags), model calls included, replayed with fresh
inputs copied into its static buffers (x_T, the condition, every step's noise drawn up front
in the eager loop's order). The first call warms up eagerly on a side stream and returns that
answer; a capture that fails falls back to the eager loop, with one warning, for good.
Entries die with the model; a model whose parameters moved since the capture is captured
again.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any

import torch

from d2nwg.errors import warn_at_caller
from d2nwg.sampling.loop import Plan, run_eager, run_steps

# CUDA graphs: one captured loop per (model, shapes, flags), replayed with fresh inputs copied
# into its static buffers. Entries die with the model.
GRAPHS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
MAX_GRAPHS_PER_MODEL = 8


class Captured:
    def __init__(self, plan: Plan, x: torch.Tensor, cond_in: Any) -> None:
        self.x_T = x.clone()  # static inputs
        self.x = torch.empty_like(x)  # the state, in place
        self.cond = cond_in.clone() if isinstance(cond_in, torch.Tensor) else cond_in
        self.table = plan.table.clone()
        self.t_table = plan.t_table.clone()
        self.step_idx = plan.step_idx.clone()  # owned: the graph reads it
        n_noise = sum(plan.noise_steps)
        self.noise = torch.empty((n_noise,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        self.prev = torch.zeros_like(x) if plan.use_prev else None
        self.prev2 = torch.zeros_like(x) if plan.use_prev2 else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state: tuple = ()  # _state_signature at capture

    def plan_view(self, plan: Plan) -> Plan:
        return Plan(
            **{
                **plan.__dict__,
                "table": self.table,
                "t_table": self.t_table,
                "step_idx": self.step_idx,
            }
        )

    def body(self, plan: Plan) -> None:
        self.x.copy_(self.x_T)
        for history in (self.prev, self.prev2):
            if history is not None:
                history.zero_()
        slot = {k: i for i, k in enumerate(k for k in range(plan.S) if plan.noise_steps[k])}
        run_steps(
            self.plan_view(plan),
            self.x,
            self.prev,
            self.prev2,
            self.cond,
            lambda k: self.noise[slot[k]] if k in slot else None,
        )

    def load(self, plan: Plan, x: torch.Tensor, cond_in: Any) -> None:
        self.x_T.copy_(x)
        if isinstance(self.cond, torch.Tensor):
            self.cond.copy_(cond_in)
        self.table.copy_(plan.table)
        self.t_table.copy_(plan.t_table)
        for i in range(self.noise.shape[0]):  # same draws, same order as the eager loop
            self.noise[i].copy_(plan.draw())


def _graph_key(plan: Plan, x: torch.Tensor, cond_in: Any) -> tuple:
    cond_sig = (
        (tuple(cond_in.shape), cond_in.dtype)
        if isinstance(cond_in, torch.Tensor)
        else ("object", id(cond_in))
    )
    return (
        tuple(plan.shape),
        x.dtype,
        x.device,
        plan.guided,
        plan.noise_steps,
        plan.use_prev,
        plan.use_prev2,
        plan.table.dtype,
        plan.run,
        cond_sig,
        _autocast_state(),
    )


def _autocast_state() -> tuple:
    """CUDA autocast as the capture sees it: a graph captured under autocast runs the model in
    its lower precision, one captured without does not."""
    if torch.is_autocast_enabled("cuda"):
        return ("autocast", torch.get_autocast_dtype("cuda"))
    return ()


def _no_autocast_cache():
    """Autocast without its weight cache (PyTorch's rule for capture): cached casts made
    during the warm-up would be freed when the caller's autocast region ends, and the graph
    would replay reading them."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _state_signature(model: Any) -> tuple:
    """Where an ``nn.Module`` model's parameters and buffers live: a captured graph reads them
    at these addresses, so ``model.to(...)`` or ``p.data = ...`` after capture needs a new
    capture. (A plain callable that closes over a module cannot be checked.)"""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple(
        (t.data_ptr(), t.dtype, tuple(t.shape))
        for t in itertools.chain(model.parameters(), model.buffers())
    )


def run_with_graph(plan: Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    with torch.cuda.device(x.device):  # capture, pool and replay on x's device
        return _run_on_device(plan, x, cond_in)


def _run_on_device(plan: Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    try:
        per_model = GRAPHS.setdefault(plan.model, {})
    except TypeError:  # not weak-referenceable: capture for this call only
        per_model = {}
    key = _graph_key(plan, x, cond_in)
    entry = per_model.get(key)
    if isinstance(entry, Captured) and entry.state != _state_signature(plan.model):
        del per_model[key]  # parameters or buffers were reallocated since the capture
        entry = None
    if entry == "eager":
        return run_eager(plan, x, cond_in)
    if entry is not None:
        entry.load(plan, x, cond_in)
        entry.graph.replay()
        return entry.x.clone()

    noise_bytes = sum(plan.noise_steps) * x.numel() * x.element_size()
    free = torch.cuda.mem_get_info(x.device)[0]
    if noise_bytes > free // 4:
        warn_at_caller(
            f"cuda_graph=True: the {sum(plan.noise_steps)} steps' noise "
            f"({noise_bytes / 2**30:.2f} GiB) would not fit beside the graph; "
            "running eagerly"
        )
        per_model[key] = "eager"
        return run_eager(plan, x, cond_in)
    cap = Captured(plan, x, cond_in)
    cap.load(plan, x, cond_in)
    # Warm-up on a side stream (lazy initialization, cuBLAS workspaces): an eager run whose
    # result is this call's answer. Then capture the whole loop, model calls included, on that
    # same stream: it is on x's device (torch.cuda.graph's own default stream is created once,
    # on whichever device was current then).
    main = torch.cuda.current_stream(x.device)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side), _no_autocast_cache():
        cap.body(plan)
    main.wait_stream(side)
    result = cap.x.clone()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side), _no_autocast_cache():
            cap.body(plan)
    except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why, once
        # When capture_end raises (an invalidated capture: a host sync, .item(), ...),
        # torch.cuda.graph.__exit__ skips restoring the stream: the capture stream would stay
        # current for everything the caller does next.
        torch.cuda.set_stream(main)
        try:
            torch.cuda.synchronize(x.device)
        except RuntimeError:
            pass
        warn_at_caller(
            f"cuda_graph=True: could not capture the sampling loop "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "running eagerly"
        )
        per_model[key] = "eager"
        return result
    cap.graph, cap.state = graph, _state_signature(plan.model)  # as the graph reads them
    if len(per_model) >= MAX_GRAPHS_PER_MODEL:
        per_model.pop(next(iter(per_model)))
    per_model[key] = cap
    return result
