"""Fused ops with torch / cpp / cuda / triton backends (see d2nwg.backends for dispatch)."""

from d2nwg.ops.latent_attention import latent_attention, latent_attention_ref
from d2nwg.ops.sampler_step import sampler_step, sampler_step_
from d2nwg.ops.tokenize import ChunkPlan, detokenize, tokenize

__all__ = [
    "ChunkPlan", "tokenize", "detokenize", "latent_attention", "latent_attention_ref",
    "sampler_step", "sampler_step_",
]
