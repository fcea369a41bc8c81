"""Planted ground truth for crosscoders: paired (base, edited) activations built from known directions.

The one home of planted crosscoder data, for the tests and ``benchmarks/bench_quality.py`` alike (a
benchmark cannot import ``tests/``, and the package is what both import without path tricks). Only
torch: the benchmark also imports it in a child process next to the science-of-finetuning trainer,
whose package has the same name as the dictionary_learning we depend on (``mneme_plugin``'s imports
are lazy, so importing this module loads neither).

A planted feature i has a base direction b_i and an edited direction e_i (either may be zero) and
fires independently with probability ``p_active`` at strength a ~ U(strength_range) in both models:
x_base = sum_i a_i b_i + noise, x_edited = sum_i a_i e_i + noise, then model l is multiplied by
``model_scales[l]`` (unequal activation scales). Kinds of feature:

- shared: e_i = renorm(b_i + edit_noise * n) (the edit moves the direction a little);
- amplified / suppressed: a shared direction whose edited strength is ``amplify`` / ``suppress`` times the base one;
- base_only: e_i = 0 (the edit removed it); edited_only: b_i = 0 (the edit added it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

KINDS = ("shared", "amplified", "suppressed", "base_only", "edited_only")
# The attribution classes each planted kind may honestly come out as.
EXPECTED_CLASSES = {
    "shared": ("shared",),
    "amplified": ("amplified", "edited_only"),
    "suppressed": ("suppressed", "base_only"),
    "base_only": ("base_only", "suppressed"),
    "edited_only": ("edited_only", "amplified"),
}


@dataclass
class PlantedSpec:
    d: int = 32
    counts: dict[str, int] = field(
        default_factory=lambda: {"shared": 48, "amplified": 0, "suppressed": 0, "base_only": 16, "edited_only": 16}
    )
    p_active: float = 0.02
    strength_range: tuple[float, float] = (0.5, 2.0)
    noise: float = 0.01
    edit_noise: float = 0.3
    amplify: float = 2.0
    suppress: float = 0.35
    model_scales: tuple[float, float] = (1.0, 1.0)
    seed: int = 0

    @property
    def n_features(self) -> int:
        return sum(self.counts.values())

    @property
    def true_l0(self) -> float:
        return self.n_features * self.p_active


class PlantedData:
    """Directions of a ``PlantedSpec`` and an endless, seeded stream of (B, 2, d) batches from them."""

    def __init__(self, spec: PlantedSpec) -> None:
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        d, n = spec.d, spec.n_features
        base = torch.randn(n, d, generator=gen)
        base = base / base.norm(dim=1, keepdim=True)
        moved = base + spec.edit_noise * torch.randn(n, d, generator=gen) / math.sqrt(d)
        edited = moved / moved.norm(dim=1, keepdim=True)
        kinds: list[str] = []
        for kind in KINDS:
            kinds += [kind] * spec.counts.get(kind, 0)
        self.kinds = kinds
        for i, kind in enumerate(kinds):
            if kind == "amplified":
                edited[i] *= spec.amplify
            elif kind == "suppressed":
                edited[i] *= spec.suppress
            elif kind == "base_only":
                edited[i] = 0.0
            elif kind == "edited_only":
                base[i] = 0.0
        self.directions = torch.stack([base, edited], dim=1)  # (n, 2, d)
        self.model_scales = torch.tensor(spec.model_scales, dtype=torch.float32)

    def sample(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        return self.sample_with_codes(rows, generator)[0]

    def sample_with_codes(self, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (rows, 2, d), the true codes (rows, n_features)): x = codes @ directions + noise, scaled per model."""
        spec = self.spec
        n = spec.n_features
        fires = torch.rand(rows, n, generator=generator) < spec.p_active
        low, high = spec.strength_range
        strength = low + (high - low) * torch.rand(rows, n, generator=generator)
        codes = fires * strength
        x = torch.einsum("bn,nld->bld", codes, self.directions)
        x = x + spec.noise * torch.randn(rows, 2, spec.d, generator=generator)
        return x * self.model_scales[None, :, None], codes

    def scaled_directions(self) -> torch.Tensor:
        """The directions (n, 2, d) as they appear in x (times ``model_scales``): codes @ them + noise = x."""
        return self.directions * self.model_scales[None, :, None]

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, generator)

    def scale_factors(self, rows: int = 20_000, seed: int = 12_345) -> torch.Tensor:
        """Per-model factors s_l with E||s_l x_l|| = sqrt(d), as an activation store computes them."""
        x = self.sample(rows, torch.Generator().manual_seed(seed))
        return math.sqrt(self.spec.d) / x.norm(dim=-1).mean(dim=0)


@dataclass
class PlantedSample:
    """A fixed sample of planted rows: ``x`` (n, 2, d), ``directions`` (n_features, 2, d) (zero on the
    absent side) and each feature's ``kind``."""

    x: torch.Tensor
    directions: torch.Tensor
    kind: list[str]


def planted_pair_data(
    n: int = 60_000,
    d: int = 32,
    n_shared: int = 16,
    n_base_only: int = 6,
    n_edited_only: int = 6,
    # Expected active features per token = n_features * p_active ~ 2: at least the crosscoder's k.
    # With k above the true L0, spare budget lets latents mix exclusive features (measured).
    p_active: float = 0.075,
    seed: int = 0,
) -> PlantedSample:
    """``n`` rows of a small noiseless planted set (shared, base-only, edited-only features at strength
    U(1, 3), shared directions moved by 0.1 between the models, equal scales): the tests' quick set."""
    spec = PlantedSpec(
        d=d, counts={"shared": n_shared, "base_only": n_base_only, "edited_only": n_edited_only},
        p_active=p_active, strength_range=(1.0, 3.0), noise=0.0, edit_noise=0.1, seed=seed,
    )
    data = PlantedData(spec)
    x = data.sample(n, torch.Generator().manual_seed(seed + 1))
    return PlantedSample(x=x, directions=data.directions, kind=list(data.kinds))


class PlantedStream:
    """A training stream for ``mneme_plugin.train``: batches plus the store-like attributes it reads."""

    def __init__(self, data: PlantedData, batch_size: int, seed: int = 1) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.scale_factors = data.scale_factors()
        self.d_model = data.spec.d

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.data.batches(self.batch_size, self.seed)


def recovery(W_dec: torch.Tensor, data: PlantedData, scale: torch.Tensor, threshold: float = 0.9) -> dict[str, object]:
    """Share of planted directions whose best latent has cosine > ``threshold`` with the concatenated
    (base, edited) direction, in the crosscoder's normalised space (decoder (2, m, d), factors ``scale``).

    Returns ``recovered`` (overall share), ``by_kind`` {kind: share}, ``best`` (n,) the best latent of
    each planted feature and ``cosine`` (n,) its cosine.
    """
    true = data.directions * (data.model_scales * scale.float())[None, :, None]
    true = true.flatten(1)
    true = true / true.norm(dim=1, keepdim=True)
    dec = W_dec.detach().float().permute(1, 0, 2).flatten(1)  # (m, 2d)
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = true @ dec.T  # (n, m)
    best_cos, best = cos.max(dim=1)
    hit = best_cos > threshold
    by_kind = {}
    for kind in KINDS:
        mask = torch.tensor([k == kind for k in data.kinds])
        if mask.any():
            by_kind[kind] = float(hit[mask].float().mean())
    return {"recovered": float(hit.float().mean()), "by_kind": by_kind, "best": best, "cosine": best_cos}


def leak(W_dec: torch.Tensor, data: PlantedData, best: torch.Tensor) -> dict[str, float]:
    """Mean norm of the absent side over the present side of the best latents of base-only and
    edited-only features (0 = the crosscoder keeps them on one side)."""
    norms = W_dec.detach().float().norm(dim=-1)  # (2, m)
    out = {}
    for kind, present, absent in (("base_only", 0, 1), ("edited_only", 1, 0)):
        idx = [i for i, k in enumerate(data.kinds) if k == kind]
        if idx:
            latents = best[idx]
            out[kind] = float((norms[absent, latents] / norms[present, latents].clamp_min(1e-12)).mean())
    return out


def attribution_sides(latent_class: Sequence[str], data: PlantedData, best: torch.Tensor) -> dict[str, tuple[int, int]]:
    """{kind: (features whose best latent's attribution class is one ``EXPECTED_CLASSES`` allows, features)}
    from the per-latent classes of an attribution table."""
    out = {}
    for kind in KINDS:
        idx = [i for i, k in enumerate(data.kinds) if k == kind]
        if idx:
            ok = sum(latent_class[int(best[i])] in EXPECTED_CLASSES[kind] for i in idx)
            out[kind] = (int(ok), len(idx))
    return out
