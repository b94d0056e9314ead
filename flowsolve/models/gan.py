"""Discriminator and generator networks (Tables 4, 6, 7). The GAN losses a, b, c of Eq. 15–16 live
with the discriminator field (`fields.discriminator`) and are re-exported here."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..fields.discriminator import LOSSES, GANLoss, gradient_penalty
from .._checks import seeded_generator
from .nets import FourierEmbedding, make_activation
from .protocol import GeneratorModel
from ..errors import ArgumentError

__all__ = ["GANLoss", "LOSSES", "Discriminator", "ConvDiscriminator", "Generator", "DCGANGenerator", "gradient_penalty"]


def _init_normal(module: nn.Module, gain: float) -> None:
    """DCGAN initialisation (Tables 4, 6, 7: normal, gain 0.02): weights N(0, gain²), biases 0;
    batch-norm scales N(1, gain²)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def _image_shape(data_shape, who: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in data_shape)
    if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
        raise ArgumentError(f"data_shape: {who} needs images (C, H, W) with H, W ≥ 4, got {shape}")
    return shape


def _resolutions(size: int) -> list[int]:
    """Sizes from the base resolution up to `size` by doubling: the base is `size` halved while it
    stays even and above 4 (8 → [4, 8], 32 → [4, 8, 16, 32], 28 → [7, 14, 28])."""
    sizes = [size]
    while sizes[0] % 2 == 0 and sizes[0] > 4:
        sizes.insert(0, sizes[0] // 2)
    return sizes


def _projection(num_classes: int, width: int) -> nn.Embedding | None:
    """The class embedding of a projection discriminator (Miyato & Koyama 2018), f(x, y) = ψ(h) +
    ⟨E[y], h⟩ on the last hidden features h; zero at init (the conditional term starts at 0)."""
    if not num_classes:
        return None
    emb = nn.Embedding(int(num_classes), width)
    nn.init.zeros_(emb.weight)
    return emb


def _labels_row(table: nn.Embedding | None, class_labels, n: int, who: str = "discriminator") -> torch.Tensor | None:
    """The class embeddings of `class_labels` (one per row, or one broadcast), None for an
    unconditional network; a clear error when labels and network disagree."""
    if table is None:
        if class_labels is not None:
            raise ArgumentError(f"class_labels: this {who} is unconditional (num_classes=0)")
        return None
    if class_labels is None:
        raise ArgumentError(f"class_labels: this {who} is class-conditional; pass class_labels=")
    y = torch.as_tensor(class_labels, device=table.weight.device).long().reshape(-1).expand(n)
    return table(y)


def _project(value: torch.Tensor, h: torch.Tensor, proj: nn.Embedding | None, class_labels) -> torch.Tensor:
    e = _labels_row(proj, class_labels, len(h))
    return value if e is None else value + (h * e.to(h.dtype)).sum(1)


class Discriminator(ModelMixin, ConfigMixin):
    """f(x[, t]) → (batch,): an MLP (Table 4/6: width 512, depth 4, leaky ReLU 0.2, normal init with
    std 0.02); with `time_conditioned`, a Fourier embedding of t (size 128, scale 16) is concatenated
    to the input (Discriminator Flows, Table 4)."""

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        width: int = 512,
        depth: int = 4,
        time_conditioned: bool = True,
        emb_size: int = 128,
        emb_scale: float = 16.0,
        init_gain: float | None = 0.02,
        seed: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.embed = FourierEmbedding(emb_size, emb_scale, seed) if time_conditioned else None
        self.label_proj = _projection(num_classes, width)
        d_in = dim + (emb_size if time_conditioned else 0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.LeakyReLU(0.2)]
            d_in = width
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)
        if init_gain:
            _init_normal(self.net, init_gain)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (int(self.config.dim),)

    def _first_bias(self, t, flat: torch.Tensor):
        """The first layer's contribution of the time embedding: one row when t is the same for the
        whole batch (the particle flow), one per sample otherwise."""
        lin = self.net[0]
        assert isinstance(lin, nn.Linear) and self.embed is not None
        dim = self.config.dim
        tt = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).reshape(-1)
        if tt.numel() > 1 and bool((tt == tt[0]).all()):
            tt = tt[:1]
        return self.embed(tt).to(flat.dtype) @ lin.weight[:, dim:].T + lin.bias

    def _layers(self, dtype: torch.dtype | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of every Linear layer, detached; in `dtype` through a copy that is refreshed
        only when the parameters change (their version counters), i.e. once per optimizer step."""
        lins = [m for m in self.net if isinstance(m, nn.Linear)]
        if dtype is None or dtype == lins[0].weight.dtype:
            return [(m.weight.detach(), m.bias.detach()) for m in lins]
        key = (dtype, tuple((id(p), p._version) for m in lins for p in (m.weight, m.bias)))
        cache = self.__dict__.get("_low_precision")
        if cache is None or cache[0] != key:
            cache = (key, [(m.weight.detach().to(dtype), m.bias.detach().to(dtype)) for m in lins])
            self.__dict__["_low_precision"] = cache
        return cache[1]

    def value_and_input_grad(
        self, x: torch.Tensor, t, dtype: torch.dtype | None = None, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x, t), ∇_x f(x, t)) by a hand-written backward pass through the leaky-ReLU MLP: the
        inner loop of Discriminator Flows (Alg. 3) without autograd bookkeeping; no parameter grads.
        With `dtype` (e.g. torch.bfloat16) the 512-wide layers run in that precision; the time
        embedding, the first layer's input and the results stay in x's dtype."""
        flat = x.reshape(len(x), -1)
        dim = flat.shape[1]
        layers = self._layers(dtype)
        low = layers[0][0].dtype
        with torch.no_grad():
            lin0 = self.net[0]
            assert isinstance(lin0, nn.Linear)
            w1 = lin0.weight
            if self.embed is not None:
                z = flat @ w1[:, :dim].T + self._first_bias(t, flat)
            else:
                z = flat @ w1.T + lin0.bias
            z = z.to(low)
            masks = []
            proj = _labels_row(self.label_proj, class_labels, len(x))
            for w, b in layers[1:]:
                mask = z > 0
                masks.append(mask)
                h = torch.where(mask, z, 0.2 * z)
                z = h @ w.T + b
            if proj is not None:  # projection term ⟨E[y], h⟩: its input gradient adds E[y]
                z = z + (h * proj.to(h.dtype)).sum(1, keepdim=True)
            value = z.squeeze(1).to(x.dtype)
            g = layers[-1][0].expand(len(x), -1)
            if proj is not None:
                g = g + proj.to(g.dtype)
            for (w, _), mask in zip(reversed(layers[1:-1]), reversed(masks[1:])):
                g = torch.where(mask, g, 0.2 * g) @ w
            g = torch.where(masks[0], g, 0.2 * g).to(flat.dtype) @ w1[:, :dim]
        return value, g.reshape(x.shape)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float | None = None, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        if self.embed is not None:
            if t is None:
                raise ArgumentError("t: this discriminator is time-conditioned; pass t")
            t = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).reshape(-1).expand(len(x))
            flat = torch.cat([flat, self.embed(t).to(flat.dtype)], dim=1)
        h = self.net[:-1](flat)
        return _project(self.net[-1](h).squeeze(1), h, self.label_proj, class_labels)


class ConvDiscriminator(ModelMixin, ConfigMixin):
    """f(x[, t]) → (batch,) for images (C, H, W): DCGAN-style stride-2 convolutions with leaky ReLU
    0.2 down to the base resolution, then a linear head (Tables 4, 6: DCGAN discriminator, width 64).
    With `time_conditioned` (Discriminator Flows, Table 4), a Fourier embedding of t modulates every
    block by FiLM, h ← h·(1 + γ(t)) + β(t) (Perez et al. 2018). No normalisation layer, so the
    gradient penalty and the input gradient of Eq. 20 are per sample. `activation="silu"` makes f
    smooth, so that its input gradient (the Discriminator Flow's velocity) varies continuously with x
    instead of being piecewise constant."""

    @register_to_config
    def __init__(
        self,
        data_shape: tuple[int, int, int] = (1, 8, 8),
        width: int = 64,
        time_conditioned: bool = True,
        emb_size: int = 128,
        emb_scale: float = 16.0,
        init_gain: float | None = 0.02,
        seed: int = 0,
        num_classes: int = 0,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(data_shape, "ConvDiscriminator")
        sizes = _resolutions(min(h, w))
        chans = [width * 2**k for k in range(len(sizes))]
        self.stem = nn.Conv2d(c, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.embed = FourierEmbedding(emb_size, emb_scale, seed) if time_conditioned else None
        self.film = nn.ModuleList(nn.Linear(emb_size, 2 * ch) for ch in chans) if time_conditioned else None
        self.act = make_activation(activation)
        self.head = nn.Linear(chans[-1] * (h >> (len(sizes) - 1)) * (w >> (len(sizes) - 1)), 1)
        self.label_proj = _projection(num_classes, self.head.in_features)
        if init_gain:
            _init_normal(self, init_gain)
            if self.film is not None:
                for lin in self.film:  # start as the identity modulation
                    assert isinstance(lin, nn.Linear)
                    nn.init.zeros_(lin.weight)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.config.data_shape)

    def _modulate(self, hid: torch.Tensor, k: int, emb: torch.Tensor | None) -> torch.Tensor:
        if emb is not None and self.film is not None:
            scale, shift = self.film[k](emb).chunk(2, dim=1)
            hid = hid * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.act(hid)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float | None = None, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = None
        if self.embed is not None:
            if t is None:
                raise ArgumentError("t: this discriminator is time-conditioned; pass t")
            tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
            emb = self.embed(tt).to(x.dtype)
        hid = self._modulate(self.stem(x), 0, emb)
        for k, conv in enumerate(self.blocks, start=1):
            hid = self._modulate(conv(hid), k, emb)
        h = hid.flatten(1)
        return _project(self.head(h).squeeze(1), h, self.label_proj, class_labels)


class _Sampling(GeneratorModel):
    """One-evaluation sampling shared by the generators: z ~ N(0, I_latent) from a seed, then g(z)."""

    config: Any  # diffusers' ConfigMixin
    label_embed: nn.Embedding | None

    @property
    def data_shape(self) -> tuple[int, ...]:  # type: ignore[override]  # read from the config
        return tuple(self.config.data_shape)

    def latents(self, n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.config.latent, generator=generator or seeded_generator(seed))

    @property
    def conditioning(self) -> dict:  # type: ignore[override]  # read from the config
        k = getattr(self.config, "num_classes", 0)
        return {"class_labels": {"classes": k}} if k else {}

    def _label_embedding(self, z: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """z plus the embedding of its class (a class-conditional generator), else z."""
        e = _labels_row(self.label_embed, class_labels, len(z), "generator")
        return z if e is None else z + e


class Generator(_Sampling, ModelMixin, ConfigMixin):
    """g_θ(z): an MLP from a latent z ~ N(0, I_latent) to data (Tables 6, 7: latent 128, width 512,
    depth 4), with an optional final tanh for data in [−1, 1]."""

    @register_to_config
    def __init__(
        self,
        data_shape: tuple[int, ...] = (2,),
        latent: int = 128,
        width: int = 512,
        depth: int = 4,
        activation: str = "relu",
        tanh: bool = False,
        init_gain: float | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.label_embed = nn.Embedding(num_classes, latent) if num_classes else None
        act = make_activation(activation)  # stateless: one instance serves every layer
        dim = int(torch.tensor(list(data_shape)).prod())
        layers: list[nn.Module] = []
        d_in = latent
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), act]
            d_in = width
        layers.append(nn.Linear(d_in, dim))
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        if init_gain:
            _init_normal(self.net, init_gain)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self._label_embedding(z, class_labels)).reshape(len(z), *self.data_shape)


class DCGANGenerator(_Sampling, ModelMixin, ConfigMixin):
    """g_θ(z) for images (Table 7, MNIST: DCGAN, width 64, ReLU, batch norm, normal init with gain
    0.02): a linear map of z to the base resolution, then nearest-neighbour ×2 upsampling with 3×3
    convolutions (batch norm, ReLU) up to (H, W), and a 3×3 convolution with tanh to C channels."""

    @register_to_config
    def __init__(
        self,
        data_shape: tuple[int, int, int] = (1, 8, 8),
        latent: int = 128,
        width: int = 64,
        init_gain: float | None = 0.02,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.label_embed = nn.Embedding(num_classes, latent) if num_classes else None
        c, h, w = _image_shape(data_shape, "DCGANGenerator")
        sizes = _resolutions(min(h, w))
        up = len(sizes) - 1
        chans = [width * 2 ** (up - k) for k in range(len(sizes))]
        self.base = (chans[0], h >> up, w >> up)
        self.project = nn.Sequential(nn.Linear(latent, chans[0] * self.base[1] * self.base[2]))
        self.norm0 = nn.BatchNorm2d(chans[0])
        layers: list[nn.Module] = [nn.Conv2d(chans[0], chans[0], 3, padding=1), nn.BatchNorm2d(chans[0]), nn.ReLU()]
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(a, b, 3, padding=1),
                nn.BatchNorm2d(b),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(chans[-1], c, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        if init_gain:
            _init_normal(self, init_gain)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self._label_embedding(z, class_labels)
        hid = torch.relu(self.norm0(self.project(z).view(len(z), *self.base)))
        return self.body(hid)
