"""Every public function's documented bad inputs raise the documented error class.

The rule (d2nwg.errors): a device mismatch is a DeviceError, a wrong shape or element count
a ShapeError, a wrong dtype (or a non-tensor where a tensor belongs) a DTypeError, a bad
option a ConfigError; all are D2NWGError. Each case changes one thing of a valid call.
"""

import pytest
import torch

import d2nwg
from d2nwg.errors import ConfigError, D2NWGError, DeviceError, DTypeError, ShapeError
from d2nwg.ops import ChunkPlan, detokenize, latent_attention, sampler_step, tokenize
from d2nwg.ops.sampler_step_op import K

META = torch.device("meta")  # "another device" on a machine without a GPU
SCHED = d2nwg.NoiseSchedule.linear(20)
PLAN = ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4)


def _model(x, t, cond):
    return torch.zeros_like(x)


def _step(**change):
    kw = dict(
        x=torch.zeros(2, 3),
        model_out=torch.zeros(2, 3),
        table=torch.zeros(4, K),
        step=torch.zeros(1, dtype=torch.long),
        noise=None,
        prev_x0=None,
        guided=False,
    )
    kw.update(change)
    return lambda: sampler_step(
        kw.pop("x"), kw.pop("model_out"), kw.pop("table"), kw.pop("step"), **kw
    )


def _sample(**change):
    kw = dict(model=_model, x_T=torch.zeros(2, 3), schedule=SCHED, steps=4)
    kw.update(change)
    return lambda: d2nwg.sample(kw.pop("model"), kw.pop("x_T"), kw.pop("schedule"), **kw)


def _tokenize(sources=None, **kw):
    sources = [torch.zeros(5), torch.zeros(3)] if sources is None else sources
    return lambda: tokenize(sources, kw.pop("plan", PLAN), **kw)


def _detokenize(tokens=None, dests=None):
    tokens = torch.zeros(1, 3, 4) if tokens is None else tokens
    dests = [torch.zeros(5), torch.zeros(3)] if dests is None else dests
    return lambda: detokenize(tokens, dests, PLAN)


def _attention(q=None, k=None, v=None, mask=None):
    def t():
        return torch.zeros(1, 2, 3, 8)

    return lambda: latent_attention(
        t() if q is None else q, t() if k is None else k, t() if v is None else v, mask
    )


CASES = {
    # the fused sampler step
    "step: table on another device": (_step(table=torch.zeros(4, K, device=META)), DeviceError),
    "step: noise on another device": (_step(noise=torch.zeros(2, 3, device=META)), DeviceError),
    "step: two step indices": (_step(step=torch.zeros(2, dtype=torch.long)), ShapeError),
    "step: float step index": (_step(step=torch.zeros(1)), DTypeError),
    "step: model_out rows": (_step(model_out=torch.zeros(3, 3)), ShapeError),
    "step: model_out dtype": (_step(model_out=torch.zeros(2, 3, dtype=torch.float64)), DTypeError),
    "step: table columns": (_step(table=torch.zeros(4, K - 1)), ShapeError),
    "step: x not a tensor": (_step(x=[[0.0]]), DTypeError),
    # sampling
    "sample: cond on another device": (
        _sample(cond=torch.zeros(2, 1, device=META), uncond=torch.zeros(1, 1), guidance_scale=2.0),
        DeviceError,
    ),
    "sample: uncond on another device": (
        _sample(cond=torch.zeros(2, 1), uncond=torch.zeros(1, 1, device=META), guidance_scale=2.0),
        DeviceError,
    ),
    "sample: cond batch": (
        _sample(cond=torch.zeros(3, 1), uncond=torch.zeros(1, 1), guidance_scale=2.0),
        ShapeError,
    ),
    "sample: uncond dtype": (
        _sample(
            cond=torch.zeros(2, 1),
            uncond=torch.zeros(1, 1, dtype=torch.float64),
            guidance_scale=2.0,
        ),
        DTypeError,
    ),
    "sample: integer x_T": (_sample(x_T=torch.zeros(2, 3, dtype=torch.long)), DTypeError),
    "sample: empty batch": (_sample(x_T=torch.zeros(0, 3)), ShapeError),
    "sample: unknown sampler": (_sample(sampler="euler"), ConfigError),
    "sample: unknown prediction type": (_sample(prediction_type="x0"), ConfigError),
    "sample: eta for ddpm": (_sample(sampler="ddpm", eta=0.5), ConfigError),
    "sample: steps > T": (_sample(steps=21), ConfigError),
    "sample: model changes shape": (_sample(model=lambda x, t, c: x[:, :2]), ShapeError),
    # tokenization
    "tokenize: source on another device": (
        _tokenize([torch.zeros(5), torch.zeros(3, device=META)]),
        DeviceError,
    ),
    "tokenize: element count": (_tokenize([torch.zeros(5), torch.zeros(4)]), ShapeError),
    "tokenize: integer source": (
        _tokenize([torch.zeros(5), torch.zeros(3, dtype=torch.long)]),
        DTypeError,
    ),
    "tokenize: not a plan": (_tokenize(plan=(5, 3)), ConfigError),
    "detokenize: tokens shape": (_detokenize(tokens=torch.zeros(1, 3, 5)), ShapeError),
    "detokenize: dest element count": (
        _detokenize(dests=[torch.zeros(5), torch.zeros(2)]),
        ShapeError,
    ),
    "detokenize: dest on another device": (
        _detokenize(dests=[torch.zeros(5), torch.zeros(3, device=META)]),
        DeviceError,
    ),
    "ChunkPlan: spans do not tile": (
        lambda: ChunkPlan((5, 3), (0, 9), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4),
        ConfigError,
    ),
    # attention
    "attention: k on another device": (
        _attention(k=torch.zeros(1, 2, 3, 8, device=META)),
        DeviceError,
    ),
    "attention: head dim": (_attention(v=torch.zeros(1, 2, 3, 7)), ShapeError),
    "attention: integer q": (_attention(q=torch.zeros(1, 2, 3, 8, dtype=torch.long)), DTypeError),
    # schedules
    "schedule: T = 0": (lambda: d2nwg.NoiseSchedule.linear(0), ConfigError),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_class(case):
    call, exc = CASES[case]
    with pytest.raises(D2NWGError) as info:
        call()
    assert type(info.value) is exc, f"{case}: {type(info.value).__name__}: {info.value}"
