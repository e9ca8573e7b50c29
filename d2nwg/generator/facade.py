"""``d2nwg.D2NWG``: a zoo of trained models in, a generator of new weights out.

The class is a table of contents: each method checks its arguments and hands the job to the
module named after it.

- :mod:`~d2nwg.generator.config`: ``D2NWGConfig`` and the sizes it derives from a zoo;
- :mod:`~d2nwg.generator.fitting` and :mod:`~d2nwg.generator.stages`: training (stage 1 the
  ChunkVAE, stage 2 the latent diffusion) on the loop of :mod:`d2nwg.training`;
- :mod:`~d2nwg.generator.conditions`: raw conditions, checked and padded;
- :mod:`~d2nwg.generator.networks`: the networks and the generator's parts;
- :mod:`~d2nwg.generator.synthesis`: sampling windows, decoding, writing into models;
- :mod:`~d2nwg.generator.export`: sharded safetensors directories;
- :mod:`~d2nwg.generator.delta`: base models of delta generators;
- :mod:`~d2nwg.generator.persistence`: the generator's directory;
- :mod:`d2nwg.hf`: Hugging Face formats (PEFT adapter folders, transformers targets).

Data flows one way: zoo -> WeightTokenizer -> ChunkVAE encoder -> latent diffusion
-> ChunkVAE decoder -> detokenize.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from d2nwg.devices import resolve_device
from d2nwg.errors import ConfigError
from d2nwg.files import directory_lock
from d2nwg.generator import export, fitting, persistence
from d2nwg.generator.conditions import RawConditions, parse_conditions
from d2nwg.generator.config import CONDITION_RANKS, D2NWGConfig, resolve_for
from d2nwg.generator.delta import Base
from d2nwg.generator.fitting import Resume
from d2nwg.generator.networks import ConditionalDenoiser, Parts, build_networks
from d2nwg.generator.synthesis import SampleRun, Synthesizer, WindowedDenoiser
from d2nwg.nn import ChunkVAE, Condition
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.training import DistContext, writer_lock
from d2nwg.windows import WindowLayout
from d2nwg.zoo import ModelZoo

StateDict = Mapping[str, torch.Tensor]


class D2NWG:
    """Learns the distribution of a zoo's weights; generates new weights for a condition.

    Example::

        gen = d2nwg.D2NWG(d2nwg.D2NWGConfig(condition="dataset"))
        gen.fit(zoo, out="run/")
        sds = gen.generate(examples, num_samples=8, seed=0)   # examples [classes, shots, F]
    """

    def __init__(self, config: D2NWGConfig | None = None) -> None:
        self.config = config or D2NWGConfig()
        self.tokenizer: WeightTokenizer | None = None
        self.windows: WindowLayout | None = None
        self.vae: ChunkVAE | None = None
        self.model: ConditionalDenoiser | None = None
        self.latent_scale = 1.0
        self.cond_rank = 0  # 3 for dataset conditions, 2 for text, 0 for none
        self.max_classes = 0  # condition slots the denoiser embeds (classes or text tokens)
        self.history: dict[str, Any] = {}  # seconds per stage, steps_per_s, world_size
        # the PEFT adapter config of a generator of adapters (from the zoo; save_peft)
        self.adapter_config: dict | None = None
        self._bound: dict[tuple, WindowedDenoiser] = {}  # see Synthesizer.bound

    def _adopt(self, parts: Parts) -> D2NWG:
        self.config, self.tokenizer, self.windows = parts.config, parts.tokenizer, parts.windows
        self.vae, self.model, self.latent_scale = parts.vae, parts.model, parts.latent_scale
        self.cond_rank, self.max_classes = parts.cond_rank, parts.max_classes
        self.adapter_config = parts.adapter_config
        self._bound.clear()
        return self

    @property
    def fitted(self) -> bool:
        return self.model is not None

    # ---- training -------------------------------------------------------------------------
    def fit(
        self,
        zoo: ModelZoo,
        out: str | os.PathLike | None = None,
        resume: Resume = False,
        progress: bool = True,
        base: StateDict | None = None,
    ) -> D2NWG:
        """Train the generator on ``zoo``: stage 1 the ChunkVAE, stage 2 the latent diffusion.

        ``out`` receives checkpoints (``out/checkpoints/``), the loss log (``out/log.jsonl``)
        and nothing else; ``resume=True`` continues from the newest checkpoint there and ends
        with the same weights as an uninterrupted run; ``resume="auto"`` does the same, or
        starts fresh when there is nothing to resume (one command line for the first start and
        every restart under ``torchrun --max-restarts``). Under ``torchrun`` each process trains
        on its share of the zoo with DistributedDataParallel; rank 0 writes the files and
        holds ``out`` (a second run writing there gets :class:`~d2nwg.DirectoryLockedError`).
        A loss that turns NaN or Inf stops the run with :class:`~d2nwg.NonFiniteError`.
        With ``config.delta`` the generator learns the residuals ``model - base`` (``base``: a
        state dict of the zoo's architecture, required then).
        """
        parts, history = fitting.fit(self.config, zoo, out, resume, progress, base)
        self.history.update(history)
        return self._adopt(parts)

    @classmethod
    def untrained(
        cls,
        template: StateDict,
        config: D2NWGConfig | None = None,
        cond_features: int = 0,
        max_classes: int | None = None,
    ) -> D2NWG:
        """A generator for ``template``'s architecture (meta tensors will do) with freshly
        initialized networks and identity normalization: what :meth:`fit` would train. For
        benchmarks and tests of generation's speed and memory, whose cost does not depend on
        the weights; its samples are not meaningful weights. ``max_classes``: the denoiser's
        condition slots (default: 1 for a dataset generator, none for text)."""
        config = config or D2NWGConfig()
        if config.condition != "none" and cond_features < 1:
            raise ConfigError(f"a {config.condition!r} generator needs cond_features >= 1")
        rank = CONDITION_RANKS[config.condition]
        if max_classes is None:  # dataset: 1 slot; text: none (slots cost nothing to speak of)
            max_classes = 1 if rank == 3 else 0
        max_classes = max_classes if rank in (2, 3) else 0
        c, tok, windows = resolve_for(config, template, cond_features)
        vae, model = build_networks(c, len(tok.kind_names), max_classes)
        parts = Parts(c, tok, windows, vae, model, 1.0, rank, max_classes)
        return cls(config)._adopt(parts.to(resolve_device(c.device)))

    # ---- generation -----------------------------------------------------------------------
    def _synthesizer(self) -> Synthesizer:
        if not self.fitted:
            raise ConfigError("this D2NWG is not trained: call fit(zoo) or D2NWG.load(dir)")
        return Synthesizer(self.config, self.tokenizer, self.windows, self.vae, self.model,
                           self.latent_scale, self.cond_rank, self._bound)  # fmt: skip

    def _base(self, base) -> Base | None:
        return Base.of(self.config.delta, self.tokenizer, base)

    def raw_conditions(self, condition) -> tuple[RawConditions | None, int]:
        """One task's condition or a batch of them, checked and padded: (RawConditions, the
        number of tasks)."""
        c = self.config
        return parse_conditions(condition, c.condition, self.cond_rank, c.cond_features)

    @torch.no_grad()
    def encode_condition(
        self, condition, device: str | torch.device | None = None
    ) -> Condition | None:
        """The condition tokens the denoiser cross-attends to, one row per task (None for an
        unconditional generator)."""
        run = self._synthesizer().start(condition, {"device": device, "guidance_scale": 1.0})
        return run.cond

    def start_sampling(self, condition, **sampling: Any) -> SampleRun:
        """One generation call's set-up (options checked, condition encoded, networks on the
        device): what the generation methods run on, exposed for benchmarks."""
        return self._synthesizer().start(condition, sampling)

    @torch.no_grad()
    def generate_tokens(
        self, condition=None, num_samples: int = 1, **sampling: Any
    ) -> torch.Tensor:
        """Generated chunk tokens ``[tasks * num_samples, T, C]`` (task-major order): sampled
        latents decoded by the VAE, ready for the tokenizer's detokenize (residuals from the
        base, for a delta generator). ``sampling``: see :class:`SamplingOptions`."""
        synth = self._synthesizer()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be an int >= 1, got {num_samples!r}")
        return synth.tokens(synth.start(condition, sampling), num_samples)

    def generate(
        self,
        condition=None,
        num_samples: int = 1,
        base: StateDict | nn.Module | None = None,
        **sampling: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """``num_samples`` state dicts per task (task-major), with the zoo's names, shapes and
        dtypes, on CPU.

        ``condition``: one task's raw condition (``[classes, shots, F]`` examples or an
        ``[L, E]`` text embedding), a batch or list of them, or None for an unconditional
        generator. ``base``: the base model of a delta generator (weights = base + generated).
        ``sampling``: see :class:`SamplingOptions` (sample i of a seed is the same whatever
        ``num_samples`` is).
        """
        self._synthesizer()
        base = self._base(base)
        tokens = self.generate_tokens(condition, num_samples, **sampling)
        sds = self.tokenizer.detokenize(tokens.float().cpu())
        if base is not None:
            for sd in sds:
                base.add_to(sd)
        return sds

    def generate_into(
        self,
        model: nn.Module | dict[str, torch.Tensor],
        condition=None,
        *,
        distributed: bool = False,
        **sampling: Any,
    ):
        """Generate one set of weights (sample 0 of ``seed``, as :meth:`generate` gives it)
        and stream it into ``model`` (a module or a state dict with the zoo's names) in place:
        the model's latent sequence is sampled (C/d times smaller than its weights), then a
        batch of ``batch_windows`` windows' tokens is decoded, de-normalized and written
        straight into the parameters, then the next, so the extra memory is the latent
        state's and one batch's, whatever the model's size. Tensors outside the generator's
        layout (``include`` / ``exclude``) are left untouched; a delta generator adds to what
        ``model`` holds (its base weights). ``distributed=True`` (under ``torchrun``): each
        rank writes its share of the batches and the ranks share the sampler's steps (the
        same values one process writes there). Returns ``model``.
        """
        synth = self._synthesizer()
        run = synth.start(condition, sampling, max_tasks=1)
        dests = self.tokenizer.destinations(model)
        ctx = DistContext.from_env(run.device) if distributed else DistContext()
        synth.stream_into(run, dests, ctx)
        self.tokenizer.copy_aliases(dests)
        return model

    def generate_to_directory(
        self,
        directory: str | os.PathLike,
        condition=None,
        *,
        shard_size: int = 2**31,
        base: StateDict | nn.Module | None = None,
        distributed: bool | None = None,
        model_config: Any = None,
        **sampling: Any,
    ) -> dict[str, Any]:
        """Generate one set of weights (sample 0 of ``seed``) into safetensors shards of at
        most ``shard_size`` bytes (a larger tensor gets a shard of its own) with an index,
        the layout Hugging Face uses for large checkpoints: ``model-00001-of-0000N.safetensors``
        and ``model.safetensors.index.json`` (``weight_map``: name -> file; tied names are
        stored once, their aliases listed in the index's metadata). Streams: memory holds one
        shard, one batch of windows and the latent state, so a model larger than memory can be
        generated.

        Under ``torchrun`` (or ``distributed=True``) each rank generates and writes its share
        of the shards, bit for bit what one process writes; rank 0 writes the index last.
        Each file is written to a temporary name and renamed. One writing job at a time: a
        second one in the same directory gets :class:`~d2nwg.DirectoryLockedError`. Returns
        the index.

        ``model_config``: a transformers ``PretrainedConfig`` (or a ``PreTrainedModel``, whose
        config is taken): the layout is checked against its architecture first, and
        ``config.json`` is written too, so ``AutoModelForCausalLM.from_pretrained(directory)``
        loads the result (see :mod:`d2nwg.hf.transformers`).
        """
        synth = self._synthesizer()
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be a number of bytes >= 1, got {shard_size!r}")
        extra = None
        if model_config is not None:
            from d2nwg.hf import transformers as hf_transformers

            extra = {"config.json": hf_transformers.target_config(self.tokenizer.layers,
                                                                 model_config)}  # fmt: skip
        base = self._base(base)
        run = synth.start(condition, sampling, max_tasks=1)
        # None: whatever torchrun says (from_env is one process without WORLD_SIZE > 1)
        ctx = DistContext() if distributed is False else DistContext.from_env(run.device)
        directory = os.fspath(directory)
        with writer_lock(ctx, directory):
            return export.write_shards(synth, run, directory, shard_size, base, ctx, extra)

    def save_peft(
        self,
        directory: str | os.PathLike,
        condition=None,
        num_samples: int = 1,
        *,
        adapter_config: Mapping | None = None,
        base: StateDict | nn.Module | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Generate ``num_samples`` adapters per task (as :meth:`generate`) and write each as
        a PEFT adapter folder ``directory/sample_00000``, ... (``adapter_model.safetensors``
        under PEFT's key names, then ``adapter_config.json``) that
        ``PeftModel.from_pretrained(base_model, folder)`` loads. ``adapter_config``: the
        config to write, by default the one the generator kept from its zoo
        (:meth:`d2nwg.ModelZoo.from_peft`). One writer at a time, as for :meth:`save`.
        Returns the folders (see :mod:`d2nwg.hf.peft`)."""
        from d2nwg.hf import peft

        config = peft.config_to_write(self.adapter_config, adapter_config)
        sds = self.generate(condition, num_samples, base=base, **sampling)
        with directory_lock(directory):
            return peft.write_adapters(os.fspath(directory), sds, config)

    # ---- files ----------------------------------------------------------------------------
    def _parts(self) -> Parts:
        self._synthesizer()  # the same "not trained" error
        return Parts(self.config, self.tokenizer, self.windows, self.vae, self.model,
                     self.latent_scale, self.cond_rank, self.max_classes,
                     self.adapter_config)  # fmt: skip

    def save(self, directory: str | os.PathLike) -> None:
        """``config.json`` plus safetensors files; each written atomically, config.json last.
        One writer at a time: a second process saving to the same directory meanwhile gets
        :class:`~d2nwg.DirectoryLockedError`."""
        parts = self._parts()
        with directory_lock(directory):
            persistence.save(parts, os.fspath(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> D2NWG:
        """A generator written by :meth:`save`; bad files raise :class:`FileFormatError`."""
        parts = persistence.load(os.fspath(directory), device)
        return cls(parts.config)._adopt(parts)
