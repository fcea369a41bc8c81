"""``HarvestConfig``: everything that decides which activations a harvest stores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, require

STORAGE_DTYPES = ("bfloat16", "float32")
MODEL_DTYPES = ("float32", "bfloat16", "float16")

# Fields that may change between an interrupted harvest and its resumption: they do not change
# the stored content (where the models run), everything else does.
RESUME_IGNORED_FIELDS = ("device",)


# The residual stream after block {layer}: what a harvest reads unless told otherwise.
DEFAULT_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"


@dataclass
class HarvestConfig(ConfigMixin):
    """Configuration of a paired (base, edited) activation harvest.

    Attributes:
        layer: Block index whose hook is read (0-based).
        hook_name: Hook point name; ``{layer}`` is substituted. None means
            ``blocks.{layer}.hook_resid_post``.
        context_length: Tokens per window (BOS included when the tokenizer has one).
        batch_size: Windows per forward pass.
        max_tokens: Stop after this many corpus tokens (windows x context_length, rounded up to
            whole windows); None harvests the whole corpus.
        dtype: Storage dtype of the activations ("bfloat16" or "float32").
        model_dtype: Dtype models are loaded in when given by name.
        device: Device the models run on (models passed as objects are not moved).
        drop_bos / drop_padding / drop_special_tokens: Which positions never become rows (drop_bos
            decides for BOS, though it is a special token too: drop_bos false keeps it).
        normalization_tokens: Kept tokens used to estimate median / mean norms (first ones of the
            corpus, before any row is written).
        outlier_factor: Drop positions whose norm in either model exceeds this many times that
            model's median norm; None keeps everything. 50 keeps all ordinary tokens (their
            norms sit within a few x the median) while removing the >100x "massive activation"
            tokens known in e.g. Qwen models.
        rows_per_shard: A shard is written once this many rows are buffered (shards hold whole
            batches, so they may be slightly larger).
        text_field / messages_field: Record fields of .jsonl / .parquet / HF corpora; None for
            messages_field means auto-detect "messages" then "conversation".
        append_eos: Append EOS after each document when packing (document separator).
    """

    runtime_fields = ("device", "batch_size")

    layer: int
    hook_name: str | None = None
    context_length: int = 128
    batch_size: int = 8
    max_tokens: int | None = None
    dtype: str = "bfloat16"
    model_dtype: str = "float32"
    device: str = "cpu"
    drop_bos: bool = True
    drop_padding: bool = True
    drop_special_tokens: bool = True
    normalization_tokens: int = 100_000
    outlier_factor: float | None = 50.0
    rows_per_shard: int = 65_536
    text_field: str = "text"
    messages_field: str | None = None
    append_eos: bool = True

    def __post_init__(self) -> None:
        check_device_name(self.device)
        require(isinstance(self.layer, int) and self.layer >= 0, f"layer must be an int >= 0, got {self.layer!r}.")
        require(self.context_length >= 2, f"context_length must be >= 2, got {self.context_length}.")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}.")
        require(
            self.max_tokens is None or self.max_tokens >= 1,
            f"max_tokens must be None or >= 1, got {self.max_tokens}.",
        )
        require(self.dtype in STORAGE_DTYPES, f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}.")
        require(
            self.model_dtype in MODEL_DTYPES,
            f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}.",
        )
        require(
            self.normalization_tokens >= 1,
            f"normalization_tokens must be >= 1, got {self.normalization_tokens}.",
        )
        require(
            self.outlier_factor is None or self.outlier_factor > 1,
            f"outlier_factor must be None or > 1 (a multiple of the median norm), got {self.outlier_factor}.",
        )
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}.")
        if self.hook_name is not None:
            try:
                self.hook_name.format(layer=self.layer)
            except (KeyError, IndexError, ValueError) as err:
                require(
                    False,
                    f"hook_name {self.hook_name!r} is not a valid format string "
                    f"(only {{layer}} may be substituted): {err!r}",
                )

    @property
    def window_budget(self) -> int | None:
        """Windows read at most: ``max_tokens`` rounded up to whole windows, where ``iter_windows``
        stops; None reads the whole corpus (its length is not known before). For progress bars."""
        return None if self.max_tokens is None else -(-self.max_tokens // self.context_length)

    @property
    def token_budget(self) -> int | None:
        """Corpus tokens read at most (``window_budget`` whole windows); None for the whole corpus."""
        windows = self.window_budget
        return None if windows is None else windows * self.context_length

    @property
    def resolved_hook_name(self) -> str:
        """The hook point name with ``{layer}`` filled in."""
        template = self.hook_name if self.hook_name is not None else DEFAULT_HOOK_TEMPLATE
        return template.format(layer=self.layer)

    def content_dict(self) -> dict[str, Any]:
        """The fields that determine stored content (compared when resuming)."""
        data = self.to_dict()
        for key in RESUME_IGNORED_FIELDS:
            data.pop(key, None)
        return data
