"""ModelZoo: building, access, views, shards, files (round trips, laziness, bad input)."""

import json
import os

import pytest
import torch

import d2nwg
from d2nwg import ModelZoo, ZooItem
from d2nwg import zoo as zoo_module
from d2nwg.files import read_json, save_json, save_safetensors

COND_SHAPES = {
    "dataset": [(3, 2, 5), (4, 1, 5), (2, 3, 5)],
    "text": [(7, 6), (2, 6), (5, 6)],
    None: [None, None, None],
}


def make_sd(gen, tied=True):
    """Mixed dtypes, a -0.0, an int buffer, a scalar, an empty tensor and a tied pair."""
    emb = torch.randn(6, 4, generator=gen)
    sd = {
        "embed.weight": emb,
        "block.weight": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "block.bias": torch.tensor([-0.0, 0.0, 1.5], dtype=torch.float16),
        "norm.steps": torch.tensor(7),
        "scale": torch.randn((), generator=gen),
        "empty": torch.zeros(0, 3),
        "head.weight": emb if tied else emb.clone(),
    }
    return sd


def make_zoo(gen, cond_kind="dataset", n=3):
    zoo = ModelZoo()
    for i in range(n):
        shape = COND_SHAPES[cond_kind][i % 3]
        cond = None if shape is None else torch.randn(shape, generator=gen)
        zoo.add(make_sd(gen), condition=cond, meta={"index": i, "task": f"t{i}", "acc": 0.5})
    return zoo


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 differs from 0.0)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_items_equal(x: ZooItem, y: ZooItem):
    assert list(x.state_dict) == list(y.state_dict)
    for name in x.state_dict:
        assert same_bits(x.state_dict[name], y.state_dict[name]), name
    assert (x.condition is None) == (y.condition is None)
    if x.condition is not None:
        assert same_bits(x.condition, y.condition)
    assert x.meta == y.meta


def indices(zoo):
    return [item.meta["index"] for item in zoo]


# ---------------------------------------------------------------------------------- building
def test_add_len_getitem_iteration(gen):
    zoo = ModelZoo()
    assert len(zoo) == 0 and zoo.layout == {} and list(zoo) == []
    sds = [make_sd(gen) for _ in range(4)]
    for i, sd in enumerate(sds):
        zoo.add(sd, meta={"index": i})
    assert len(zoo) == 4
    assert indices(zoo) == [0, 1, 2, 3]
    assert zoo[-1].meta == {"index": 3} and zoo[-4].meta == {"index": 0}
    with pytest.raises(IndexError):
        zoo[4]
    item = zoo[2]
    assert isinstance(item, ZooItem) and item.condition is None
    assert all(torch.equal(item.state_dict[k], sds[2][k]) for k in sds[2])
    assert [list(sd) for sd in zoo.state_dicts()] == [list(sds[0])] * 4
    assert zoo.layout == {k: (tuple(v.shape), v.dtype) for k, v in sds[0].items()}
    view = zoo[1::2]
    assert (
        isinstance(view, ModelZoo)
        and indices(view) == [1, 3]
        and indices(zoo[::-1]) == [3, 2, 1, 0]
    )
    assert view.layout == zoo.layout
    # Editing what access returned does not change the zoo.
    item.state_dict.clear()
    item.meta["index"] = 99
    assert len(zoo[2].state_dict) == len(sds[2]) and zoo[2].meta == {"index": 2}


def test_add_stores_detached_contiguous_cpu_copies(gen):
    base = torch.randn(4, 6, generator=gen)
    param = torch.nn.Parameter(torch.randn(3, generator=gen))
    sd = {
        "t": base.t(),
        "p": param,
        "a": base,
        "b": base,
    }  # a non-contiguous view, a parameter, a tie
    cond = torch.randn(2, 3, 5, generator=gen)
    meta = {"nested": {"list": [1, 2]}}
    zoo = ModelZoo()
    zoo.add(sd, condition=cond, meta=meta)
    expected = {k: v.detach().clone() for k, v in sd.items()}
    expected_cond = cond.clone()
    with torch.no_grad():  # the caller edits its tensors and meta in place afterwards
        base.add_(1.0)
        param.mul_(2.0)
        cond.zero_()
    meta["nested"]["list"].append(3)
    item = zoo[0]
    for k, v in item.state_dict.items():
        assert torch.equal(v, expected[k]), k
        assert v.is_contiguous() and v.device.type == "cpu" and not v.requires_grad
    assert torch.equal(item.condition, expected_cond)
    assert item.meta == {"nested": {"list": [1, 2]}}
    # The tie survives the copy (one tensor for both names), the view is its own tensor.
    assert item.state_dict["a"] is item.state_dict["b"]
    assert item.state_dict["t"].data_ptr() != item.state_dict["a"].data_ptr()


# ---------------------------------------------------------------------------------- files
@pytest.mark.parametrize("cond_kind", ["dataset", "text", None])
def test_save_from_directory_round_trip_bit_exact(tmp_path, gen, cond_kind):
    zoo = make_zoo(gen, cond_kind)
    zoo.save(tmp_path / "zoo")
    loaded = ModelZoo.from_directory(tmp_path / "zoo")
    assert len(loaded) == len(zoo) and loaded.layout == zoo.layout
    for a, b in zip(zoo, loaded):
        assert_items_equal(a, b)
        # Tied names come back as one tensor; the file stored it once.
        assert b.state_dict["head.weight"] is b.state_dict["embed.weight"]
    manifest = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert manifest["format"] == "d2nwg.ModelZoo" and manifest["format_version"] == 1
    assert manifest["items"][0]["weights"] == "model_00000.safetensors"
    assert manifest["items"][2]["condition"] == (
        None if cond_kind is None else "condition_00002.safetensors"
    )
    assert manifest["layout"]["block.weight"] == {"shape": [3, 4], "dtype": "bfloat16"}
    _, stored = d2nwg.files.read_safetensors(tmp_path / "zoo" / "model_00001.safetensors")
    assert "head.weight" not in stored and "embed.weight" in stored
    # A loaded zoo saves again (somewhere else) to the same content.
    loaded.save(tmp_path / "again")
    for a, b in zip(zoo, ModelZoo.from_directory(tmp_path / "again")):
        assert_items_equal(a, b)


def test_untied_copies_stay_untied(tmp_path, gen):
    zoo = ModelZoo()
    zoo.add(make_sd(gen, tied=False))
    zoo.save(tmp_path)
    sd = ModelZoo.from_directory(tmp_path)[0].state_dict
    assert sd["head.weight"] is not sd["embed.weight"]
    assert torch.equal(sd["head.weight"], sd["embed.weight"])


def test_from_directory_is_lazy(tmp_path, gen, monkeypatch):
    make_zoo(gen, "text", n=3).save(tmp_path)
    reads = []
    real_read = zoo_module.read_safetensors
    monkeypatch.setattr(
        zoo_module,
        "read_safetensors",
        lambda p, **kw: reads.append(os.fspath(p)) or real_read(p, **kw),
    )
    zoo = ModelZoo.from_directory(tmp_path)
    assert reads == [] and len(zoo) == 3 and zoo.layout  # zoo.json only
    os.remove(tmp_path / "model_00001.safetensors")
    path2 = tmp_path / "model_00002.safetensors"
    path2.write_bytes(path2.read_bytes()[:-10])  # truncated
    os.remove(tmp_path / "condition_00000.safetensors")
    sds = zoo.state_dicts()
    assert list(next(sds)) == list(zoo.layout)  # weights only: the missing condition is not read
    assert reads == [str(tmp_path / "model_00000.safetensors")]
    with pytest.raises(d2nwg.FileFormatError, match="condition_00000.safetensors"):
        zoo[0]
    with pytest.raises(d2nwg.FileFormatError, match="model_00001.safetensors.*no such file"):
        zoo[1]
    with pytest.raises(d2nwg.FileFormatError, match="model_00002.safetensors"):
        zoo[-1]
    with pytest.raises(d2nwg.FileFormatError, match="model_00001.safetensors"):
        next(sds)
    # Views stay lazy too.
    reads.clear()
    view = zoo[1:]
    assert len(view) == 2 and reads == []


def test_save_replaces_an_existing_zoo_and_appends_in_place(tmp_path, gen):
    make_zoo(gen, "dataset", n=3).save(tmp_path)
    small = ModelZoo()
    small.add({"w": torch.ones(2)}, meta={"index": 0})
    small.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_00000.safetensors", "zoo.json"]
    loaded = ModelZoo.from_directory(tmp_path)
    assert loaded.layout == {"w": ((2,), torch.float32)} and indices(loaded) == [0]
    # Append: read from a directory, add, save back into it.
    loaded.add({"w": torch.full((2,), 3.0)}, meta={"index": 1})
    loaded.save(tmp_path)
    again = ModelZoo.from_directory(tmp_path)
    assert indices(again) == [0, 1] and torch.equal(again[1].state_dict["w"], torch.full((2,), 3.0))
    assert indices(loaded) == [0, 1]
    # A reversed view saved over its own source reads its items before replacing them.
    view = again[::-1]
    view.save(tmp_path)
    assert indices(ModelZoo.from_directory(tmp_path)) == [1, 0]
    # The view now reads the files it wrote (its old paths hold other items now).
    assert [x.state_dict["w"][0].item() for x in view] == [3.0, 1.0]
    assert [x.state_dict["w"][0].item() for x in ModelZoo.from_directory(tmp_path)] == [3.0, 1.0]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_half_written_zoo(tmp_path, gen, monkeypatch, existing):
    directory = tmp_path / "zoo"
    old = make_zoo(gen, "text", n=2)
    if existing:
        old.save(directory)
    before = sorted(os.listdir(directory)) if existing else []
    calls = []
    real_save = zoo_module.save_safetensors

    def fail_on_second(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(zoo_module, "save_safetensors", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        make_zoo(gen, "text", n=3).save(directory)
    assert len(calls) == 2
    assert sorted(os.listdir(directory)) == before  # no zoo.json, no temp files or folders
    if existing:
        for a, b in zip(old, ModelZoo.from_directory(directory)):
            assert_items_equal(a, b)


# ---------------------------------------------------------------------------------- shards
def test_shard_partitions_items_exactly(tmp_path, gen):
    zoo = ModelZoo()
    for i in range(11):
        zoo.add({"w": torch.randn(2, generator=gen)}, meta={"index": i})
    zoo.save(tmp_path)
    for source in (zoo, ModelZoo.from_directory(tmp_path)):
        for world_size in (1, 3, 4, 11, 13):
            shards = [indices(source.shard(rank, world_size)) for rank in range(world_size)]
            for rank, got in enumerate(shards):
                assert got == [i for i in range(11) if i % world_size == rank]
            assert sorted(sum(shards, [])) == list(range(11))
    assert indices(zoo.shard()) == list(range(11))  # no process group: everything
    for rank, world_size in [(3, 3), (-1, 2), (0, 0), (1.0, 2), (True, 2)]:
        with pytest.raises(d2nwg.ConfigError, match="rank"):
            zoo.shard(rank, world_size)


# ---------------------------------------------------------------------------------- bad input
def test_add_rejects_bad_input_with_named_errors(gen):
    zoo = ModelZoo()
    zoo.add(make_sd(gen), condition=torch.randn(3, 2, 5, generator=gen))

    def rejects(error, match, sd=None, condition=torch.zeros(1, 1, 5), meta=None):  # noqa: B008
        with pytest.raises(error, match=match):
            zoo.add(make_sd(gen) if sd is None else sd, condition=condition, meta=meta)
        assert len(zoo) == 1

    sd = make_sd(gen)
    del sd["block.bias"]
    sd["extra"] = torch.zeros(1)
    rejects(
        d2nwg.KeyMismatchError, r"missing keys \['block.bias'\], unexpected keys \['extra'\]", sd
    )
    sd = make_sd(gen)
    sd["block.weight"] = torch.zeros(4, 3, dtype=torch.bfloat16)
    rejects(d2nwg.ShapeError, r"'block.weight'.*\(4, 3\).*\(3, 4\)", sd)
    sd = make_sd(gen)
    sd["block.weight"] = sd["block.weight"].float()
    rejects(d2nwg.DTypeError, r"'block.weight'.*float32.*bfloat16", sd)
    for bad in (float("nan"), float("inf")):
        sd = make_sd(gen)
        sd["block.bias"][1] = bad
        rejects(d2nwg.NonFiniteError, "'block.bias'", sd)
    sd = make_sd(gen)
    sd["scale"] = 1.0
    rejects(d2nwg.DTypeError, "'scale'.*float, not a tensor", sd)
    rejects(d2nwg.ConfigError, "state_dict is empty", {})
    rejects(d2nwg.ConfigError, "mapping of names to tensors, got a list", [("w", torch.zeros(1))])
    rejects(d2nwg.ConfigError, "condition or none", condition=None)
    rejects(d2nwg.DTypeError, "condition.*int64", condition=torch.zeros(1, 1, 5, dtype=torch.long))
    rejects(d2nwg.DTypeError, "condition is a list", condition=[[0.0] * 5])
    rejects(d2nwg.ShapeError, r"condition has shape \(1, 5\).*rank 3", condition=torch.zeros(1, 5))
    rejects(
        d2nwg.ShapeError,
        r"condition has shape \(1, 1, 4\).*5 features",
        condition=torch.zeros(1, 1, 4),
    )
    rejects(d2nwg.NonFiniteError, "condition", condition=torch.full((1, 1, 5), float("inf")))
    rejects(d2nwg.ConfigError, "meta is not JSON", meta={"t": torch.zeros(1)})
    rejects(d2nwg.ConfigError, "meta is not JSON", meta={"x": float("nan")})
    rejects(d2nwg.ConfigError, "meta must be a dict", meta=["a"])

    plain = ModelZoo()
    plain.add({"w": torch.zeros(2)})
    with pytest.raises(d2nwg.ConfigError, match="condition or none"):
        plain.add({"w": torch.zeros(2)}, condition=torch.zeros(2, 3))
    for cond in (torch.zeros(5), torch.zeros(1, 2, 3, 4)):
        with pytest.raises(d2nwg.ShapeError, match="condition has shape"):
            ModelZoo().add({"w": torch.zeros(2)}, condition=cond)
    with pytest.raises(d2nwg.DTypeError, match="'w'.*complex"):
        ModelZoo().add({"w": torch.zeros(2, dtype=torch.complex64)})


def valid_manifest(tmp_path, gen):
    make_zoo(gen, "dataset", n=2).save(tmp_path)
    return json.loads((tmp_path / "zoo.json").read_text())


def _set(path, value):
    def edit(m):
        *keys, last = path
        for k in keys:
            m = m[k]
        m[last] = value

    return edit


MANIFEST_EDITS = {
    "wrong format": _set(["format"], "other"),
    "newer version": _set(["format_version"], 2),
    "string version": _set(["format_version"], "1"),
    "bool version": _set(["format_version"], True),
    "negative shape": _set(["layout", "scale", "shape"], [-1]),
    "float shape": _set(["layout", "scale", "shape"], [2.0]),
    "bool shape": _set(["layout", "scale", "shape"], [True]),
    "shape not a list": _set(["layout", "scale", "shape"], 3),
    "unknown dtype": _set(["layout", "scale", "dtype"], "float128"),
    "torch attribute as dtype": _set(["layout", "scale", "dtype"], "Tensor"),
    "layout not an object": _set(["layout"], [1, 2]),
    "escaping path": _set(["items", 1, "weights"], "../model_00001.safetensors"),
    "escaping condition": _set(["items", 0, "condition"], "sub/../../c.safetensors"),
    "absolute path": _set(["items", 0, "weights"], "/etc/passwd"),
    "windows path": _set(["items", 0, "weights"], "C:\\zoo\\model.safetensors"),
    "non-string path": _set(["items", 0, "weights"], 3),
    "missing condition": _set(["items", 1, "condition"], None),
    "bad condition spec": _set(["condition"], {"rank": 4, "features": 5}),
    "meta not an object": _set(["items", 0, "meta"], [1]),
    "alias outside the layout": _set(["items", 0, "aliases"], {"nope": "embed.weight"}),
    "alias of another shape": _set(["items", 0, "aliases"], {"head.weight": "block.weight"}),
    "items not a list": _set(["items"], {"weights": "model_00000.safetensors"}),
    "item without weights": lambda m: m["items"][0].pop("weights"),
    "no layout": lambda m: m.pop("layout"),
    "not an object": lambda m: m.clear(),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_bad_manifest_raises_file_format_error_naming_it(tmp_path, gen, edit):
    manifest = valid_manifest(tmp_path, gen)
    MANIFEST_EDITS[edit](manifest)
    (tmp_path / "zoo.json").write_text(json.dumps(manifest))
    with pytest.raises(d2nwg.FileFormatError, match="zoo.json") as info:
        ModelZoo.from_directory(tmp_path)
    if edit == "newer version":
        assert "newer" in str(info.value)


def test_missing_or_invalid_manifest(tmp_path, gen):
    with pytest.raises(d2nwg.FileFormatError, match="zoo.json: no such file"):
        ModelZoo.from_directory(tmp_path)
    valid_manifest(tmp_path, gen)
    (tmp_path / "zoo.json").write_text('{"format": "d2nwg.ModelZoo",')
    with pytest.raises(d2nwg.FileFormatError, match="zoo.json: not a readable JSON"):
        ModelZoo.from_directory(tmp_path)
    (tmp_path / "zoo.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(d2nwg.FileFormatError, match="zoo.json"):
        ModelZoo.from_directory(tmp_path)


def _replace(name, key, value):
    def edit(tensors):
        tensors.pop(name)
        if key is not None:
            tensors[key] = value

    return edit


FILE_EDITS = {  # (file, edit of its tensors, what the error must name)
    "missing key": ("model_00001", _replace("scale", None, None), r"missing keys \['scale'\]"),
    "unexpected key": (
        "model_00001",
        lambda t: t.update(x=torch.zeros(1)),
        r"unexpected keys \['x'\]",
    ),
    "stored alias": (
        "model_00001",
        lambda t: t.update({"head.weight": t["embed.weight"].clone()}),
        "head.weight",
    ),
    "shape": ("model_00001", _replace("scale", "scale", torch.zeros(2)), r"'scale'.*shape \(2,\)"),
    "dtype": (
        "model_00001",
        _replace("scale", "scale", torch.zeros((), dtype=torch.float64)),
        "'scale'.*float64",
    ),
    "non-finite": (
        "model_00001",
        _replace("embed.weight", "embed.weight", torch.full((6, 4), float("nan"))),
        "'embed.weight'.*NaN",
    ),
    "condition key": (
        "condition_00001",
        _replace("condition", "cond", torch.zeros(1, 1, 5)),
        r"\['cond'\]",
    ),
    "condition width": (
        "condition_00001",
        _replace("condition", "condition", torch.zeros(1, 1, 4)),
        "5 features",
    ),
    "condition dtype": (
        "condition_00001",
        _replace("condition", "condition", torch.zeros(1, 1, 5, dtype=torch.int32)),
        "int32",
    ),
    "condition non-finite": (
        "condition_00001",
        _replace("condition", "condition", torch.full((1, 1, 5), float("-inf"))),
        "NaN or Inf",
    ),
}


@pytest.mark.parametrize("edit", FILE_EDITS)
def test_mismatching_file_raises_when_its_item_is_read(tmp_path, gen, edit):
    make_zoo(gen, "dataset", n=2).save(tmp_path)
    name, change, what = FILE_EDITS[edit]
    path = tmp_path / f"{name}.safetensors"
    _, tensors = d2nwg.files.read_safetensors(path)
    change(tensors)
    save_safetensors(tensors, path, {})
    zoo = ModelZoo.from_directory(tmp_path)
    zoo[0]  # the other item is fine
    with pytest.raises(d2nwg.FileFormatError, match=rf"{name}\.safetensors: .*{what}"):
        zoo[1]


def test_corrupt_model_file(tmp_path, gen):
    make_zoo(gen, None, n=2).save(tmp_path)
    (tmp_path / "model_00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    zoo = ModelZoo.from_directory(tmp_path)
    with pytest.raises(d2nwg.FileFormatError, match="model_00000.safetensors"):
        list(zoo)
    assert zoo[1].meta["index"] == 1


# ---------------------------------------------------------------------------------- JSON helpers
def test_save_json_and_read_json(tmp_path):
    path = tmp_path / "a" / "x.json"
    save_json(path, {"b": [1, 2.5, None]})
    assert read_json(path) == {"b": [1, 2.5, None]}
    with pytest.raises(ValueError):
        save_json(tmp_path / "nan.json", {"x": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["a"]  # nothing written for what cannot be
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(d2nwg.FileFormatError, match="bad.json"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(d2nwg.FileFormatError, match="deep.json"):
        read_json(tmp_path / "deep.json")
    with pytest.raises(d2nwg.FileFormatError, match="missing.json: no such file"):
        read_json(tmp_path / "missing.json")
