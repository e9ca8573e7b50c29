"""Every registered op called directly through ``torch.ops.d2nwg.*`` with hostile offsets,
sizes, counts, shapes, dtypes and devices (issue 10).

The ops are reachable by anyone who imports d2nwg, bypassing the Python checks of
``d2nwg.ops``; each must reject what does not fit, without integer overflow, and never read
or write outside its tensors. The calls run in a subprocess so that a crash (a segfault from
an out-of-bounds access) fails the test instead of killing the test run. Each script prints
one line per case: ``ERR <case> <exception type>`` or ``OK <case>``. Cases named ``valid*``
must pass; ``any_*`` may pass or fail (a meta tensor dispatches to the op's fake kernel,
which touches no memory); every other case must raise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from d2nwg import _ext

I64_MAX = 2**63 - 1

needs_C = pytest.mark.skipif(_ext._C is None, reason="d2nwg._C is not built")

PRELUDE = """
import sys, torch, d2nwg
from d2nwg.errors import D2NWGError

def case(name, fn, *args):
    try:
        fn(*args)
    except (RuntimeError, D2NWGError) as exc:  # TORCH_CHECK raises RuntimeError subclasses
        print("ERR", name, type(exc).__name__, str(exc).splitlines()[0][:200], flush=True)
    else:
        print("OK", name, flush=True)
"""


def run_cases(body: str, timeout: float = 240) -> dict[str, str]:
    """Run the cases in a fresh interpreter; {case: 'OK' or the exception type}."""
    env = dict(os.environ, TRITON_INTERPRET="1", D2NWG_BACKEND="")
    script = PRELUDE + textwrap.dedent(body) + "\nprint('DONE', flush=True)\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines and lines[-1] == "DONE", (
        f"the subprocess died (rc {proc.returncode}) after these cases:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}"
    )
    results = {}
    for line in lines[:-1]:
        parts = line.split(" ", 3)
        results[parts[1]] = "OK" if parts[0] == "OK" else parts[2]
    return results


def assert_rejected(results: dict[str, str], controls: tuple[str, ...] = ("valid",)) -> None:
    for name, outcome in results.items():
        if name.startswith("any_"):  # either outcome, as long as nothing crashed
            continue
        if name.startswith(controls):
            assert outcome == "OK", f"{name}: the valid call failed with {outcome}"
        else:
            assert outcome != "OK", f"{name}: hostile input was accepted"


@needs_C
def test_compiled_detokenize_rejects_offsets_that_do_not_fit():
    results = run_cases(f"""
    op = torch.ops.d2nwg.detokenize_
    tok = torch.zeros(1, 64)
    case("valid", op, tok, [torch.empty(8)], [56], [0.0], [1.0])
    case("valid_empty_at_end", op, tok, [torch.empty(0)], [64], [0.0], [1.0])
    # issue 10: offset + numel wrapped in int64 and passed the bounds check
    case("wrap_segfault", op, tok, [torch.empty(2**26)], [2**63 - 2**26], [0.0], [1.0])
    case("wrap_silent_read", op, torch.zeros(1, 4096), [torch.empty(4096)], [2**63 - 4096],
         [0.0], [1.0])
    for off in (57, 64, 65, {I64_MAX}, -1, -8, -2**63, 2**62):
        case(f"offset_{{off}}", op, tok, [torch.empty(8)], [off], [0.0], [1.0])
    case("dest_larger_than_row", op, tok, [torch.empty(65)], [0], [0.0], [1.0])
    case("too_few_dests", op, tok, [], [0], [0.0], [1.0])
    case("too_many_dests", op, tok, [torch.empty(1), torch.empty(1)], [0], [0.0], [1.0])
    case("huge_N_no_dests", op, torch.zeros(2**62, 0), [], [0], [0.0], [1.0])
    case("no_segments", op, tok, [], [], [], [])
    case("mean_count", op, tok, [torch.empty(8)], [0], [], [1.0])
    case("tokens_1d", op, torch.zeros(64), [torch.empty(8)], [0], [0.0], [1.0])
    case("tokens_noncontig", op, torch.zeros(1, 128)[:, ::2], [torch.empty(8)], [0], [0.0], [1.0])
    tokens_int = torch.zeros(1, 64, dtype=torch.int32)
    case("tokens_int", op, tokens_int, [torch.empty(8)], [0], [0.0], [1.0])
    case("dest_int", op, tok, [torch.empty(8, dtype=torch.int64)], [0], [0.0], [1.0])
    case("dest_noncontig", op, tok, [torch.empty(4, 2).t()], [0], [0.0], [1.0])
    case("any_dest_meta", op, tok, [torch.empty(8, device="meta")], [0], [0.0], [1.0])
    """)
    assert_rejected(results)


@needs_C
def test_compiled_tokenize_rejects_spans_that_do_not_tile():
    results = run_cases(f"""
    op = torch.ops.d2nwg.tokenize_
    out = torch.zeros(1, 64)
    src = [torch.empty(8), torch.empty(8)]
    case("valid", op, out, src, [0, 32], [32, 32], [0.0, 0.0], [1.0, 1.0])
    case("span_max", op, out, src, [0, 64], [{I64_MAX}, {I64_MAX}], [0.0] * 2, [1.0] * 2)
    case("span_wrap", op, out, src, [0, {I64_MAX}], [{I64_MAX}, 66], [0.0] * 2, [1.0] * 2)
    case("span_negative", op, out, src, [0, 96], [96, -32], [0.0] * 2, [1.0] * 2)
    case("offset_negative", op, out, src, [-32, 0], [32, 64], [0.0] * 2, [1.0] * 2)
    case("overlap", op, out, src, [0, 0], [64, 64], [0.0] * 2, [1.0] * 2)
    case("gap", op, out, src, [0, 40], [32, 24], [0.0] * 2, [1.0] * 2)
    case("short", op, out, src, [0, 32], [32, 16], [0.0] * 2, [1.0] * 2)
    case("source_over_span", op, out, [torch.empty(40), torch.empty(8)], [0, 32], [32, 32],
         [0.0] * 2, [1.0] * 2)
    case("source_count", op, out, src[:1], [0, 32], [32, 32], [0.0] * 2, [1.0] * 2)
    case("huge_N_no_sources", op, torch.zeros(2**62, 0), [], [0], [0], [0.0], [1.0])
    case("spans_count", op, out, src, [0, 32], [64], [0.0] * 2, [1.0] * 2)
    case("out_int", op, torch.zeros(1, 64, dtype=torch.int64), src, [0, 32], [32, 32],
         [0.0] * 2, [1.0] * 2)
    noncontig = torch.zeros(1, 128)[:, ::2]
    case("out_noncontig", op, noncontig, src, [0, 32], [32, 32], [0.0] * 2, [1.0] * 2)
    case("any_source_meta", op, out, [torch.empty(8, device="meta"), torch.empty(8)], [0, 32],
         [32, 32], [0.0] * 2, [1.0] * 2)
    case("source_bool", op, out, [torch.empty(8, dtype=torch.bool), torch.empty(8)], [0, 32],
         [32, 32], [0.0] * 2, [1.0] * 2)
    """)
    assert_rejected(results)


@needs_C
def test_compiled_sampler_step_rejects_bad_shapes_and_clamps_steps():
    results = run_cases("""
    op = torch.ops.d2nwg.sampler_step_
    x, out, tab = torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(3, 11)
    step = torch.zeros(1, dtype=torch.long)
    case("valid", op, x, out, tab, step, None, None, False)
    case("valid_guided", op, x, torch.zeros(4, 5), tab, step, None, None, True)
    for s in (2**63 - 1, -2**63, 3, -1):  # out of range: every kernel clamps, never reads past
        case(f"valid_step_{s}", op, x, out, tab, torch.tensor([s]), None, None, False)
    case("guided_half_rows", op, x, out, tab, step, None, None, True)
    case("guided_odd_rows", op, x, torch.zeros(5, 5), tab, step, None, None, True)
    case("huge_B_guided", op, torch.zeros(2**62, 0), torch.zeros(0, 0), tab, step, None, None, True)
    case("rows", op, x, torch.zeros(1, 5), tab, step, None, None, False)
    case("cols", op, x, torch.zeros(2, 4), tab, step, None, None, False)
    case("x_1d", op, torch.zeros(10), torch.zeros(10), tab, step, None, None, False)
    case("x_noncontig", op, torch.zeros(5, 2).t(), out, tab, step, None, None, False)
    case("table_0d", op, x, out, torch.tensor(1.0), step, None, None, False)
    case("table_empty", op, x, out, torch.zeros(0, 11), step, None, None, False)
    case("table_cols", op, x, out, torch.zeros(3, 10), step, None, None, False)
    case("table_batch", op, x, out, torch.zeros(3, 3, 11), step, None, None, False)
    case("table_noncontig", op, x, out, torch.zeros(11, 3).t(), step, None, None, False)
    case("table_half", op, x, out, torch.zeros(3, 11, dtype=torch.half), step, None, None, False)
    case("step_int32", op, x, out, tab, torch.zeros(1, dtype=torch.int32), None, None, False)
    case("step_two", op, x, out, tab, torch.zeros(2, dtype=torch.long), None, None, False)
    case("step_empty", op, x, out, tab, torch.zeros(0, dtype=torch.long), None, None, False)
    case("noise_shape", op, x, out, tab, step, torch.zeros(2, 4), None, False)
    case("noise_dtype", op, x, out, tab, step, torch.zeros(2, 5, dtype=torch.double), None, False)
    case("prev_shape", op, x, out, tab, step, None, torch.zeros(1, 5), False)
    case("valid_prev2", op, x, out, tab, step, None, torch.zeros(2, 5), False, torch.zeros(2, 5))
    case("prev2_alone", op, x, out, tab, step, None, None, False, torch.zeros(2, 5))
    case("prev2_shape", op, x, out, tab, step, None, torch.zeros(2, 5), False, torch.zeros(1, 5))
    case("prev2_dtype", op, x, out, tab, step, None, torch.zeros(2, 5), False,
         torch.zeros(2, 5, dtype=torch.double))
    case("prev2_noncontig", op, x, out, tab, step, None, torch.zeros(2, 5), False,
         torch.zeros(5, 2).t())
    p = torch.zeros(2, 5)
    case("prev2_is_prev", op, x, out, tab, step, None, p, False, p)
    case("out_dtype", op, x, torch.zeros(2, 5, dtype=torch.half), tab, step, None, None, False)
    case("x_int", op, torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32),
         tab, step, None, None, False)
    case("any_table_meta", op, x, out, torch.zeros(3, 11, device="meta"), step, None, None, False)
    """)
    assert_rejected(results)


def test_triton_ops_check_every_launch():
    """The Triton launchers as registered custom ops: sizes must match the plan exactly (a
    smaller tensor would be read or written past its end), shapes and devices must agree."""
    results = run_cases("""
    tok, detok = torch.ops.d2nwg.tokenize_triton_, torch.ops.d2nwg.detokenize_triton_
    plan = ([8, 5], [0, 8], [8, 8], [0.0, 0.0], [1.0, 1.0], 4, 4)
    rows = torch.zeros(1, 16)
    src = [torch.randn(8), torch.randn(5)]
    case("valid_tokenize", tok, rows, src, *plan)
    case("valid_detokenize", detok, rows, [torch.empty(8), torch.empty(5)], *plan)
    case("tok_source_short", tok, rows, [torch.randn(8), torch.randn(2)], *plan)
    case("detok_dest_short", detok, rows, [torch.empty(8), torch.empty(2)], *plan)
    case("detok_dest_long", detok, rows, [torch.empty(8), torch.empty(9)], *plan)
    case("tok_rows_short", tok, torch.zeros(1, 8), src, *plan)
    case("detok_rows_short", detok, torch.zeros(1, 8), [torch.empty(8), torch.empty(5)], *plan)
    case("tok_count", tok, rows, src[:1], *plan)
    case("detok_count", detok, torch.zeros(2, 16), [torch.empty(8), torch.empty(5)], *plan)
    case("tok_int_source", tok, rows, [torch.zeros(8, dtype=torch.int64), src[1]], *plan)
    case("tok_rows_int", tok, torch.zeros(1, 16, dtype=torch.int32), src, *plan)
    case("any_tok_meta", tok, rows, [torch.empty(8, device="meta"), src[1]], *plan)
    case("plan_offset_wrap", tok, rows, src, [8, 5], [0, 2**63 - 1], [8, 8], [0.0] * 2,
         [1.0] * 2, 4, 4)
    case("plan_negative", tok, rows, src, [8, 5], [0, 8], [8, -8], [0.0] * 2, [1.0] * 2, 4, 4)
    case("plan_overlap", tok, rows, src, [8, 5], [0, 0], [16, 16], [0.0] * 2, [1.0] * 2, 4, 4)
    case("plan_zero_std", tok, rows, src, [8, 5], [0, 8], [8, 8], [0.0] * 2, [1.0, 0.0], 4, 4)
    case("plan_nan_mean", tok, rows, src, [8, 5], [0, 8], [8, 8], [float("nan"), 0.0],
         [1.0] * 2, 4, 4)

    st = torch.ops.d2nwg.sampler_step_triton_
    x, out, tab = torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(3, 11)
    step = torch.zeros(1, dtype=torch.long)
    case("valid_step", st, x, out, tab, step, None, None, False)
    case("valid_step_clamped", st, x, out, tab, torch.tensor([2**63 - 1]), None, None, False)
    case("step_guided_rows", st, x, out, tab, step, None, None, True)
    case("step_rows", st, x, torch.zeros(1, 5), tab, step, None, None, False)
    case("step_table_batch", st, x, out, torch.zeros(3, 1, 11), step, None, None, False)
    case("step_table_noncontig", st, x, out, torch.zeros(11, 3).t(), step, None, None, False)
    case("step_noise", st, x, out, tab, step, torch.zeros(1, 5), None, False)
    case("step_prev_noncontig", st, x, out, tab, step, None, torch.zeros(5, 2).t(), False)
    case("valid_step_prev2", st, x, out, tab, step, None, torch.zeros(2, 5), False,
         torch.zeros(2, 5))
    case("step_prev2_alone", st, x, out, tab, step, None, None, False, torch.zeros(2, 5))
    case("step_prev2_short", st, x, out, tab, step, None, torch.zeros(2, 5), False,
         torch.zeros(1, 5))
    case("step_prev2_noncontig", st, x, out, tab, step, None, torch.zeros(2, 5), False,
         torch.zeros(5, 2).t())
    case("step_empty", st, x, out, tab, torch.zeros(0, dtype=torch.long), None, None, False)

    fwd = torch.ops.d2nwg.attention_fwd_triton
    q = torch.randn(1, 2, 5, 16)
    case("valid_attention", fwd, q, q, q, None, 0.25)
    case("valid_attention_mask", fwd, q, q, q, torch.ones(1, 5, dtype=torch.bool), 0.25)
    case("attn_k_heads", fwd, q, torch.randn(1, 1, 5, 16), q, None, 0.25)
    case("attn_k_batch", fwd, q, torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16), None, 0.25)
    case("attn_v_keys", fwd, q, q, torch.randn(1, 2, 4, 16), None, 0.25)
    case("attn_mask_short", fwd, q, q, q, torch.ones(1, 3, dtype=torch.bool), 0.25)
    case("attn_mask_float", fwd, q, q, q, torch.ones(1, 5), 0.25)
    case("attn_head_dim", fwd, torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 12),
         torch.randn(1, 2, 5, 12), None, 0.25)
    case("attn_3d", fwd, q[0], q[0], q[0], None, 0.25)
    case("attn_f64", fwd, q.double(), q.double(), q.double(), None, 0.25)
    case("attn_scale_nan", fwd, q, q, q, None, float("nan"))
    bwd = torch.ops.d2nwg.attention_bwd_triton
    lse = torch.zeros(1, 2, 5)
    case("valid_attention_bwd", bwd, q, q, q, q, q, lse, None, 0.25)
    case("attn_bwd_lse_short", bwd, q, q, q, q, q, torch.zeros(1, 2, 4), None, 0.25)
    case("attn_bwd_do_shape", bwd, torch.randn(1, 2, 4, 16), q, q, q, q, lse, None, 0.25)
    case("attn_bwd_o_dtype", bwd, q, q, q, q, q.half(), lse, None, 0.25)
    """)
    assert_rejected(results, controls=("valid",))
