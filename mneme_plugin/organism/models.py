"""Tiny language models trained on CPU: a local word-level tokenizer, a small HookedTransformer,
and real next-token training (used by the model organism, the quickstart and the tests)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mneme_plugin.activations.corpus import pack_tokens

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch kernels inside the block (the default CPU backward of some ops sums in a
    thread-dependent order, so the same seed gave different organisms in different processes)."""
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def train_tokenizer(texts: Sequence[str], chat_template: bool = True) -> Any:
    """A WordLevel tokenizer trained locally, wrapped as ``PreTrainedTokenizerFast``.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3. With ``chat_template`` a minimal template is
    attached so conversation corpora can be rendered.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Role words of the chat template must be in-vocabulary too.
    texts = list(texts) + ["user assistant system : hello how are you fine thanks"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    # TransformerLens rebuilds tokenizers from init_kwargs (by name, which would mean a hub lookup)
    # unless they already claim add_bos_token; ours is local, so mark it (BOS is added by callers).
    hf.init_kwargs["name_or_path"] = "tiny-local-wordlevel"
    hf.init_kwargs["add_bos_token"] = True
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_hooked_transformer(
    tokenizer: Any,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 64,
    seed: int = 0,
    d_vocab: int | None = None,
) -> Any:
    """A randomly initialised small HookedTransformer with ``tokenizer`` attached."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp or 4 * d_model,
        n_ctx=n_ctx,
        d_vocab=d_vocab or len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
        model_name=f"tiny-ht-L{n_layers}-d{d_model}-s{seed}",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.eval()
    return model


def train_lm(
    model: Any,
    texts: Sequence[str],
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    context_length: int = 32,
    batch_size: int = 4,
    progress: bool = False,
) -> Any:
    """Train ``model`` in place for ``steps`` of next-token loss on ``texts``; returns it in eval mode.

    Works for HookedTransformer and TransformerBridge (both accept ``return_type="loss"``).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    data = pack_tokens(model.tokenizer, texts, context_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="train LM", disable=not progress):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        loss = model(data[idx], return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def finetuned_copy(model: Any, texts: Sequence[str], steps: int = 5, lr: float = 1e-2, seed: int = 0,
                   **kwargs: Any) -> Any:
    """A deep copy of ``model`` really trained for ``steps`` on ``texts`` (frozen afterwards)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    train_lm(tuned, texts, steps, lr=lr, seed=seed, **kwargs)
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned
