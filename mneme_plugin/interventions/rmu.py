"""RMU unlearning (Li et al. 2024, "The WMDP Benchmark"), for TransformerLens models.

A frozen copy and an updated copy of the model. On forget text the updated model's residual stream
after block ``layer`` is pushed towards ``steering_coef * u`` (u a fixed random unit vector with
positive entries, from ``torch.rand``); on retain text it is held to the frozen model's. Only the
MLP output weights (``blocks.{l}.mlp.W_out``, the down-projections) of ``update_layers`` are
trained, with AdamW. Losses are element-wise means as in the reference implementation::

    L = mean((h_L(x_f) - c u)^2) + alpha * mean((h_L(x_r) - h_L_frozen(x_r))^2)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.activations.corpus import pack_tokens


@dataclass
class RMUConfig:
    layer: int = 2  # unlearning layer: h_L = blocks.{layer}.hook_resid_post
    update_layers: tuple[int, ...] | None = None  # default: (layer - 2, layer - 1, layer), clipped at 0
    steering_coef: float = 20.0  # c
    alpha: float = 100.0  # retain weight
    lr: float = 1e-3
    steps: int = 150
    batch_size: int = 8
    context_length: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update_layers is None:
            self.update_layers = tuple(range(max(0, self.layer - 2), self.layer + 1))
        self.update_layers = tuple(int(x) for x in self.update_layers)
        if self.layer < 0:
            raise ConfigError(f"RMU layer must be >= 0, got {self.layer}.")
        if not self.update_layers or any(l < 0 or l > self.layer for l in self.update_layers):
            raise ConfigError(f"RMU update_layers must be non-empty and within 0..layer={self.layer}; "
                              f"got {self.update_layers}.")
        for name in ("steering_coef", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RMU {name} must be > 0, got {getattr(self, name)}.")
        if self.alpha < 0:
            raise ConfigError(f"RMU alpha must be >= 0, got {self.alpha}.")
        for name in ("steps", "batch_size", "context_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RMU {name} must be >= 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["update_layers"] = list(self.update_layers)
        return d


@dataclass
class RMUResult:
    model: Any
    config: RMUConfig
    forget_loss: list[float] = field(default_factory=list)
    retain_loss: list[float] = field(default_factory=list)  # unweighted (without alpha)
    control_vector: torch.Tensor | None = None


def _resid(model: Any, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    hook = f"blocks.{layer}.hook_resid_post"
    store: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        store["h"] = act

    model.run_with_hooks(tokens, return_type=None, stop_at_layer=layer + 1, fwd_hooks=[(hook, grab)])
    return store["h"]


def rmu_unlearn(model: Any, forget_texts: Sequence[str], retain_texts: Sequence[str], config: RMUConfig | None = None,
                progress: bool = False) -> RMUResult:
    """Unlearn ``forget_texts`` from a copy of ``model`` (a HookedTransformer) with RMU; ``model`` is untouched.

    Forget and retain batches are packed BOS-prefixed windows of ``config.context_length`` tokens.
    """
    from tqdm.auto import tqdm

    cfg = config or RMUConfig()
    n_layers = model.cfg.n_layers
    if cfg.layer >= n_layers:
        raise ConfigError(f"RMU layer {cfg.layer} is out of range for a {n_layers}-layer model.")
    frozen = model
    updated = copy.deepcopy(model)
    for p in updated.parameters():
        p.requires_grad_(False)
    params = []
    for l in cfg.update_layers:
        w = updated.blocks[l].mlp.W_out
        w.requires_grad_(True)
        params.append(w)
    forget = pack_tokens(model.tokenizer, forget_texts, cfg.context_length)
    retain = pack_tokens(model.tokenizer, retain_texts, cfg.context_length)
    gen = torch.Generator().manual_seed(cfg.seed)
    u = torch.rand(model.cfg.d_model, generator=gen)
    u = u / u.norm()
    control = cfg.steering_coef * u
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    result = RMUResult(model=updated, config=cfg, control_vector=control)
    updated.train()
    for _ in tqdm(range(cfg.steps), desc="RMU", disable=not progress):
        xf = forget[torch.randint(0, forget.shape[0], (cfg.batch_size,), generator=gen)]
        xr = retain[torch.randint(0, retain.shape[0], (cfg.batch_size,), generator=gen)]
        h_f = _resid(updated, xf, cfg.layer)
        forget_loss = torch.nn.functional.mse_loss(h_f, control.expand_as(h_f))
        h_r = _resid(updated, xr, cfg.layer)
        with torch.no_grad():
            h_r_frozen = _resid(frozen, xr, cfg.layer)
        retain_loss = torch.nn.functional.mse_loss(h_r, h_r_frozen)
        loss = forget_loss + cfg.alpha * retain_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.forget_loss.append(forget_loss.item())
        result.retain_loss.append(retain_loss.item())
    updated.eval()
    for p in updated.parameters():
        p.requires_grad_(False)
    return result


@torch.no_grad()
def rmu_losses(updated: Any, frozen: Any, forget_texts: Sequence[str], retain_texts: Sequence[str],
               config: RMUConfig, control_vector: torch.Tensor) -> tuple[float, float]:
    """(forget loss, unweighted retain loss) of ``updated`` over all packed windows of the texts."""
    forget = pack_tokens(frozen.tokenizer, forget_texts, config.context_length)
    retain = pack_tokens(frozen.tokenizer, retain_texts, config.context_length)
    h_f = _resid(updated, forget, config.layer)
    fl = torch.nn.functional.mse_loss(h_f, control_vector.expand_as(h_f)).item()
    rl = torch.nn.functional.mse_loss(_resid(updated, retain, config.layer), _resid(frozen, retain, config.layer)).item()
    return fl, rl
