"""``AttributionConfig``: thresholds of the suppressed .. shared .. amplified spectrum."""

from __future__ import annotations

from dataclasses import dataclass

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, require

BASE_SPECIFIC_VECTORS = ("base", "edited")
# The classes ``classify`` gives latents (the registry configs naming classes are checked against).
CLASSES = ("base_only", "suppressed", "shared", "amplified", "edited_only", "dead")
BASE_LEANING = ("base_only", "suppressed")
EDITED_LEANING = ("amplified", "edited_only")


def classes_problem(classes: object, key: str) -> str | None:
    """What is wrong with ``classes`` as a list of attribution classes for config key ``key`` (None if nothing)."""
    unknown = sorted(str(c) for c in classes if c not in CLASSES) if isinstance(classes, (list, tuple)) else None
    if unknown is None:
        return f"{key} must be a list of attribution classes among {list(CLASSES)}, got {classes!r}."
    return f"{key} names unknown attribution class(es) {unknown}: use some of {list(CLASSES)}." if unknown else None


@dataclass
class AttributionConfig(ConfigMixin):
    """How latents are attributed and classified (see ``mneme_plugin.attribution.classify``).

    Attributes:
        batch_size: Rows encoded at a time while streaming (memory does not depend on the
            number of tokens, only on this and on the crosscoder's size).
        device: Where encoding and accumulation run ("auto": CUDA when available).
        delta_edited_only: Relative decoder norm below which a latent is edited-only
            (Delta < 0.1; Minder et al. "chat-only").
        delta_base_only: Relative decoder norm above which a latent is base-only (Delta > 0.9).
        shared_band: |Delta - 0.5| < shared_band is shared (0.1).
        nu_error_max / nu_reconstruction_max: Latent-scaling thresholds of Minder et al.: an
            edited-only latent is confirmed when |nu^e| < 0.2 and |nu^r| < 0.5; a base-only one
            when the mirrored ratios are below the same thresholds.
        use_betas: False classifies by Delta alone (betas are still computed and written).
        base_specific_vector: Which latent vector the base-only check uses. "base" (default):
            the mirror of Minder et al.'s test, with the BASE decoder row as latent vector and the
            ratios nu' = beta'_edited / beta'_base. "edited": 1 / nu with the edited row as
            latent vector for every target (ill-conditioned when the edited row is near zero,
            which is exactly the case for base-only latents).
        allow_store_mismatch: Attribute over a store whose layer, hook or models differ from the
            ones the crosscoder records (refused otherwise).
    """

    runtime_fields = ("batch_size", "device")

    batch_size: int = 4096
    device: str = "auto"
    delta_edited_only: float = 0.1
    delta_base_only: float = 0.9
    shared_band: float = 0.1
    nu_error_max: float = 0.2
    nu_reconstruction_max: float = 0.5
    use_betas: bool = True
    base_specific_vector: str = "base"
    allow_store_mismatch: bool = False

    def __post_init__(self) -> None:
        check_device_name(self.device)
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}.")
        require(0.0 < self.shared_band < 0.5, f"shared_band must be in (0, 0.5), got {self.shared_band}.")
        require(
            0.0 <= self.delta_edited_only <= 0.5 - self.shared_band,
            f"delta_edited_only must be in [0, 0.5 - shared_band = {0.5 - self.shared_band}], "
            f"got {self.delta_edited_only}.",
        )
        require(
            0.5 + self.shared_band <= self.delta_base_only <= 1.0,
            f"delta_base_only must be in [0.5 + shared_band = {0.5 + self.shared_band}, 1], "
            f"got {self.delta_base_only}.",
        )
        require(self.nu_error_max > 0, f"nu_error_max must be positive, got {self.nu_error_max}.")
        require(
            self.nu_reconstruction_max > 0,
            f"nu_reconstruction_max must be positive, got {self.nu_reconstruction_max}.",
        )
        require(
            self.base_specific_vector in BASE_SPECIFIC_VECTORS,
            f"base_specific_vector must be one of {BASE_SPECIFIC_VECTORS}, got {self.base_specific_vector!r}.",
        )
