"""A per-token diffusion head (MAR, Li et al. 2024; the continuous-token side of Transfusion): instead of regressing
each visual token to the mean of what could follow (`mlp` / `linear` heads, MetaMorph, Emu), the LLM's hidden state
conditions a small denoiser that *samples* the token.

Training, for each response slot: the target token z (Dv,) scaled to unit variance per feature (x0 = z sqrt(Dv), since
an L2-normalised token has features of about 1 / sqrt(Dv)), noise e ~ N(0, I), t ~ U(0, 1), and the rectified-flow
(flow-matching) path x_t = (1 - t) x0 + t e, whose velocity is v = e - x0:

    loss = mean || v_theta(x_t, t, h) - (e - x0) ||^2 / Dv          (MSE per feature)

with `batch_mul` draws of (e, t) per slot (MAR draws 4: the denoiser is cheap next to the LLM that made h), and
the condition h replaced by a learned null condition with probability `condition_dropout`, for guidance.

Sampling: Euler steps of the ODE dx/dt = v from t = 1 (x ~ N(0, temperature^2 I)) to t = 0, `steps` of them; with
guidance s != 1, v = v(x, t, null) + s (v(x, t, h) - v(x, t, null)). The result is divided by sqrt(Dv) (and
L2-normalised when the model's tokens are).

The denoiser is MAR's `SimpleMLPAdaLN`: Linear(Dv, W), then `depth` residual blocks (LayerNorm modulated by the
condition c = time embedding + Linear(h): shift, scale, gate; Linear-SiLU-Linear), then a modulated LayerNorm and
a zero-initialised Linear(W, Dv).

    >>> head = DiffusionHead(hidden_size=64, vision_size=16, width=32, depth=2)
    >>> head(torch.randn(5, 64), torch.randn(5, 16)).shape       # per-slot losses (`loss`)
    torch.Size([5])
    >>> head(torch.randn(3, 64), steps=8).shape                 # sampled tokens (`sample`)
    torch.Size([3, 16])
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) times in [0, 1] -> (N, dim) sinusoidal features (of 1000 t, the scale DDPM-style embeddings expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """(.., H) hidden states -> (.., Dv) visual tokens, sampled by a flow-matching denoiser (see the module docstring).

    Args:
        hidden_size: H, the LLM's width (the condition).
        vision_size: Dv, the visual tokens' width.
        width: W, the denoiser's width (MAR: 1024 for its 16-dim tokens; here it also has to read H).
        depth: residual blocks (MAR: 3 to 12).
        batch_mul: noise draws per slot in training.
        condition_dropout: probability of the null condition in training (0: no guidance possible).
        steps, temperature, guidance_scale: the sampling defaults; `sample` takes each as an argument too.
    """

    def __init__(
        self,
        hidden_size: int,
        vision_size: int,
        width: int = 1024,
        depth: int = 3,
        batch_mul: int = 4,
        condition_dropout: float = 0.1,
        steps: int = 25,
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if min(width, depth, batch_mul, steps) < 1:
            raise ValueError(
                f"width, depth, batch_mul and steps must be >= 1, got {width}, {depth}, {batch_mul}, {steps}"
            )
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout is a probability in [0, 1), got {condition_dropout}")
        self.vision_size, self.width, self.batch_mul = vision_size, width, batch_mul
        self.condition_dropout = condition_dropout
        self.steps, self.temperature, self.guidance_scale = steps, temperature, guidance_scale
        self.condition = nn.Linear(hidden_size, width)
        self.null_condition = nn.Parameter(torch.zeros(width))
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.input = nn.Linear(vision_size, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, vision_size)

    def zero_initialised(self) -> list[nn.Linear]:
        """The layers adaLN-Zero starts at zero, so that every block starts as the identity and the output at zero
        (DiT, MAR); the model's `_init_weights` zeroes them after its N(0, 0.02) initialisation of the rest."""
        blocks = [block for block in self.blocks if isinstance(block, _ResBlock)]
        layers = [block.modulation[-1] for block in blocks] + [self.final_modulation[-1], self.output]
        return [layer for layer in layers if isinstance(layer, nn.Linear)]

    @property
    def scale(self) -> float:
        """sqrt(Dv): unit-norm tokens times this have features of unit variance, the noise's scale."""
        return math.sqrt(self.vision_size)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """v_theta(x (N, Dv), t (N,), condition (N, W) already projected) -> (N, Dv)."""
        c = condition + self.time(timestep_embedding(t, 256).to(condition.dtype))  # (N, W)
        h = self.input(x.to(condition.dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)

    def loss(
        self, hidden_states: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(M, H) conditions and (M, Dv) target tokens -> (M,) flow-matching losses (MSE per feature, averaged over
        the `batch_mul` draws)."""
        m = targets.shape[0]
        x0 = (targets.float() * self.scale).repeat(self.batch_mul, 1)  # (M * b, Dv)
        condition = self.condition(hidden_states).repeat(self.batch_mul, 1)  # (M * b, W)
        device = x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.rand(x0.shape[0], generator=generator, device=device)  # (M * b,)
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(x0.shape[0], generator=generator, device=device) < self.condition_dropout
            condition = torch.where(dropped[:, None], self.null_condition.to(condition.dtype), condition)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        error = self.velocity(x_t, t, condition).float() - (noise - x0)  # (M * b, Dv)
        return error.square().mean(dim=-1).reshape(self.batch_mul, m).mean(dim=0)  # (M,)

    @torch.no_grad()
    def sample(
        self,
        hidden_states: torch.Tensor,
        steps: int | None = None,
        temperature: float | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(.., H) conditions -> (.., Dv) tokens: Euler steps of the flow from noise to data (defaults: the head's)."""
        steps = self.steps if steps is None else steps
        temperature = self.temperature if temperature is None else temperature
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if steps < 1 or temperature < 0:
            raise ValueError(f"sampling needs steps >= 1 and temperature >= 0, got {steps} and {temperature}")
        lead = hidden_states.shape[:-1]
        condition = self.condition(hidden_states.reshape(-1, hidden_states.shape[-1]))  # (N, W)
        n = condition.shape[0]
        guided = guidance_scale != 1.0
        if guided:
            condition = torch.cat([condition, self.null_condition.to(condition.dtype).expand(n, -1)])  # [c, null]
        x = torch.randn((n, self.vision_size), generator=generator, device=condition.device) * temperature
        times = torch.linspace(1.0, 0.0, steps + 1, device=condition.device)
        for t, t_next in itertools.pairwise(times):
            model_input = torch.cat([x, x]) if guided else x
            v = self.velocity(model_input, t.expand(model_input.shape[0]), condition).float()
            if guided:
                conditional, unconditional = v.chunk(2)
                v = unconditional + guidance_scale * (conditional - unconditional)
            x = x + (t_next - t) * v
        return (x / self.scale).reshape(*lead, self.vision_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        temperature: float | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """With `targets`: the (M,) training losses (`loss`); without: sampled tokens (`sample`). Both go through
        `forward` so that wrappers which gather a module's weights around its forward (FSDP2) see every call."""
        if targets is not None:
            return self.loss(hidden_states, targets, generator)
        return self.sample(hidden_states, steps, temperature, guidance_scale, generator)


__all__ = ["DiffusionHead", "timestep_embedding"]
