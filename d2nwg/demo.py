"""`d2nwg demo`: tokenize a generated LLaMA-shaped model and back, and report throughput."""

from __future__ import annotations

import torch

from d2nwg.backends import select
from d2nwg.ops.tokenize import TOKENIZE_BACKENDS
from d2nwg.timing import median_ms
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.shapes import llama_state_dict, state_dict_bytes


def tokenizer_round_trip(hidden: int = 1024, layers: int = 8, intermediate: int = 4096,
                         vocab: int = 32000, chunk_size: int = 4096,
                         dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                         backend: str | None = None) -> int:
    """Fit, tokenize, detokenize in place, check the round trip bit for bit. Returns 0 if exact."""
    device = torch.device(device)
    shape = dict(hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab,
                 heads=max(1, hidden // 64), kv_heads=max(1, hidden // 256), dtype=dtype,
                 device=device)
    zoo = [llama_state_dict(**shape, seed=seed) for seed in range(2)]
    tok = WeightTokenizer.from_state_dict(zoo[0], chunk_size=chunk_size).fit(zoo)
    nbytes = state_dict_bytes(zoo[0])
    print(f"model: LLaMA-shaped, hidden {hidden}, {layers} layers, vocab {vocab}, {dtype}, "
          f"{tok.num_params / 1e6:.1f}M weights ({nbytes / 2**20:.0f} MiB) on {device}")
    print(f"tokenizer: {tok}")
    sources = [zoo[0][n] for n in tok.layer_names]
    used = select("tokenize", TOKENIZE_BACKENDS, sources[0], sources, tok.plan, backend=backend).name

    tokens = tok.tokenize(zoo[0], backend=backend)
    target = {k: torch.empty_like(v) for k, v in zoo[0].items()}
    tok.detokenize_into(target, tokens[0], backend=backend)
    exact = all(torch.equal(target[n], zoo[0][n]) for n in tok.layer_names)

    t_tok = median_ms(lambda: tok.tokenize(zoo[0], backend=backend), device, repeat=5)
    t_detok = median_ms(lambda: tok.detokenize_into(target, tokens[0], backend=backend), device, repeat=5)
    t_clone = median_ms(lambda: [t.clone() for t in sources], device, repeat=5)
    moved = nbytes + tokens.numel() * tokens.element_size()  # read weights + write tokens
    clone_moved = 2 * nbytes
    print(f"backend: {used}")
    print(f"{'step':12s} {'median ms':>10s} {'GB/s':>8s} {'weights/s':>11s} {'vs clone':>9s}")
    for name, ms, traffic in (("tokenize", t_tok, moved), ("detokenize", t_detok, moved),
                              ("clone", t_clone, clone_moved)):
        ratio = (traffic / ms) / (clone_moved / t_clone)
        print(f"{name:12s} {ms:10.2f} {traffic / ms / 1e6:8.2f} {tok.num_params / ms / 1e6:10.2f}G "
              f"{ratio:8.2f}x")
    print(f"round trip (normalized, {dtype}): {'bit-exact' if exact else 'NOT EXACT'}")
    return 0 if exact else 1
