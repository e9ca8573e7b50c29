"""load_module refuses files whose floating tensors hold NaN or Inf (naming the file and the
key) and targets that are neither a module nor a module class."""

from __future__ import annotations

import pytest
import torch

import d2nwg
from d2nwg.nn.io import load_module, save_module
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig

VAE_CFG = ChunkVAEConfig(chunk_size=64, compression=16, hidden_dim=8, num_blocks=1)


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, dtype=dtype)
        self.register_buffer("scale", torch.ones(2, dtype=dtype))
        self.register_buffer("count", torch.tensor([2**62, -(2**62)]))  # integers: not checked


def _saved(tmp_path, module, key, index, value):
    module.state_dict()[key].view(-1)[index] = value
    path = tmp_path / "net.safetensors"
    save_module(module, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["lin.weight", "lin.bias", "scale"])
def test_nan_or_inf_in_a_module_file_raises_nonfinite_error(tmp_path, key, value):
    path = _saved(tmp_path, Net(), key, 1, value)
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(d2nwg.NonFiniteError) as info:
        load_module(target, path)
    message = str(info.value)
    assert str(path) in message and key in message, message
    # nothing was loaded into the target
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_is_checked(tmp_path, dtype):
    path = _saved(tmp_path, Net(dtype), "lin.weight", 4, float("inf"))
    with pytest.raises(d2nwg.NonFiniteError, match="lin.weight"):
        load_module(Net(dtype), path)


def test_a_rebuilt_module_is_checked_too(tmp_path):
    vae = ChunkVAE(VAE_CFG, seed=0)
    key = next(iter(vae.state_dict()))
    path = _saved(tmp_path, vae, key, 0, float("nan"))
    with pytest.raises(d2nwg.NonFiniteError) as info:
        load_module(ChunkVAE, path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_finite_files_load(tmp_path):
    net = Net()
    path = tmp_path / "net.safetensors"
    save_module(net, path)
    back = load_module(Net(), path)
    assert all(
        torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values())
    )


@pytest.mark.parametrize(
    "target, named",
    [
        ("ChunkVAE", "'ChunkVAE' of type str"),
        (3, "3 of type int"),
        (None, "None of type NoneType"),
        (int, "the class int"),
        (dict, "the class dict"),
        (ChunkVAEConfig, "the class ChunkVAEConfig"),
        ([ChunkVAE], "[<class"),
    ],
)
def test_a_target_that_is_no_module_raises_config_error(tmp_path, target, named):
    path = tmp_path / "vae.safetensors"
    save_module(ChunkVAE(VAE_CFG, seed=0), path)
    with pytest.raises(d2nwg.ConfigError) as info:
        load_module(target, path)
    assert type(info.value) is d2nwg.ConfigError
    assert named in str(info.value), str(info.value)
