"""Direct implementations of the published formulas (REFERENCE.md), independent of mneme's code.

science-of-finetuning: x' = (x - mu_l) * g_l; pre = relu(sum_l x'_l W_enc^l + b_enc); weight w by
code normalisation; BatchTopK inference f = pre * (pre * w > threshold) (DECOUPLED: per model,
codes (B, L, F), and the input normalised twice: their BatchTopKCrossCoder.encode normalises it and its
DECOUPLED branch calls CrossCoder.encode, which normalises it again); x_hat_l = f @ W_dec^l + b_dec^l,
then x_hat / (g_l + 1e-8) + mu_l (once).
Kissane: relu(einsum(x, W_enc) + b_enc); einsum(f, W_dec (m, 2, d)) + b_dec.
"""

from __future__ import annotations

import torch


def sof_has_normalizer(sd):
    if "activation_mean" not in sd:  # older checkpoints: no normaliser
        return False
    return not torch.isnan(sd["activation_mean"]).any() and not torch.isnan(sd["activation_std"]).any()


def sof_weight(sd, code_normalization):
    dw = sd["decoder.weight"]
    if code_normalization == "CROSSCODER":
        return dw.norm(dim=2).sum(dim=0)
    if code_normalization == "SAE":
        return dw.norm(dim=(0, 2))
    if code_normalization == "MIXED":
        return dw.norm(dim=(0, 2)) * 1.0 + dw.norm(dim=2).sum(dim=0) * 0.1
    if code_normalization == "NONE":
        return torch.tensor(1.0)
    if code_normalization == "DECOUPLED":
        return dw.norm(dim=2)  # (L, F)
    raise ValueError(code_normalization)


def sof_pre(sd, x, normalizations=1):
    for _ in range(normalizations if sof_has_normalizer(sd) else 0):
        x = (x - sd["activation_mean"]) * sd["activation_global_scale"][None, :, None]
    return torch.relu(torch.einsum("bld,ldf->blf", x, sd["encoder.weight"]).sum(dim=1) + sd["encoder.bias"])


def sof_encode(sd, x, code_normalization, batch_topk=True):
    pre = sof_pre(sd, x, 2 if batch_topk and code_normalization == "DECOUPLED" else 1)
    if not batch_topk:
        return pre
    w = sof_weight(sd, code_normalization)
    if code_normalization == "DECOUPLED":
        scaled = pre[:, None, :] * w[None]
        return pre[:, None, :] * (scaled > sd["threshold"][None, :, None])
    return pre * (pre * w > sd["threshold"])


def sof_decode(sd, f):
    eq = "blf,lfd->bld" if f.ndim == 3 else "bf,lfd->bld"
    x = torch.einsum(eq, f, sd["decoder.weight"]) + sd["decoder.bias"]
    if sof_has_normalizer(sd):
        x = x / (sd["activation_global_scale"][None, :, None] + 1e-8) + sd["activation_mean"]
    return x


def kissane_encode(sd, x_scaled):
    return torch.relu(torch.einsum("bnd,ndh->bh", x_scaled, sd["W_enc"]) + sd["b_enc"])


def kissane_decode(sd, f):
    return torch.einsum("bh,hnd->bnd", f, sd["W_dec"]) + sd["b_dec"]
