"""``d2nwg.D2NWG``: a zoo of trained models in, a generator of new weights out.

Stage 1 trains a :class:`ChunkVAE` on the zoo's chunk tokens; the zoo is then encoded once
into latent tokens, scaled to unit standard deviation. Stage 2 trains a
:class:`LatentDenoiser` together with its condition encoder (a :class:`DatasetEncoder` over
example inputs per class, or a :class:`TextConditioner`), with condition dropout for
classifier-free guidance, an EMA of the weights, AdamW with warm-up and cosine decay, gradient
clipping and bf16 autocast on CUDA. Sampling runs :func:`d2nwg.sample` in latent space,
decodes with the VAE and detokenizes straight into state dicts or a live model.

Data flows one way: zoo -> WeightTokenizer -> ChunkVAE encoder -> latent diffusion
-> ChunkVAE decoder -> detokenize.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d2nwg.errors import ConfigError, FileFormatError, ShapeError, shape_of
from d2nwg.files import read_json, save_json, save_safetensors
from d2nwg.nn import (
    ChunkVAE,
    ChunkVAEConfig,
    Condition,
    DatasetEncoder,
    DatasetEncoderConfig,
    LatentDenoiser,
    LatentDenoiserConfig,
    TextConditioner,
    TextConditionerConfig,
    drop_condition,
    load_module,
    save_module,
)
from d2nwg.nn.denoiser import diffusion_loss
from d2nwg.nn.io import JSONConfig
from d2nwg.sampling import SAMPLERS, sample
from d2nwg.schedule import PREDICTION_TYPES, NoiseSchedule
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.training import EMA, Checkpoints, DistContext, LossLog, lr_factor
from d2nwg.windows import WindowLayout
from d2nwg.zoo import ModelZoo

FORMAT = "d2nwg.D2NWG"
FORMAT_VERSION = 1
CONDITIONS = ("dataset", "text", "none")
CONDITION_RANKS = {"dataset": 3, "text": 2, "none": 0}  # dims of one task's raw condition
CONDITION_SHAPES = {3: "[classes, shots, F]", 2: "[L, E]"}  # raw condition of one task, by rank
STAGES = ("vae", "diffusion")
# Default windows per sampler run: about this many decoded values (32 MiB of float32 on a
# CPU, where streaming's extra memory should stay small next to the model; 1 GiB on a GPU,
# where larger batches keep it busy).
BATCH_ELEMENTS = {"cpu": 2**23, "cuda": 2**28}
# Windows drawn per model of a diffusion training step (the default of window_batch).
WINDOW_DRAWS = 4


@dataclass
class D2NWGConfig(JSONConfig):
    """Everything that defines a generator. Fields left at 0 are derived from the zoo by
    :meth:`resolve` (the resolved config is what :meth:`D2NWG.save` stores)."""

    condition: str = "dataset"  # "dataset" [classes, shots, F] | "text" [L, E] | "none"
    # tokenizer
    chunk_size: int = 0  # C (0: ~64 tokens per model, within [64, 4096])
    granularity: str = "layer"
    include: list | None = None  # glob patterns of the tensors to generate (the rest of a
    exclude: list | None = None  # target model is left untouched)
    window: int = 0  # W: tokens per denoiser sample (0: the whole model is one window)
    window_batch: int = 0  # (model, window) pairs per diffusion step when windowed (0: the
    # step's models x their windows, at most WINDOW_DRAWS each; see _train_diffusion)
    delta: bool = False  # learn residuals from a base model: weights = base + generated
    # stage 1: ChunkVAE
    latent_dim: int = 0  # d (0: C / 4 within [4, 64])
    vae_hidden_dim: int = 0  # 0: ChunkVAEConfig's rule
    vae_blocks: int = 2
    kl_weight: float = 1e-4
    vae_steps: int = 0  # 0: 1000
    vae_batch: int = 512  # chunks per step
    vae_lr: float = 1e-3
    # stage 2: denoiser and condition encoder
    hidden_dim: int = 0  # 0: 128 up to 64 tokens, else 256
    depth: int = 0  # 0: 4 up to 64 tokens, else 6
    num_heads: int = 4
    cond_dim: int = 0  # condition width (0: 64)
    cond_features: int = 0  # F of the raw condition (0: from the zoo)
    prediction_type: str = "v"  # v converged fastest in the demo (epsilon needs more steps)
    schedule: str = "linear"  # "linear" | "cosine"
    timesteps: int = 1000
    diffusion_steps: int = 0  # 0: 2000
    batch_size: int = 64  # models per step (per process)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of each stage's steps
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: min(0.999, 1 - 10 / diffusion_steps)
    cond_drop: float = 0.1  # condition dropout (classifier-free guidance)
    # bookkeeping
    checkpoint_every: int = 500
    log_every: int = 25
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # sampling defaults (what the demo shows to work best)
    sampler: str = "dpmpp_2m"
    sample_steps: int = 25
    guidance_scale: float = 2.0

    def __post_init__(self) -> None:
        choices = {
            "condition": CONDITIONS,
            "granularity": ("layer", "model"),
            "prediction_type": PREDICTION_TYPES,
            "schedule": ("linear", "cosine"),
            "sampler": SAMPLERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"D2NWGConfig.{name}={getattr(self, name)!r}; choose from {allowed}"
                )
        # Types (and NaN) are checked by JSONConfig from the annotations; here: ranges.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"D2NWGConfig.{f.name} must be >= 0, got {v!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is not None and not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"D2NWGConfig.{name} must be glob patterns, got {patterns!r}")
        positive = ("num_heads", "batch_size", "vae_batch", "timesteps", "checkpoint_every",
                    "log_every", "sample_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"D2NWGConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "cond_drop"):
            if getattr(self, name) > 1:
                raise ConfigError(
                    f"D2NWGConfig.{name} must lie in [0, 1], got {getattr(self, name)}"
                )
        if self.ema_decay >= 1:
            raise ConfigError(f"D2NWGConfig.ema_decay must be < 1, got {self.ema_decay}")
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ConfigError(
                f"D2NWGConfig.sample_steps={self.sample_steps} is not in "
                f"[1, timesteps={self.timesteps}]"
            )

    def resolve(self, num_params: int, cond_features: int) -> D2NWGConfig:
        """This config with every field left at 0 derived from the zoo's size."""
        c = dataclasses.replace(self)
        if c.chunk_size == 0:
            c.chunk_size = min(
                4096, max(64, 1 << max(0, math.ceil(math.log2(max(1, num_params) / 64))))
            )
        tokens = math.ceil(num_params / c.chunk_size)
        if c.window:  # the denoiser is sized by what it sees at once
            tokens = min(tokens, c.window)
        c.latent_dim = c.latent_dim or min(64, max(4, c.chunk_size // 4))
        c.hidden_dim = c.hidden_dim or (128 if tokens <= 64 else 256)
        c.depth = c.depth or (4 if tokens <= 64 else 6)
        c.cond_dim = c.cond_dim or 64
        c.cond_features = c.cond_features or cond_features
        c.vae_steps = c.vae_steps or 1000
        c.diffusion_steps = c.diffusion_steps or 2000
        c.ema_decay = c.ema_decay or min(0.999, max(0.0, 1 - 10 / c.diffusion_steps))
        return c

    def noise_schedule(self) -> NoiseSchedule:
        if self.schedule == "cosine":
            return NoiseSchedule.cosine(self.timesteps)
        # Ho et al.'s betas are for T = 1000; scale them so that alpha_bar_T ~ 0 for any T
        # (as improved-diffusion does), else short schedules end far from pure noise.
        scale = 1000 / self.timesteps
        return NoiseSchedule.linear(
            self.timesteps, beta_start=min(0.5, 1e-4 * scale), beta_end=min(0.999, 2e-2 * scale)
        )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a
    ConfigError saying why anything else cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: d2nwg runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible")
    return device


# ----------------------------------------------------------------------------------------
# Raw conditions: one task's tensor, or a batch, padded with a mask.
# ----------------------------------------------------------------------------------------
@dataclass
class RawConditions:
    """A batch of raw conditions ``x [B, ..., F]`` and ``mask x.shape[:-1]`` (True = real):
    dataset examples ``[B, classes, shots, F]`` or text embeddings ``[B, L, E]``."""

    x: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index: torch.Tensor) -> RawConditions:
        return RawConditions(self.x[index], self.mask[index])

    def to(self, device: torch.device) -> RawConditions:
        return RawConditions(self.x.to(device), self.mask.to(device))

    @classmethod
    def stack(cls, conditions: Sequence[torch.Tensor], rank: int, features: int) -> RawConditions:
        """Pad conditions of rank ``rank`` (varying leading sizes) into one masked batch."""
        for i, c in enumerate(conditions):
            if (
                not isinstance(c, torch.Tensor)
                or c.dim() != rank
                or c.shape[-1] != features
                or not c.is_floating_point()
            ):
                raise ShapeError(
                    f"condition {i} must be a floating tensor {CONDITION_SHAPES[rank]} with "
                    f"F = {features}, got {shape_of(c)}"
                )
        lead = [max(c.shape[d] for c in conditions) for d in range(rank - 1)]
        x = conditions[0].new_zeros(len(conditions), *lead, features, dtype=torch.float32)
        mask = torch.zeros(len(conditions), *lead, dtype=torch.bool)
        for i, c in enumerate(conditions):
            region = (i,) + tuple(slice(0, s) for s in c.shape[:-1])
            x[region] = c.float()
            mask[region] = True
        return cls(x, mask)


class ConditionalDenoiser(nn.Module):
    """The denoiser and its condition encoder: what stage 2 trains end to end."""

    def __init__(self, denoiser: LatentDenoiser, encoder: nn.Module | None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.encoder = encoder

    def encode(self, raw: RawConditions | None) -> Condition | None:
        if self.encoder is None or raw is None:
            return None
        return self.encoder(raw.x, raw.mask)

    def forward(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        raw: RawConditions | None,
        schedule: NoiseSchedule,
        cond_drop: float,
        generator: torch.Generator,
        **layout: torch.Tensor | None,
    ) -> torch.Tensor:
        """The training loss of one batch (everything that needs a gradient, for DDP);
        ``layout``: the windows' ``positions``, ``layer_kinds`` and ``mask``."""
        cond = self.encode(raw)
        if cond is not None:
            cond = drop_condition(cond, cond_drop, generator, self.denoiser.null)
        return diffusion_loss(
            self.denoiser,
            x0,
            schedule,
            t,
            noise,
            cond,
            prediction_type=self.denoiser.config.prediction_type,
            **layout,
        )


# ----------------------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------------------
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
        self.max_classes = 0  # condition slots the denoiser embeds (dataset conditions)
        self.history: dict[str, Any] = {}  # seconds per stage, steps_per_s, world_size
        self._bound: dict[tuple, _WindowedDenoiser] = {}  # see _windowed

    # ---- set-up ---------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.model is not None

    def _build(self) -> None:
        """The networks of a resolved config (deterministic given ``config.seed``)."""
        c, tok = self.config, self.tokenizer
        self.vae = ChunkVAE(
            ChunkVAEConfig(
                chunk_size=c.chunk_size,
                latent_dim=c.latent_dim,
                hidden_dim=c.vae_hidden_dim,
                num_blocks=c.vae_blocks,
                kl_weight=c.kl_weight,
            ),
            seed=c.seed,
        )
        conditional = c.condition != "none"
        den = LatentDenoiser(
            LatentDenoiserConfig(
                latent_dim=c.latent_dim,
                hidden_dim=c.hidden_dim,
                depth=c.depth,
                num_heads=c.num_heads,
                cond_dim=c.cond_dim if conditional else 0,
                # the zoo's largest class count (the null token sits in slot 0 too)
                max_cond_slots=max(1, self.max_classes) if c.condition == "dataset" else 0,
                num_layer_kinds=len(tok.kind_names),
                prediction_type=c.prediction_type,
                timestep_freq_dim=min(256, c.hidden_dim),
            ),
            seed=c.seed + 1,
        )
        encoder: nn.Module | None = None
        if c.condition == "dataset":
            encoder = DatasetEncoder(
                DatasetEncoderConfig(
                    in_features=c.cond_features,
                    dim=c.cond_dim,
                    num_heads=c.num_heads,
                    num_inducing=8,
                    shot_layers=1,
                    class_layers=1,
                ),
                seed=c.seed + 2,
            )
        elif c.condition == "text":
            encoder = TextConditioner(
                TextConditionerConfig(in_dim=c.cond_features, dim=c.cond_dim), seed=c.seed + 2
            )
        self.model = ConditionalDenoiser(den, encoder)

    # ---- training -------------------------------------------------------------------------
    def fit(
        self,
        zoo: ModelZoo,
        out: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> D2NWG:
        """Train the generator on ``zoo``: stage 1 the ChunkVAE, stage 2 the latent diffusion.

        ``out`` receives checkpoints (``out/checkpoints/``), the loss log (``out/log.jsonl``)
        and nothing else; ``resume=True`` continues from the newest checkpoint there and ends
        with the same weights as an uninterrupted run. Under ``torchrun`` each process trains
        on its share of the zoo with DistributedDataParallel; rank 0 writes the files.
        With ``config.delta`` the generator learns the residuals ``model - base`` (``base``: a
        state dict of the zoo's architecture, required then).
        """
        if not isinstance(zoo, ModelZoo) or len(zoo) == 0:
            raise ConfigError(f"fit() needs a non-empty ModelZoo, got {type(zoo).__name__}")
        if resume and out is None:
            raise ConfigError("resume=True needs the out directory of the run to resume")
        device = resolve_device(self.config.device)
        ctx = DistContext.from_env(device)
        share = zoo.shard(ctx.rank, ctx.world_size) if ctx.active else zoo
        if len(share) == 0:
            raise ConfigError(
                f"rank {ctx.rank} has no model of the zoo's {len(zoo)} "
                f"(world size {ctx.world_size})"
            )
        first = zoo[0]
        self._check_condition_kind(first.condition)
        features = 0 if first.condition is None else first.condition.shape[-1]
        self._set_layout(first.state_dict, features)
        c, tok = self.config, self.tokenizer
        residual = self._residual_fn(base)
        # Statistics over the whole zoo (a cheap streaming pass), identical on every rank.
        tok.fit(map(residual, zoo.state_dicts()))
        tokens = tok.tokenize([residual(sd) for sd in share.state_dicts()])  # [M, T, C]
        raw = None
        if c.condition != "none":
            raw = RawConditions.stack(
                [item.condition for item in share], self.cond_rank, c.cond_features
            )
            self.max_classes = _global_max(ctx, raw.x.shape[1]) if self.cond_rank == 3 else 0
        else:
            self.max_classes = 0
        self._build()
        run = _Run(device, ctx, Checkpoints(out) if out is not None else None,
                   LossLog(out, ctx.is_main), progress)  # fmt: skip
        state = run.ckpt.latest() if (resume and run.ckpt) else None
        if not resume and ctx.is_main:
            run.log.clear()
            if run.ckpt is not None:
                run.ckpt.clear()
        ctx.barrier()
        if state is not None and state["world_size"] != ctx.world_size:
            raise ConfigError(
                f"the checkpoint was written by {state['world_size']} processes; "
                f"resume with the same number (now {ctx.world_size})"
            )
        t0 = time.perf_counter()
        self.vae.to(device)
        if state is None or state["stage"] == "vae":
            self._train_vae(tokens, run, state)
            state = None
        else:
            self.vae.load_state_dict(state["modules"]["vae"])
        self.history["vae_seconds"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        self.vae.eval()
        mu = self.vae.encode_mean(tokens.to(device), max_batch=65536)  # [M, T, d]
        sq = ctx.all_reduce_(
            torch.tensor([mu.double().square().sum().item(), mu.numel()], dtype=torch.float64)
        )
        self.latent_scale = float(1.0 / math.sqrt(sq[0] / sq[1]))
        latents = (mu * self.latent_scale).float()
        self.model.to(device)
        self._train_diffusion(latents, raw, run, state)
        self.history["diffusion_seconds"] = time.perf_counter() - t1
        self.history["world_size"] = ctx.world_size
        ctx.barrier()
        return self

    def _set_layout(self, template: Mapping[str, torch.Tensor], features: int) -> None:
        """Resolve the config for ``template``'s architecture; its tokenizer and windows."""
        c = self.config

        def tokenizer(chunk_size: int) -> WeightTokenizer:
            return WeightTokenizer.from_state_dict(
                template, chunk_size=chunk_size, granularity=c.granularity,
                include=c.include, exclude=c.exclude,
            )  # fmt: skip

        self.config = c.resolve(tokenizer(c.chunk_size or 64).num_params, features)
        self.tokenizer = tokenizer(self.config.chunk_size)
        self.windows = WindowLayout.from_tokenizer(self.tokenizer, self.config.window)
        self._bound.clear()

    @classmethod
    def untrained(
        cls,
        template: Mapping[str, torch.Tensor],
        config: D2NWGConfig | None = None,
        cond_features: int = 0,
        max_classes: int = 1,
    ) -> D2NWG:
        """A generator for ``template``'s architecture (meta tensors will do) with freshly
        initialized networks and identity normalization: what :meth:`fit` would train. For
        benchmarks and tests of generation's speed and memory, whose cost does not depend on
        the weights; its samples are not meaningful weights."""
        gen = cls(config)
        if gen.config.condition != "none" and cond_features < 1:
            raise ConfigError(f"a {gen.config.condition!r} generator needs cond_features >= 1")
        gen.cond_rank = CONDITION_RANKS[gen.config.condition]
        gen.max_classes = max_classes if gen.cond_rank == 3 else 0
        gen._set_layout(template, cond_features)
        gen._build()
        device = resolve_device(gen.config.device)
        gen.vae.to(device).eval()
        gen.model.to(device).eval()
        return gen

    def _residual_fn(self, base: Mapping[str, torch.Tensor] | None):
        """What the generator learns of a zoo model: the model, or ``model - base``."""
        base = self._base(base)
        if base is None:
            return lambda sd: sd

        def residual(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: (v - base[k].to(v)) if k in base else v for k, v in sd.items()}

        return residual

    def _base(self, base) -> dict[str, torch.Tensor] | None:
        """A delta generator's base (its tensors that the layout covers, checked by name,
        shape and dtype); None for a generator without delta, which must not be given one."""
        if not self.config.delta:
            if base is not None:
                raise ConfigError(
                    "base= is for D2NWGConfig(delta=True); this generator has delta=False"
                )
            return None
        if base is None:
            raise ConfigError("this generator has delta=True: pass base= (the base state dict)")
        if isinstance(base, nn.Module):
            base = base.state_dict()
        return {k: v.detach().cpu() for k, v in self.tokenizer.destinations(base).items()}

    def _check_condition_kind(self, condition: torch.Tensor | None) -> None:
        kind = self.config.condition
        if kind == "none":
            if condition is not None:
                raise ConfigError(
                    "the zoo's items have conditions but D2NWGConfig.condition='none'"
                )
            self.cond_rank = 0
            return
        self.cond_rank = CONDITION_RANKS[kind]
        if condition is None or condition.dim() != self.cond_rank:
            raise ConfigError(
                f"D2NWGConfig.condition={kind!r} needs zoo conditions "
                f"{CONDITION_SHAPES[self.cond_rank]}, "
                f"got {shape_of(condition) if condition is not None else None}"
            )

    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=lr, weight_decay=self.config.weight_decay, betas=(0.9, 0.99)
        )

    def _run_stage(
        self,
        stage: str,
        module: nn.Module,
        steps: int,
        lr: float,
        loss_fn: Callable[[nn.Module, torch.Generator], torch.Tensor],
        run: _Run,
        state: dict | None,
        ema: EMA | None = None,
    ) -> None:
        """The training loop both stages share: AdamW, warm-up + cosine, clipping, EMA,
        checkpoints and the loss log. ``loss_fn(trained, generator)`` computes one batch."""
        c, device, ctx, log = self.config, run.device, run.ctx, run.log
        gen = torch.Generator().manual_seed(
            c.seed * 1_000_003 + 7919 * ctx.rank + STAGES.index(stage)
        )
        trained = module
        if ctx.active:
            trained = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None
            )
        opt = self._optimizer(module.parameters(), lr)
        start = 0
        if state is not None:
            module.load_state_dict(state["modules"]["trained"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"][ctx.rank])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            start = state["step"]
            log.truncate_after(stage, start)
        warmup = int(c.warmup * steps)
        bar = _progress(run.progress and ctx.is_main, steps, start, stage)
        module.train()
        tick, tick_step = time.perf_counter(), start
        stage_t0 = tick
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(trained, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), c.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(module)
            done = step + 1
            if done % c.log_every == 0 or done == steps:
                now = time.perf_counter()
                value = float(ctx.all_reduce_(loss.detach().float().clone())) / ctx.world_size
                rate = (done - tick_step) / max(now - tick, 1e-9)
                log.write(
                    stage=stage,
                    step=done,
                    loss=value,
                    grad_norm=float(norm),
                    lr=opt.param_groups[0]["lr"],
                    steps_per_s=rate,
                )
                bar.set_postfix(loss=f"{value:.4f}", steps_per_s=f"{rate:.1f}")
                tick, tick_step = now, done
            bar.update(1)
            if run.ckpt is not None and (done % c.checkpoint_every == 0 or done == steps):
                self._checkpoint(run, stage, done, module, opt, gen, ema)
        bar.close()
        module.eval()
        if steps > start:
            self.history.setdefault("steps_per_s", {})[stage] = (steps - start) / (
                time.perf_counter() - stage_t0
            )

    def _checkpoint(
        self,
        run: _Run,
        stage: str,
        step: int,
        module: nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        ema: EMA | None,
    ) -> None:
        rng = run.ctx.all_gather(gen.get_state())  # every rank's generator, for an exact resume
        if run.ctx.is_main:
            run.ckpt.save(STAGES.index(stage), stage, step, {
                "stage": stage, "step": step, "world_size": run.ctx.world_size,
                "modules": {"trained": module.state_dict(), "vae": self.vae.state_dict()},
                "optimizer": opt.state_dict(), "rng": rng,
                "ema": None if ema is None else ema.state_dict(),
            })  # fmt: skip
        run.ctx.barrier()

    def _train_vae(self, tokens: torch.Tensor, run: _Run, state: dict | None) -> None:
        """Stage 1 on random real chunks of the zoo's tokens ``[M, T, C]``."""
        c, T = self.config, tokens.shape[1]
        flat = tokens.reshape(-1, c.chunk_size)  # [M*T, C]
        real = torch.nonzero(self.tokenizer.mask.any(1).repeat(tokens.shape[0])).squeeze(1)
        mask = self.tokenizer.mask.to(run.device)

        def loss_fn(trained: nn.Module, gen: torch.Generator) -> torch.Tensor:
            idx = real[torch.randint(real.numel(), (c.vae_batch,), generator=gen)]
            return trained(flat[idx].to(run.device), mask[(idx % T).to(run.device)], gen)

        self._run_stage("vae", _VAELoss(self.vae), c.vae_steps, c.vae_lr, loss_fn, run, state)

    def _train_diffusion(
        self, latents: torch.Tensor, raw: RawConditions | None, run: _Run, state: dict | None
    ) -> None:
        """Stage 2 on the scaled latents ``[M, T, d]`` and their raw conditions."""
        c, device, win = self.config, run.device, self.windows
        schedule = c.noise_schedule().to(device)
        M, d = latents.shape[0], latents.shape[2]
        # A zero latent after the last token: where the windows' padding slots point.
        latents = torch.cat([latents, latents.new_zeros(M, 1, d)], 1).to(device)
        raw = raw.to(device) if raw is not None else None
        layout = {k: None if v is None else v.to(device) for k, v in win.denoiser_layout().items()}
        index = win.index.to(device)
        ema = EMA(self.model, c.ema_decay)

        # Windowed, a step draws (model, window) pairs. One window per model would give a step
        # 1/windows of the tokens whole-model training sees: on the digits heads (4 windows)
        # that cost more at equal steps than the windows themselves (README, "What windows
        # cost"), so a step draws up to WINDOW_DRAWS windows per model.
        pairs = min(c.batch_size, M)
        if win.num_windows > 1:
            pairs = c.window_batch or pairs * min(win.num_windows, WINDOW_DRAWS)

        def loss_fn(trained: nn.Module, gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(M, (pairs,), generator=gen)
            w = torch.zeros_like(idx)  # (one window: no draw, the same stream as ever)
            if win.num_windows > 1:
                w = torch.randint(win.num_windows, (idx.numel(),), generator=gen)
            t = torch.randint(c.timesteps, (idx.numel(),), generator=gen)
            noise = torch.randn(idx.numel(), win.size, d, generator=gen)
            idx, w = idx.to(device), w.to(device)
            return trained(
                latents[idx[:, None], index[w]],
                t.to(device),
                noise.to(device),
                None if raw is None else raw[idx],
                schedule,
                c.cond_drop,
                gen,
                **{k: None if v is None else v[w] for k, v in layout.items()},
            )

        self._run_stage("diffusion", self.model, c.diffusion_steps, c.lr, loss_fn, run, state, ema)
        ema.copy_to(self.model)  # the generator samples with the averaged weights

    # ---- generation -----------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ConfigError("this D2NWG is not trained: call fit(zoo) or D2NWG.load(dir)")

    def _raw(self, condition) -> tuple[RawConditions | None, int]:
        """One task's condition or a batch of them -> (RawConditions, number of tasks)."""
        c = self.config
        if c.condition == "none":
            if condition is not None:
                raise ConfigError("this generator is unconditional: pass condition=None")
            return None, 1
        if condition is None:
            raise ConfigError(f"this generator is conditioned on {c.condition!r}: pass a condition")
        if isinstance(condition, torch.Tensor) and condition.dim() == self.cond_rank:
            condition = [condition]
        elif isinstance(condition, torch.Tensor) and condition.dim() == self.cond_rank + 1:
            condition = list(condition)
        if not isinstance(condition, (list, tuple)) or not condition:
            want = CONDITION_SHAPES[self.cond_rank]
            raise ShapeError(
                f"condition must be a tensor {want}, a batch of them, or a list; "
                f"got {shape_of(condition)}"
            )
        for i, x in enumerate(condition):
            if (
                isinstance(x, torch.Tensor)
                and x.is_floating_point()
                and not bool(torch.isfinite(x).all())
            ):
                raise ShapeError(f"condition {i} holds NaN or Inf")
        return RawConditions.stack(condition, self.cond_rank, c.cond_features), len(condition)

    def _start(self, condition, sampling: dict[str, Any], max_tasks: int = 0) -> _SampleRun:
        """Check the sampling options, encode the condition, put the networks on the device."""
        self._require_fitted()
        opts = SamplingOptions.parse(sampling)
        device = (
            torch.device(opts.device)
            if opts.device is not None
            else next(self.model.parameters()).device
        )
        self.model.to(device).eval()
        self.vae.to(device).eval()
        raw, tasks = self._raw(condition)
        if max_tasks and tasks > max_tasks:
            raise ShapeError(f"pass the condition of one task here, got {tasks} tasks")
        c, den = self.config, self.model.denoiser
        scale = c.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
        cond = uncond = None
        if raw is None:
            scale = 1.0  # nothing to guide towards
        else:
            with torch.no_grad():
                cond = self.model.encode(raw.to(device))
            if scale != 1.0:
                uncond = den.null_condition(1, device)
        W, C = self.windows.size, c.chunk_size
        return _SampleRun(
            opts=opts,
            device=device,
            tasks=tasks,
            cond=cond,
            uncond=uncond,
            guidance_scale=scale,
            schedule=c.noise_schedule().to(device),
            batch=opts.batch_windows or max(1, BATCH_ELEMENTS[device.type] // (W * C)),
        )

    @torch.no_grad()
    def _sample_windows(self, run: _SampleRun, jobs: torch.Tensor) -> torch.Tensor:
        """Decoded tokens ``[r, C]`` of the real slots of ``jobs [n, 3]`` = (task, sample,
        window) rows, job by job: one sampler run over the batch, then the VAE decodes the
        real latents only. The noise of (sample i, window w) comes from its own generator, so
        a window is the same whatever else shares its batch or process."""
        c, win, opts = self.config, self.windows, run.opts
        tasks, samples, windows = jobs.unbind(1)
        gens = [
            torch.Generator().manual_seed(_noise_seed(opts.seed, i, w))
            for i, w in zip(samples.tolist(), windows.tolist())
        ]
        x_T = torch.stack([torch.randn(win.size, c.latent_dim, generator=g) for g in gens])
        model = self._windowed(run.device, len(gens))
        model.load(win, windows)
        z = sample(
            model,
            x_T.to(run.device),
            run.schedule,
            sampler=opts.sampler or c.sampler,
            steps=opts.steps or c.sample_steps,
            eta=opts.eta,
            cond=None if run.cond is None else run.cond.index_select(tasks.to(run.device)),
            uncond=run.uncond,
            guidance_scale=run.guidance_scale,
            generator=gens,
            prediction_type=c.prediction_type,
            cuda_graph=opts.cuda_graph,
        )
        real = win.mask[windows]
        z = z.flatten(0, 1) if bool(real.all()) else z[real.to(run.device)]
        return self.vae.decode(z / self.latent_scale, max_batch=65536)

    def _windowed(self, device: torch.device, rows: int) -> _WindowedDenoiser:
        """One bound denoiser per (device, batch): CUDA graphs of it replay across batches."""
        key = (device, rows)
        if key not in self._bound:
            self._bound[key] = _WindowedDenoiser(self.model.denoiser, self.windows, rows, device)
        return self._bound[key]

    def _write_windows(
        self, run: _SampleRun, dests: Mapping[str, torch.Tensor], first: int, stop: int
    ) -> None:
        """Sample windows ``first .. stop - 1`` of sample 0 of task 0 and write them (added,
        for a delta generator) into ``dests``: one batch of streaming generation."""
        w = torch.arange(first, stop)
        jobs = torch.stack([torch.zeros_like(w), torch.zeros_like(w), w], 1)
        tokens = self._sample_windows(run, jobs)  # the windows' tokens, in token order
        start = self.windows.spans[first][0]
        self.tokenizer.write_range(dests, tokens, start, accumulate=self.config.delta)

    @torch.no_grad()
    def generate_tokens(
        self, condition=None, num_samples: int = 1, **sampling: Any
    ) -> torch.Tensor:
        """Generated chunk tokens ``[tasks * num_samples, T, C]`` (task-major order): sampled
        latents decoded by the VAE, ready for the tokenizer's detokenize (residuals from the
        base, for a delta generator). ``sampling``: see :class:`SamplingOptions`."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be an int >= 1, got {num_samples!r}")
        run = self._start(condition, sampling)
        win, T = self.windows, self.tokenizer.num_tokens
        B = run.tasks * num_samples
        grid = torch.cartesian_prod(
            torch.arange(run.tasks), torch.arange(num_samples), torch.arange(win.num_windows)
        ).reshape(-1, 3)  # task-major, then sample, then window
        out = torch.empty(B, T, self.config.chunk_size, device=run.device)
        for j in range(0, grid.shape[0], run.batch):
            jobs = grid[j : j + run.batch]
            rows = (jobs[:, 0] * num_samples + jobs[:, 1])[:, None].expand(-1, win.size)
            real = win.mask[jobs[:, 2]]
            index = win.index[jobs[:, 2]][real]
            out[rows[real].to(run.device), index.to(run.device)] = self._sample_windows(run, jobs)
        return out

    def generate(
        self,
        condition=None,
        num_samples: int = 1,
        base: Mapping[str, torch.Tensor] | nn.Module | None = None,
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
        base = self._base(base)
        tokens = self.generate_tokens(condition, num_samples, **sampling)
        sds = self.tokenizer.detokenize(tokens.float().cpu())
        if base is not None:
            for sd in sds:
                for spec in self.tokenizer.layers:
                    sd[spec.name].add_(base[spec.name].to(sd[spec.name]))
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
        a batch of ``batch_windows`` windows is sampled, decoded, de-normalized and written
        straight into the parameters, then the next, so the extra memory is one batch's,
        whatever the model's size. Tensors outside the generator's layout (``include`` /
        ``exclude``) are left untouched; a delta generator adds to what ``model`` holds (its
        base weights). ``distributed=True`` (under ``torchrun``): each rank writes its share
        of the batches (the same values one process writes there). Returns ``model``.
        """
        run = self._start(condition, sampling, max_tasks=1)
        dests = self.tokenizer.destinations(model)
        ctx = DistContext.from_env(run.device) if distributed else DistContext()
        for k, (first, stop) in enumerate(
            self.windows.batches(0, self.windows.num_windows, run.batch)
        ):
            if k % ctx.world_size == ctx.rank:
                self._write_windows(run, dests, first, stop)
        self.tokenizer.copy_aliases(dests)
        return model

    def generate_to_directory(
        self,
        directory: str | os.PathLike,
        condition=None,
        *,
        shard_size: int = 2**31,
        base: Mapping[str, torch.Tensor] | nn.Module | None = None,
        distributed: bool | None = None,
        **sampling: Any,
    ) -> dict[str, Any]:
        """Generate one set of weights (sample 0 of ``seed``) into safetensors shards of at
        most ``shard_size`` bytes (a larger tensor gets a shard of its own) with an index,
        the layout Hugging Face uses for large checkpoints: ``model-00001-of-0000N.safetensors``
        and ``model.safetensors.index.json`` (``weight_map``: name -> file; tied names are
        stored once, their aliases listed in the index's metadata). Streams: memory holds one
        shard and one batch of windows, so a model larger than memory can be generated.

        Under ``torchrun`` (or ``distributed=True``) each rank generates and writes its share
        of the shards, bit for bit what one process writes; rank 0 writes the index last.
        Each file is written to a temporary name and renamed. Returns the index.
        """
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be a number of bytes >= 1, got {shard_size!r}")
        base = self._base(base)
        run = self._start(condition, sampling, max_tasks=1)
        tok, win = self.tokenizer, self.windows
        # None: whatever torchrun says (from_env is one process without WORLD_SIZE > 1)
        ctx = DistContext() if distributed is False else DistContext.from_env(run.device)
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        shards = _shard_layers(tok.layers, shard_size)
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for k, layers in enumerate(shards):
            if k % ctx.world_size != ctx.rank:
                continue
            specs = [tok.layers[s] for s in layers]
            tensors = {
                spec.name: base[spec.name].to(run.device, spec.torch_dtype, copy=True)
                if base is not None
                else torch.empty(spec.shape, dtype=spec.torch_dtype, device=run.device)
                for spec in specs
            }
            start, stop = tok.token_range(layers)
            if stop > start:
                first, end = win.covering(start, stop)
                for a, b in win.batches(first, end, run.batch):
                    self._write_windows(run, tensors, a, b)
            save_safetensors(
                {n: t.cpu() for n, t in tensors.items()},
                os.path.join(directory, names[k]),
                metadata={"format": "pt"},
            )
        index = {
            "metadata": {
                "total_size": sum(s.numel * s.torch_dtype.itemsize for s in tok.layers),
                "generator": FORMAT,
                "delta": self.config.delta,
                "aliases": {a: s.name for s in tok.layers for a in s.aliases},
            },
            "weight_map": {
                tok.layers[s].name: names[k] for k, layers in enumerate(shards) for s in layers
            },
        }
        ctx.barrier()
        if ctx.is_main:
            save_json(os.path.join(directory, "model.safetensors.index.json"), index)
        ctx.barrier()
        return index

    # ---- files ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """``config.json`` plus safetensors files; each written atomically, config.json last."""
        self._require_fitted()
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, "tokenizer.safetensors"))
        save_module(self.vae, os.path.join(directory, "vae.safetensors"))
        save_module(self.model.denoiser, os.path.join(directory, "denoiser.safetensors"))
        if self.model.encoder is not None:
            save_module(self.model.encoder, os.path.join(directory, "encoder.safetensors"))
        save_json(
            os.path.join(directory, "config.json"),
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "latent_scale": self.latent_scale,
                "cond_rank": self.cond_rank,
                "max_classes": self.max_classes,
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> D2NWG:
        """A generator written by :meth:`save`; bad files raise :class:`FileFormatError`."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "config.json")
        meta = read_json(path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FileFormatError(f"{path}: not a d2nwg generator (format {FORMAT!r})")
        version = meta.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise FileFormatError(
                f"{path}: format_version {version!r}; this d2nwg reads 1..{FORMAT_VERSION}"
            )
        try:
            gen = cls(D2NWGConfig.from_dict(meta["config"]))
            gen.latent_scale = float(meta["latent_scale"])
            gen.cond_rank = int(meta["cond_rank"])
            gen.max_classes = int(meta["max_classes"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise FileFormatError(f"{path}: {exc}") from exc
        if not (math.isfinite(gen.latent_scale) and gen.latent_scale > 0):
            raise FileFormatError(f"{path}: latent_scale {gen.latent_scale} is not positive")
        gen.tokenizer = WeightTokenizer.load(os.path.join(directory, "tokenizer.safetensors"))
        gen.windows = WindowLayout.from_tokenizer(gen.tokenizer, gen.config.window)
        gen._build()
        load_module(gen.vae, os.path.join(directory, "vae.safetensors"))
        load_module(gen.model.denoiser, os.path.join(directory, "denoiser.safetensors"))
        if gen.model.encoder is not None:
            load_module(gen.model.encoder, os.path.join(directory, "encoder.safetensors"))
        gen.vae.to(device).eval()
        gen.model.to(device).eval()
        return gen


@dataclass
class _Run:
    """Where and how one fit runs: device, process group, checkpoints, log, progress bars."""

    device: torch.device
    ctx: DistContext
    ckpt: Checkpoints | None
    log: LossLog
    progress: bool


def _global_max(ctx: DistContext, value: int) -> int:
    return int(max(int(v) for v in ctx.all_gather(torch.tensor([value]))))


def _noise_seed(seed: int, sample: int, window: int) -> int:
    """The generator seed of one window of one sample (window 0: as before windows)."""
    return (int(seed) * 1_000_003 + sample + window * 0x9E3779B97F4A7C15) % (2**63)


def _shard_layers(layers, shard_size: int) -> list[list[int]]:
    """Consecutive layer indices in shards of at most ``shard_size`` bytes (a larger layer
    alone in its shard)."""
    shards: list[list[int]] = []
    size = 0
    for s, spec in enumerate(layers):
        nbytes = spec.numel * spec.torch_dtype.itemsize
        if not shards or size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


@dataclass
class SamplingOptions:
    """How :meth:`D2NWG.generate` and friends sample; None takes the config's default.

    ``seed``: sample i of a seed is the same whatever ``num_samples`` is; ``sampler``,
    ``steps``, ``guidance_scale`` (classifier-free guidance), ``eta`` (DDIM); ``device``;
    ``cuda_graph`` (capture the sampler loop once, replay it for every batch);
    ``batch_windows``: windows per sampler run (None: about ``BATCH_ELEMENTS`` decoded values
    on the device).
    """

    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    eta: float = 0.0
    device: str | torch.device | None = None
    cuda_graph: bool = False
    batch_windows: int | None = None

    @classmethod
    def parse(cls, sampling: dict[str, Any]) -> SamplingOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(sampling) - set(names))
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {unknown}; choose from {names}")
        opts = cls(**sampling)
        for name, least in (("seed", 0), ("batch_windows", 1)):
            v = getattr(opts, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ConfigError(f"{name} must be an int >= {least}, got {v!r}")
        return opts


@dataclass
class _SampleRun:
    """One generation call: options checked, condition encoded, schedule on the device."""

    opts: SamplingOptions
    device: torch.device
    tasks: int
    cond: Condition | None  # one row per task
    uncond: Condition | None  # the null condition, under guidance
    guidance_scale: float
    schedule: NoiseSchedule
    batch: int  # windows per sampler run


class _WindowedDenoiser:
    """The denoiser called as :func:`d2nwg.sample` calls a model, ``model(x, t, cond)``, on a
    batch of ``rows`` windows whose layout (positions, kinds, padding mask) sits in static
    buffers: :meth:`load` refills them for the next batch, so a CUDA graph captured on this
    object replays for every batch. Under guidance the batch comes twice (cond rows, then
    uncond rows), and so does the layout."""

    def __init__(self, den: LatentDenoiser, win: WindowLayout, rows: int, device: torch.device):
        self.den = den
        self.layout = {
            k: None if v is None else v.new_zeros(2, rows, *v.shape[1:], device=device)
            for k, v in win.denoiser_layout().items()
        }

    def load(self, win: WindowLayout, windows: torch.Tensor) -> None:
        for k, src in win.denoiser_layout().items():
            if src is not None:
                self.layout[k].copy_(src[windows].expand_as(self.layout[k]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        layout = {
            k: None if v is None else v.flatten(0, 1)[: x.shape[0]] for k, v in self.layout.items()
        }
        # bf16 on CUDA, as in training (the sampler's state stays in x's dtype); no autocast
        # weight cache, which CUDA-graph capture does not allow.
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda, cache_enabled=False):
            return self.den(x, t, cond, **layout).to(x.dtype)


class _VAELoss(nn.Module):
    """The ChunkVAE's training loss as a forward call (DDP syncs gradients of forward only)."""

    def __init__(self, vae: ChunkVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.vae.loss(x, mask, generator=gen)["loss"]


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )
