"""Latent scaling (Minder et al. 2025) for every latent in one streaming pass.

For latent j with codes f_ij, a latent vector v_j and a target y_ij, the least-squares scale is

    beta_j = v_j . sum_i f_ij y_ij / (||v_j||^2 sum_i f_ij^2).

Targets, per model l (0 base, 1 edited):

* reconstruction ``r``: y_i = x_hat_i^l (bias included), the same for every latent;
* error ``e``: y_ij = x_i^l - (x_hat_i^l - f_ij d_j^l), the residual with latent j's own
  contribution added back. Summed against f_j it is F^T R + (sum_i f_ij^2) d_j^l: closed form.

So the pass only accumulates, in float64, F^T X^l and F^T X_hat^l (each (m, d)), sum f, sum f^2
and firing counts: memory O(m d) whatever the number of tokens, and no loop over latents.

Space: everything is computed in the crosscoder's *normalised* space (activations multiplied by
its ``activation_scale``), where the decoder rows live. In raw space the base targets and the
edited decoder row are in differently scaled spaces, so beta_base would pick up a factor
scale_edited / scale_base and every ratio nu would be off by that constant.

Latent vectors: the edited decoder row d_j for every target (Minder et al.), giving
nu = beta_base / beta_edited; and, as the mirror used to check base-specific latents, the base
decoder row for every target, giving nu' = beta'_edited / beta'_base.
"""

from __future__ import annotations

from typing import Any

import torch

from mneme_plugin.crosscoder.base import require_capability

TARGETS = ("r_base", "r_edited", "e_base", "e_edited")
# Slots of the (m, 4, d) accumulator F^T Y.
_X_BASE, _X_EDITED, _XHAT_BASE, _XHAT_EDITED = range(4)
# Above this fraction of non-zero codes a batch is accumulated with dense matmuls.
DENSE_FRACTION = 0.05


def closed_form_betas(fty: torch.Tensor, sum_f2: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """beta_j = v_j . (F^T Y)_j / (||v_j||^2 sum_i f_ij^2) for all j at once.

    ``fty`` (m, d) holds sum_i f_ij y_ij, ``sum_f2`` (m,), ``vectors`` (m, d). NaN where the latent
    never fired or its vector is zero.
    """
    fty, sum_f2, vectors = fty.double(), sum_f2.double(), vectors.double()
    denom = vectors.pow(2).sum(-1) * sum_f2
    beta = (vectors * fty).sum(-1) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, beta, torch.full_like(beta, float("nan")))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den  # inf where den == 0, NaN where both are 0 or either is NaN


class LatentScalingAccumulator:
    """Streams (codes, normalised activations) and yields every latent's betas at the end.

    ``update(x)`` takes raw (B, 2, d) activations and needs a crosscoder (``from_crosscoder``);
    ``update_codes(f, x_norm)`` takes codes and normalised activations directly. ``merge`` adds
    another accumulator's sums (e.g. from another process); ``finalize`` computes the results.
    """

    def __init__(self, W_dec: torch.Tensor, b_dec: torch.Tensor, device: str | torch.device | None = None) -> None:
        if W_dec.ndim != 3 or W_dec.shape[0] != 2:
            raise ValueError(f"W_dec must have shape (2, m, d) [0 base, 1 edited], got {tuple(W_dec.shape)}.")
        if tuple(b_dec.shape) != (2, W_dec.shape[2]):
            raise ValueError(f"b_dec must have shape (2, {W_dec.shape[2]}), got {tuple(b_dec.shape)}.")
        self.device = torch.device(device) if device is not None else W_dec.device
        self.W = W_dec.detach().to(self.device, torch.float64)
        self.b = b_dec.detach().to(self.device, torch.float64)
        _, self.m, self.d = self.W.shape
        # Decoder of both models side by side, for one sparse matmul: (m, 2d).
        self._W_cat = self.W.permute(1, 0, 2).reshape(self.m, 2 * self.d).contiguous()
        self._b_cat = self.b.reshape(1, 2 * self.d)
        self.fty = torch.zeros(self.m, 4, self.d, dtype=torch.float64, device=self.device)
        self.sum_f = torch.zeros(self.m, dtype=torch.float64, device=self.device)
        self.sum_f2 = torch.zeros(self.m, dtype=torch.float64, device=self.device)
        self.count = torch.zeros(self.m, dtype=torch.int64, device=self.device)
        self.n_tokens = 0
        self.crosscoder: Any = None

    @classmethod
    def from_crosscoder(cls, crosscoder: Any, device: str | torch.device | None = None) -> "LatentScalingAccumulator":
        # Betas regress each model's activations on one code per latent: per-model codes (DECOUPLED)
        # would need a beta per model and code, which is not designed yet.
        require_capability(crosscoder, "shared_code", "Latent scaling")
        acc = cls(crosscoder.W_dec, crosscoder.b_dec, device=device)
        acc.crosscoder = crosscoder
        return acc

    # ------------------------------------------------------------------------------- streaming

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Encode raw activations (B, 2, d) with the crosscoder and accumulate; returns the codes."""
        if self.crosscoder is None:
            raise ValueError("update(x) needs a crosscoder: build with from_crosscoder, or call update_codes.")
        cc = self.crosscoder
        x = x.to(cc.W_enc.device)
        f = cc.encode(x)
        self.update_codes(f, cc.normalize(x))
        return f

    @torch.no_grad()
    def update_codes(self, f: torch.Tensor, x_norm: torch.Tensor) -> None:
        """Accumulate codes f (B, m) and normalised activations x_norm (B, 2, d)."""
        if f.ndim != 2 or f.shape[1] != self.m:
            raise ValueError(f"Codes must have shape (batch, {self.m}), got {tuple(f.shape)}.")
        if tuple(x_norm.shape) != (f.shape[0], 2, self.d):
            raise ValueError(
                f"Activations must have shape ({f.shape[0]}, 2, {self.d}) to match the codes, got {tuple(x_norm.shape)}."
            )
        B = f.shape[0]
        f = f.to(self.device)
        x64 = x_norm.to(self.device, torch.float64).reshape(B, 2 * self.d)
        active = f != 0
        if int(active.sum()) > DENSE_FRACTION * active.numel():
            # Dense codes (e.g. an imported ReLU crosscoder): plain matmuls.
            F = f.to(torch.float64)
            x_hat = F @ self._W_cat + self._b_cat
            self.fty += (F.T @ torch.cat([x64, x_hat], dim=1)).view(self.m, 4, self.d)
            self.sum_f += F.sum(0)
            self.sum_f2 += F.pow(2).sum(0)
            self.count += active.sum(0)
        else:
            rows, cols = active.nonzero(as_tuple=True)  # sparse codes: never densify them in float64
            vals = f[rows, cols].to(torch.float64)
            F = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (B, self.m), check_invariants=False)
            x_hat = torch.sparse.mm(F, self._W_cat) + self._b_cat  # (B, 2d), normalised space
            Ft = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (self.m, B), check_invariants=False)
            self.fty += torch.sparse.mm(Ft, torch.cat([x64, x_hat], dim=1)).view(self.m, 4, self.d)
            self.sum_f.index_add_(0, cols, vals)
            self.sum_f2.index_add_(0, cols, vals * vals)
            self.count.index_add_(0, cols, torch.ones_like(cols))
        self.n_tokens += B

    def merge(self, other: "LatentScalingAccumulator") -> "LatentScalingAccumulator":
        """Add the sums of another accumulator over the same decoder (other rows of the data)."""
        if other.W.shape != self.W.shape or not torch.equal(other.W.to(self.device), self.W):
            raise ValueError("Cannot merge accumulators built on different decoders.")
        self.fty += other.fty.to(self.device)
        self.sum_f += other.sum_f.to(self.device)
        self.sum_f2 += other.sum_f2.to(self.device)
        self.count += other.count.to(self.device)
        self.n_tokens += other.n_tokens
        return self

    # ------------------------------------------------------------------------------- results

    def target_sums(self) -> dict[str, torch.Tensor]:
        """sum_i f_ij y_ij (m, d) for each target (error targets in closed form)."""
        s2 = self.sum_f2[:, None]
        ftx_b, ftx_e = self.fty[:, _X_BASE], self.fty[:, _X_EDITED]
        fth_b, fth_e = self.fty[:, _XHAT_BASE], self.fty[:, _XHAT_EDITED]
        return {
            "r_base": fth_b,
            "r_edited": fth_e,
            "e_base": ftx_b - fth_b + s2 * self.W[0],
            "e_edited": ftx_e - fth_e + s2 * self.W[1],
        }

    def finalize(self) -> dict[str, torch.Tensor]:
        """Per-latent float64 results (CPU), keyed by table column.

        ``beta_<t>`` use the edited decoder row as latent vector, ``mbeta_<t>`` the base row;
        ``nu_r`` / ``nu_e`` = beta_*_base / beta_*_edited; ``nu_r_mirror`` / ``nu_e_mirror`` =
        mbeta_*_edited / mbeta_*_base. Never-firing latents get NaN.
        """
        sums = self.target_sums()
        out: dict[str, torch.Tensor] = {}
        for prefix, vectors in (("beta", self.W[1]), ("mbeta", self.W[0])):
            for target in TARGETS:
                out[f"{prefix}_{target}"] = closed_form_betas(sums[target], self.sum_f2, vectors)
        out["nu_r"] = _ratio(out["beta_r_base"], out["beta_r_edited"])
        out["nu_e"] = _ratio(out["beta_e_base"], out["beta_e_edited"])
        out["nu_r_mirror"] = _ratio(out["mbeta_r_edited"], out["mbeta_r_base"])
        out["nu_e_mirror"] = _ratio(out["mbeta_e_edited"], out["mbeta_e_base"])
        n = max(self.n_tokens, 1)
        fired = self.count > 0
        out["fire_count"] = self.count.clone()
        out["fire_freq"] = self.count.double() / n
        out["mean_act"] = torch.where(fired, self.sum_f / self.count.clamp_min(1), torch.full_like(self.sum_f, float("nan")))
        return {k: v.cpu() for k, v in out.items()}
