"""The layout planner on its own: layers, placement and chunk plans from shapes alone.

Every expected value below is worked out by hand in the comments; no op is run, and the
templates are meta tensors, which hold no data to read.
"""

import random

import pytest
import torch

import d2nwg
import d2nwg.tokenizer
from d2nwg.errors import ConfigError, D2NWGError, DTypeError, ShapeError
from d2nwg.tokenizer import LayerSpec, LayoutPlan, RangePart
from d2nwg.tokenizer.layers import check_ignored, select_layers

C = 4


def meta_template() -> dict[str, torch.Tensor]:
    """a.weight 15, a.bias 1, z.bias 0 (empty), b.weight 6 tied to c.weight, plus what the
    default selection ignores: a BatchNorm running mean and an integer tensor."""
    with torch.device("meta"):
        shared = torch.empty(2, 3)
        return {
            "a.weight": torch.empty(3, 5),
            "a.bias": torch.empty(1),
            "n.running_mean": torch.empty(4),
            "z.bias": torch.empty(0),
            "b.weight": shared,
            "steps": torch.empty(2, dtype=torch.int64),
            "c.weight": shared,
        }


def meta_plan(granularity: str) -> LayoutPlan:
    layers, _ = select_layers(meta_template())
    return LayoutPlan(tuple(layers), C, granularity)


def tokens_per_layer(plan: LayoutPlan) -> list[int]:
    return [int((plan.positions[:, 0] == s).sum()) for s in range(len(plan.layers))]


# ---------------------------------------------------------------------------- selection
def test_selection_of_a_meta_template():
    layers, ignored = select_layers(meta_template())
    assert [s.name for s in layers] == ["a.weight", "a.bias", "z.bias", "b.weight"]
    assert [s.shape for s in layers] == [(3, 5), (1,), (0,), (2, 3)]
    assert [s.aliases for s in layers] == [(), (), (), ("c.weight",)]
    assert [s.kind for s in layers] == ["2d.weight", "1d.bias", "1d.bias", "2d.weight"]
    assert {s.dtype for s in layers} == {"float32"}
    assert ignored == ["n.running_mean", "steps"]


def test_include_exclude_globs():
    layers, ignored = select_layers(meta_template(), include=["*.weight"], exclude=["b.*"])
    # c.weight is selected, b.weight (the storage it shares) is not: c.weight is its own layer.
    assert [(s.name, s.aliases) for s in layers] == [("a.weight", ()), ("c.weight", ())]
    assert ignored == ["a.bias", "n.running_mean", "z.bias", "b.weight", "steps"]
    layers, _ = select_layers(meta_template(), exclude=[])  # running statistics too
    assert [s.name for s in layers][:3] == ["a.weight", "a.bias", "n.running_mean"]
    with pytest.raises(DTypeError, match="'steps'.*int64"):  # asked for by name
        select_layers(meta_template(), include=["steps"])
    with pytest.raises(ConfigError, match="no floating tensor.*nothing"):
        select_layers(meta_template(), include=["nothing"])


# ---------------------------------------------------------------------------- placement
def test_layer_granularity_by_hand():
    plan = meta_plan("layer")
    # a.weight: 15 -> 4 tokens (16 elements); a.bias: 1 -> 1 token; z.bias: 0 -> none;
    # b.weight: 6 -> 2 tokens (8 elements). T = 4 + 1 + 0 + 2 = 7.
    assert plan.numel == (15, 1, 0, 6)
    assert plan.spans == (16, 4, 0, 8)
    assert plan.offsets == (0, 16, 20, 20)
    assert plan.num_tokens == 7 and plan.num_params == 22
    assert plan.token_runs == [(0, 4), (4, 5), (5, 7)]  # the empty layer owns no run
    assert [plan.token_range([s]) for s in (0, 1, 3)] == [(0, 4), (4, 5), (5, 7)]
    assert plan.token_range([1, 3]) == (4, 7)
    expected = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (3, 0), (3, 1)]
    assert plan.positions.tolist() == [list(p) for p in expected]
    assert plan.mask.sum(1).tolist() == [4, 4, 4, 3, 1, 4, 2]
    assert plan.mask[3].tolist() == [True, True, True, False]
    assert plan.kind_names == ("1d.bias", "2d.weight")
    assert plan.kinds.tolist() == [1, 1, 1, 1, 0, 1, 1]
    assert tokens_per_layer(plan) == [4, 1, 0, 2]


def test_model_granularity_by_hand():
    plan = meta_plan("model")
    # 22 elements back to back, padded once: T = ceil(22 / 4) = 6, the last layer owns the
    # 2 padding elements. Token 3 (elements 12..15) holds a.weight 12..14 and a.bias.
    assert plan.spans == (15, 1, 0, 8)
    assert plan.offsets == (0, 15, 16, 16)
    assert plan.num_tokens == 6
    assert plan.token_runs == [(0, 6)]
    assert plan.token_range([1]) == (3, 4) and plan.token_range([3]) == (4, 6)
    # A token belongs to the layer of its first element; chunks count within the model.
    expected = [(0, 0), (0, 1), (0, 2), (0, 3), (3, 4), (3, 5)]
    assert plan.positions.tolist() == [list(p) for p in expected]
    assert plan.mask.sum(1).tolist() == [4, 4, 4, 4, 4, 2]
    assert plan.kinds.tolist() == [1] * 6


def test_chunk_plan_carries_the_placement_and_normalization():
    plan = meta_plan("layer")
    chunk = plan.chunk_plan([0.0, 1.5, 0.0, -2.0], [1.0, 0.5, 1.0, 4.0])
    assert (chunk.numel, chunk.offset, chunk.span) == (plan.numel, plan.offsets, plan.spans)
    assert (chunk.num_tokens, chunk.chunk_size) == (7, C)
    assert chunk.shift == (0.0, 1.5, 0.0, -2.0) and chunk.rscale == (1.0, 2.0, 1.0, 0.25)


def test_range_plan_by_hand():
    plan = meta_plan("layer")
    shift, scale = (0.0, 1.0, 0.0, 3.0), (1.0, 2.0, 1.0, 0.5)
    # Tokens 3..6 are row elements 12..24: a.weight 12..15 (its elements 12..14), a.bias
    # 16..17, b.weight 20..24 (its elements 0..3); each segment spans up to the next.
    chunk, parts = plan.range_plan(3, 3, {0, 1, 2, 3}, shift, scale)
    assert parts == (RangePart(0, 12, 3), RangePart(1, 0, 1), RangePart(3, 0, 4))
    assert (chunk.numel, chunk.offset, chunk.span) == ((3, 1, 4), (0, 4, 8), (4, 4, 4))
    assert (chunk.shift, chunk.scale) == ((0.0, 1.0, 3.0), (1.0, 2.0, 0.5))
    assert (chunk.num_tokens, chunk.chunk_size) == (3, C)
    # Without a.weight the range starts in what is padding to it: a leading empty segment.
    chunk, parts = plan.range_plan(3, 3, {1, 3}, shift, scale)
    assert parts == (RangePart(-1, 0, 0), RangePart(1, 0, 1), RangePart(3, 0, 4))
    assert (chunk.numel, chunk.offset, chunk.span) == ((0, 1, 4), (0, 4, 8), (4, 4, 4))
    assert (chunk.shift, chunk.scale) == ((0.0, 1.0, 3.0), (1.0, 2.0, 0.5))
    # The last token alone: b.weight elements 4..5 of the row's 24..28.
    chunk, parts = plan.range_plan(6, 1, {3}, shift, scale)
    assert parts == (RangePart(3, 4, 2),) and chunk.span == (4,)
    assert plan.range_plan(0, 4, {1, 3}, shift, scale) is None  # only a.weight's tokens
    assert plan.range_plan(7, 0, {0, 1, 3}, shift, scale) is None
    with pytest.raises(ShapeError, match="do not lie"):
        plan.range_plan(5, 3, {0}, shift, scale)
    with pytest.raises(ShapeError, match="do not lie"):
        plan.range_plan(-1, 1, {0}, shift, scale)


def reference_positions(numel, chunk_size, granularity):
    """(layer, chunk) of each token and its real element count, element by element."""
    owner = []  # the layer of every row element, None for padding
    for s, n in enumerate(numel):
        owner += [s] * n
        if granularity == "layer":
            owner += [None] * (-n % chunk_size)
    if granularity == "model":
        owner += [None] * (-len(owner) % chunk_size)
    rows = [owner[i : i + chunk_size] for i in range(0, len(owner), chunk_size)]
    positions, last = [], None
    for t, row in enumerate(rows):
        layer = row[0] if row[0] is not None else last
        chunk = t if granularity == "model" else sum(1 for p in positions if p[0] == layer)
        positions.append((layer, chunk))
        last = layer
    return positions, [sum(e is not None for e in row) for row in rows]


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("seed", range(6))
def test_placement_matches_an_element_by_element_reference(granularity, seed):
    rng = random.Random(seed)
    chunk_size = rng.choice([1, 3, 4, 7, 16])
    shapes = [tuple(rng.choice([1, 2, 3, 5, 9]) for _ in range(rng.randint(1, 3)))]
    shapes += [(rng.randint(1, 40),) for _ in range(rng.randint(0, 5))]
    rng.shuffle(shapes)
    layers = tuple(LayerSpec(f"l{i}", s, "float32", kind=str(len(s))) for i, s in enumerate(shapes))
    plan = LayoutPlan(layers, chunk_size, granularity)
    positions, counts = reference_positions([s.numel for s in layers], chunk_size, granularity)
    assert plan.num_tokens == len(positions)
    assert [tuple(p) for p in plan.positions.tolist()] == positions
    assert plan.mask.sum(1).tolist() == counts
    kinds = [plan.kind_names.index(layers[layer].kind) for layer, _ in positions]
    assert plan.kinds.tolist() == kinds


# ---------------------------------------------------------------------------- no data read
def test_a_tokenizer_of_a_meta_template_plans_without_data():
    tok = d2nwg.WeightTokenizer.from_state_dict(meta_template(), chunk_size=C)
    assert tok.layout_plan == meta_plan("layer")
    assert (tok.num_tokens, tok.num_params, tok.layer_names[-1]) == (7, 22, "b.weight")
    assert tok.plan.offset == (0, 16, 20, 20) and tok.plan.scale == (1.0,) * 4
    assert tok.positions.device.type == "cpu" and tok.mask.shape == (7, C)
    assert tok.plan is tok.plan, "the ChunkPlan is built once"
    with pytest.raises(d2nwg.DeviceError, match="meta"):  # executing it needs weights
        tok.tokenize(meta_template())


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "layers, chunk_size, granularity, error, match",
    [
        ([LayerSpec("w", (3,), "float32")], 0, "layer", ConfigError, "chunk_size"),
        ([LayerSpec("w", (3,), "float32")], True, "layer", ConfigError, "chunk_size"),
        ([LayerSpec("w", (3,), "float32")], 4, "tensor", ConfigError, "granularity"),
        ([], 4, "layer", ConfigError, "no tensor selected"),
        ("w", 4, "layer", ConfigError, "sequence of LayerSpec"),
        ([("w", (3,), "float32")], 4, "layer", ConfigError, r"layers\[0\] is a tuple"),
        ([LayerSpec("w", (3, -1), "float32")], 4, "layer", ConfigError, r"'w'.*\(3, -1\)"),
        ([LayerSpec("w", [3], "float32")], 4, "layer", ConfigError, r"'w'.*shape"),
        ([LayerSpec("w", (3,), "int64")], 4, "layer", ConfigError, "'w'.*'int64'"),
        ([LayerSpec("w", (2**20, 2**20), "float32")], 4, "layer", ConfigError, "MAX_NUM_PARAMS"),
        ([LayerSpec("w", (2**25,), "float32")], 1, "layer", ConfigError, "MAX_NUM_TOKENS"),
        (
            [LayerSpec("w", (3,), "float32", ("v",)), LayerSpec("v", (3,), "float32")],
            4, "layer", ConfigError, "'v' appears twice",
        ),
    ],
)  # fmt: skip
def test_bad_layouts_are_refused_by_name(layers, chunk_size, granularity, error, match):
    with pytest.raises(error, match=match) as info:
        LayoutPlan(layers, chunk_size, granularity)
    assert isinstance(info.value, D2NWGError)


def test_ignored_names_must_not_be_tokenized_names():
    layers = (LayerSpec("w", (3,), "float32", ("v",)),)
    assert check_ignored(layers, ["x"]) == frozenset({"x"})
    with pytest.raises(ConfigError, match="'v' is both tokenized and ignored"):
        check_ignored(layers, ["v"])
    with pytest.raises(ConfigError, match="collection of names"):
        check_ignored(layers, "x")


def test_the_planner_reads_the_limits_raised_through_the_package():
    layers = (LayerSpec("w", (100,), "float32"),)
    assert LayoutPlan(layers, 1).num_tokens == 100
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(d2nwg.tokenizer, "MAX_NUM_TOKENS", 99)
        assert d2nwg.tokenizer.limits.MAX_NUM_TOKENS == 99
        with pytest.raises(ConfigError, match="MAX_NUM_TOKENS = 99"):
            LayoutPlan(layers, 1)
        mp.setattr(d2nwg.tokenizer, "MAX_CHUNK_SIZE", 2**22)
        assert LayoutPlan(layers, 2**21).num_tokens == 1  # above the default limit of 2**20
    # undone where they live, not left shadowed in the package
    assert (d2nwg.tokenizer.limits.MAX_NUM_TOKENS, d2nwg.tokenizer.MAX_NUM_TOKENS) == (2**24,) * 2
    assert d2nwg.tokenizer.limits.MAX_CHUNK_SIZE == 2**20
    with pytest.raises(ConfigError, match="chunk_size"):
        LayoutPlan(layers, 2**21)
