"""torch.distributed as training and sharded generation use it: one context per process.

Collectives time out (``D2NWG_DIST_TIMEOUT`` seconds, default 600) instead of waiting forever
for a peer that died: under ``torchrun --max-restarts`` the agent then restarts the group,
and every rank resumes from the last whole checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from d2nwg.errors import ConfigError, D2NWGError, DirectoryLockedError
from d2nwg.files import DirectoryLock

TIMEOUT_ENV = "D2NWG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for every rank (``D2NWG_DIST_TIMEOUT``, seconds)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class DistContext:
    """This process's rank and the world size (1, 0 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group that ``torchrun`` describes (env:// rendezvous): gloo on CPU,
        NCCL on CUDA. Without ``WORLD_SIZE`` > 1 this is a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = collective_timeout()
        # Under torchrun's restarts the store outlives the workers: the keys of an earlier
        # attempt (a dead rank's address) must not be read by this one, so each attempt
        # rendezvouses under a prefix of its own.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"d2nwg/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (identity for one process)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def max(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        return int(max(int(v) for v in self.all_gather(torch.tensor([value]))))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: how ranks agree to stop together (one rank
        raising alone would leave the others waiting in their next collective)."""
        return bool(self.all_reduce_(torch.tensor([int(flag)])).item() > 0)


@contextlib.contextmanager
def writer_lock(ctx: DistContext, directory: str | os.PathLike) -> Iterator[None]:
    """Keep ``directory`` to one writing job: rank 0 holds its lock (see
    :class:`d2nwg.files.DirectoryLock`) while every rank of the job writes, and when rank 0
    cannot take it every rank raises, none is left waiting in a collective."""
    lock, error = DirectoryLock(directory), None
    if ctx.is_main:
        try:
            lock.acquire()
        except D2NWGError as exc:
            error = exc
    if ctx.any(error is not None):
        raise error or DirectoryLockedError(
            f"{os.fspath(directory)}: rank 0 of this job could not take the directory's lock"
        )
    try:
        yield
    finally:
        lock.release()
