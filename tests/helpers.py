"""Tiny, fully local model builders shared by the test suites (no network, no model hub).

Everything here is deterministic given its seed, so session-scoped fixtures can build each model
once and every test sees the same weights.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]

_SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a robot", "the river", "our team"]
_VERBS = ["sees", "likes", "follows", "builds", "paints", "finds", "counts", "moves"]
_OBJECTS = ["the house", "a tree", "the number", "some bread", "the music", "a small box", "the road"]
_TAILS = ["today", "at night", "near the hill", "with care", "again and again", "in the morning", "slowly"]


def synthetic_corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic short sentences (one to three per document) over a small vocabulary."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            sentences.append(
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_TAILS)} {rng.randint(0, 20)} ."
            )
        docs.append(" ".join(sentences))
    return docs


def make_tokenizer(texts: Sequence[str] | None = None, chat_template: bool = True) -> Any:
    """A WordLevel tokenizer trained locally, wrapped as ``PreTrainedTokenizerFast``.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3. A minimal chat template is attached so that
    conversation corpora can be rendered.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else synthetic_corpus(400, seed=123)
    # Role words of the chat template must be in-vocabulary too.
    texts = texts + ["user assistant system : hello how are you fine thanks"]
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
        hf.chat_template = (
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        )
    return hf


def make_hooked_transformer(
    tokenizer: Any = None,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 64,
    seed: int = 0,
    d_vocab: int | None = None,
) -> Any:
    """A tiny randomly initialised HookedTransformer with a local tokenizer attached."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
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


def save_tiny_llama(
    folder: str | Path,
    tokenizer: Any = None,
    n_layers: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """Save a tiny random HF Llama and its tokenizer to ``folder`` (loadable offline by path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_finetuned_copy(
    model: Any,
    texts: Sequence[str],
    steps: int = 5,
    lr: float = 1e-2,
    seed: int = 0,
    context_length: int = 32,
    batch_size: int = 4,
) -> Any:
    """Deep-copy ``model`` and really train the copy for ``steps`` of next-token loss on ``texts``.

    Works for HookedTransformer and TransformerBridge (both accept ``return_type="loss"``).
    """
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    tuned.train()
    tok = model.tokenizer
    ids: list[int] = []
    for t in texts:
        ids.extend([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])
    n = len(ids) // context_length
    data = torch.tensor(ids[: n * context_length]).view(n, context_length)
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = tuned(data[idx], return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned


def save_finetuned_llama(src: str | Path, dst: str | Path, texts: Sequence[str], steps: int = 5, lr: float = 3e-3,
                         seed: int = 1) -> Path:
    """Load the HF model in ``src``, really train it for a few LM steps, save it with its tokenizer to ``dst``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    batch = tok(list(texts[:16]), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst = Path(dst)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@dataclass
class PlantedData:
    x: torch.Tensor  # (n, 2, d)
    directions: torch.Tensor  # (n_features, 2, d): [base side, edited side]; zero where absent
    kind: list[str]  # "shared" | "base_only" | "edited_only" per feature


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
) -> PlantedData:
    gen = torch.Generator().manual_seed(seed)
    n_features = n_shared + n_base_only + n_edited_only
    dirs = torch.randn(n_features, 2, d, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    # Shared features point the same way in both models up to a small change.
    dirs[:n_shared, 1] = dirs[:n_shared, 0] + 0.1 * dirs[:n_shared, 1]
    dirs[:n_shared, 1] /= dirs[:n_shared, 1].norm(dim=-1, keepdim=True)
    dirs[n_shared : n_shared + n_base_only, 1] = 0.0
    dirs[n_shared + n_base_only :, 0] = 0.0
    kind = ["shared"] * n_shared + ["base_only"] * n_base_only + ["edited_only"] * n_edited_only
    active = torch.rand(n, n_features, generator=gen) < p_active
    magnitude = 1.0 + 2.0 * torch.rand(n, n_features, generator=gen)
    codes = active * magnitude
    x = torch.einsum("nf,fld->nld", codes, dirs)
    return PlantedData(x=x, directions=dirs, kind=kind)
