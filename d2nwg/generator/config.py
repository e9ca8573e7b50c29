"""``D2NWGConfig``: everything that defines a generator, its checks, its JSON form, and the
rules that derive the fields left at 0 from the zoo (:meth:`D2NWGConfig.resolve`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError
from d2nwg.nn.io import JSONConfig
from d2nwg.sampling import SAMPLERS
from d2nwg.schedule import PREDICTION_TYPES, NoiseSchedule
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.training import LoopConfig
from d2nwg.windows import WindowLayout

CONDITIONS = ("dataset", "text", "none")
CONDITION_RANKS = {"dataset": 3, "text": 2, "none": 0}  # dims of one task's raw condition
CONDITION_SHAPES = {3: "[classes, shots, F]", 2: "[L, E]"}  # raw condition of one task, by rank
# Default windows per sampler run: about this many decoded values (32 MiB of float32 on a
# CPU, where streaming's extra memory should stay small next to the model; 1 GiB on a GPU,
# where larger batches keep it busy).
BATCH_ELEMENTS = {"cpu": 2**23, "cuda": 2**28}
# Windows drawn per model of a diffusion training step (the default of window_batch).
WINDOW_DRAWS = 4
# The default latent width: a chunk's C values up to this many, compressed beyond. Weights
# are not redundant the way pixels are: on a zoo of whole 3,301-weight MLPs (64-value chunks)
# a C/4 latent lost 0.034 of the zoo's accuracy in one encode/decode round trip (0.966 of it,
# reconstruction errors 40-70% of the zoo's spread per layer), a C/2 one 0.028, C/1 0.007.
# The denoiser's cost hardly depends on d (one projection in, one out), so small chunks pay
# nothing for it; chunks of 256 and more are compressed 4x and more, as before.
LATENT_MAX = 64
# The default diffusion steps. On the whole-MLP digits zoo (300 models of 56 tokens, class
# rows) 1000 steps generated as well as 2000 (best / zoo 0.986 / 0.984 / 0.917 on seen /
# unseen / novel tasks against 0.984 / 0.983 / 0.884; the loss is flat after about 1000) in
# half the time, which is what brings that demo inside 10 minutes on a 2-core CPU.
DIFFUSION_STEPS = 1000


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
    # globs of tensors whose dim-0 rows follow the condition's classes (a classifier's output
    # weight): each row starts a token, the tokens of row k get class k's condition token,
    # and there are no slot embeddings (README)
    class_rows: list | None = None
    window: int = 0  # W: tokens per denoiser sample (0: the whole model is one window)
    window_stride: int = 0  # tokens between window starts (0: W // 2, overlapping windows
    # whose predictions are averaged; W: windows that do not overlap, each sampled alone)
    window_batch: int = 0  # (model, window) pairs per diffusion step when windowed (0: the
    # step's models x their windows, at most WINDOW_DRAWS each; see stages.train_diffusion)
    delta: bool = False  # learn residuals from a base model: weights = base + generated
    # stage 1: ChunkVAE
    latent_dim: int = 0  # d (0: C up to 64, see LATENT_MAX)
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
    diffusion_steps: int = 0  # 0: DIFFUSION_STEPS
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
    # sampling defaults, chosen from the quality-against-steps curve (docs/steps/): UniPC at
    # 10 steps is within 0.005 of DPM-Solver++(2M) at 25 on every split of the digits demo
    # (within 0.002), at 2.5x fewer denoiser passes
    sampler: str = "unipc"
    sample_steps: int = 10
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
        for name in ("include", "exclude", "class_rows"):
            patterns = getattr(self, name)
            if patterns is not None and not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"D2NWGConfig.{name} must be glob patterns, got {patterns!r}")
        if self.class_rows and self.condition == "none":
            raise ConfigError("D2NWGConfig.class_rows needs a condition whose tokens are classes")
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
            c.window_stride = c.window_stride or max(1, c.window // 2)
        c.latent_dim = c.latent_dim or min(LATENT_MAX, c.chunk_size)
        c.hidden_dim = c.hidden_dim or (128 if tokens <= 64 else 256)
        c.depth = c.depth or (4 if tokens <= 64 else 6)
        c.cond_dim = c.cond_dim or 64
        c.cond_features = c.cond_features or cond_features
        c.vae_steps = c.vae_steps or 1000
        c.diffusion_steps = c.diffusion_steps or DIFFUSION_STEPS
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

    def loop(self) -> LoopConfig:
        """What the training loop takes of this config (both stages)."""
        return LoopConfig(
            seed=self.seed,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            grad_clip=self.grad_clip,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
        )


def resolve_for(
    config: D2NWGConfig, template: Mapping[str, torch.Tensor], cond_features: int
) -> tuple[D2NWGConfig, WeightTokenizer, WindowLayout]:
    """``config`` resolved for ``template``'s architecture (meta tensors will do), with the
    tokenizer and windows of that resolved config."""

    # class rows start a token each (the model granularity's tokens mix layers: none there)
    row_tokens = config.class_rows if config.granularity == "layer" else None

    def tokenizer(chunk_size: int) -> WeightTokenizer:
        return WeightTokenizer.from_state_dict(
            template, chunk_size=chunk_size, granularity=config.granularity,
            include=config.include, exclude=config.exclude, row_tokens=row_tokens,
        )  # fmt: skip

    resolved = config.resolve(tokenizer(config.chunk_size or 64).num_params, cond_features)
    tok = tokenizer(resolved.chunk_size)
    return (
        resolved,
        tok,
        WindowLayout.from_tokenizer(
            tok, resolved.window, resolved.window_stride, resolved.class_rows
        ),
    )
