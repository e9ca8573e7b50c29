"""The generator's networks: the ChunkVAE, the latent denoiser and its condition encoder,
built from a resolved config (deterministic given ``config.seed``), and the two modules that
make each stage's loss a forward call (DDP syncs the gradients of forward only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d2nwg.generator.conditions import RawConditions
from d2nwg.generator.config import D2NWGConfig
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
)
from d2nwg.nn.denoiser import diffusion_loss
from d2nwg.schedule import NoiseSchedule
from d2nwg.seeds import network_seed
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.windows import WindowLayout


@dataclass
class Parts:
    """A generator's parts: its resolved config, the tokenizer and windows of the target
    architecture, the networks, the latent scale, and the condition's rank and class slots."""

    config: D2NWGConfig
    tokenizer: WeightTokenizer
    windows: WindowLayout
    vae: ChunkVAE
    model: ConditionalDenoiser
    latent_scale: float = 1.0
    cond_rank: int = 0  # 3 for dataset conditions, 2 for text, 0 for none
    max_classes: int = 0  # condition slots the denoiser embeds: dataset classes, text words
    adapter_config: dict | None = None  # the PEFT adapter config of a zoo of adapters

    def to(self, device: torch.device | str) -> Parts:
        """The networks on ``device``, in eval mode."""
        self.vae.to(device).eval()
        self.model.to(device).eval()
        return self


def build_networks(
    c: D2NWGConfig, num_layer_kinds: int, max_classes: int
) -> tuple[ChunkVAE, ConditionalDenoiser]:
    """The networks of a resolved config; ``max_classes``: the condition slots of a dataset
    generator (the zoo's largest class count) or of a text generator (its longest condition,
    in tokens; 0, as text generators saved before slots were given to text, builds none).

    Slot k's learned embedding is added to condition token k before cross-attention: it is
    how the denoiser ties class k's token (or word k) to output unit k. Text needs it because
    :class:`TextConditioner` embeds each token alone, with no position: without slots the
    words "zero one" and "one zero" would be the same condition.

    With ``c.class_rows`` the tensors it names get class k's token in the tokens of their row
    k instead, and there are no slots (see :class:`LatentDenoiser`): class order then means
    nothing to the denoiser, which is what lets it write a row for a class it never saw."""
    vae = ChunkVAE(
        ChunkVAEConfig(
            chunk_size=c.chunk_size,
            latent_dim=c.latent_dim,
            hidden_dim=c.vae_hidden_dim,
            num_blocks=c.vae_blocks,
            kl_weight=c.kl_weight,
        ),
        seed=network_seed(c.seed, 0),
    )
    conditional = c.condition != "none"
    den = LatentDenoiser(
        LatentDenoiserConfig(
            latent_dim=c.latent_dim,
            hidden_dim=c.hidden_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            cond_dim=c.cond_dim if conditional else 0,
            # the zoo's largest class count or text length (the null token sits in slot 0 too)
            max_cond_slots=0 if c.class_rows else cond_slots(c.condition, max_classes),
            class_rows=bool(c.class_rows),
            num_layer_kinds=num_layer_kinds,
            prediction_type=c.prediction_type,
            timestep_freq_dim=min(256, c.hidden_dim),
        ),
        seed=network_seed(c.seed, 1),
    )
    return vae, ConditionalDenoiser(den, build_encoder(c))


def cond_slots(condition: str, max_classes: int) -> int:
    """The denoiser's condition slots: dataset generators always have them (at least 1), text
    generators fitted since they were given slots have one per token of their longest zoo
    condition (older ones saved ``max_classes`` 0 and keep none), others none."""
    if condition == "dataset":
        return max(1, max_classes)
    return max_classes if condition == "text" else 0


def build_encoder(c: D2NWGConfig) -> nn.Module | None:
    """The condition encoder of a ``"dataset"`` or ``"text"`` generator (None for ``"none"``)."""
    if c.condition == "dataset":
        return DatasetEncoder(
            DatasetEncoderConfig(
                in_features=c.cond_features,
                dim=c.cond_dim,
                num_heads=c.num_heads,
                num_inducing=8,
                shot_layers=1,
                class_layers=1,
            ),
            seed=network_seed(c.seed, 2),
        )
    if c.condition == "text":
        return TextConditioner(
            TextConditionerConfig(in_dim=c.cond_features, dim=c.cond_dim),
            seed=network_seed(c.seed, 2),
        )
    return None


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
        cond_index: torch.Tensor | None = None,
        **layout: torch.Tensor | None,
    ) -> torch.Tensor:
        """The training loss of one batch (everything that needs a gradient, for DDP);
        ``cond_index [B]``: row i's condition is ``raw``'s row ``cond_index[i]`` (each model
        encoded once however many of its windows the batch holds; None: row i's is row i);
        ``layout``: the windows' ``positions``, ``layer_kinds`` and ``mask``."""
        cond = self.encode(raw)
        if cond is not None and cond_index is not None:
            cond = cond.index_select(cond_index)
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


class VAELoss(nn.Module):
    """The ChunkVAE's training loss as a forward call (DDP syncs gradients of forward only)."""

    def __init__(self, vae: ChunkVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.vae.loss(x, mask, generator=gen)["loss"]
