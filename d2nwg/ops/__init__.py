"""Fused ops with torch / cpp / cuda / triton backends (see d2nwg.backends for dispatch).

One module per op family, named ``<op>_op`` so that the public functions re-exported here
(``d2nwg.ops.tokenize``, ...) never shadow a submodule of the same name.
"""

from d2nwg.ops.latent_attention_op import (
    LATENT_ATTENTION_BACKENDS,
    latent_attention,
    latent_attention_ref,
)
from d2nwg.ops.sampler_step_op import SAMPLER_STEP_BACKENDS, sampler_step, sampler_step_
from d2nwg.ops.tokenize_op import (
    DETOKENIZE_BACKENDS,
    TOKENIZE_BACKENDS,
    ChunkPlan,
    detokenize,
    tokenize,
)

# Each public op and its backends, in order of preference (`d2nwg info`).
BACKENDS = {
    "tokenize": TOKENIZE_BACKENDS,
    "detokenize": DETOKENIZE_BACKENDS,
    "sampler_step": SAMPLER_STEP_BACKENDS,
    "latent_attention": LATENT_ATTENTION_BACKENDS,
}

__all__ = [
    "ChunkPlan",
    "tokenize",
    "detokenize",
    "latent_attention",
    "latent_attention_ref",
    "sampler_step",
    "sampler_step_",
    "BACKENDS",
]
