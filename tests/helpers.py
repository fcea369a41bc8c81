"""Tiny, fully local model builders shared by the test suites (no network, no model hub).

Everything here is deterministic given its seed, so session-scoped fixtures can build each model
once and every test sees the same weights.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mneme_plugin.organism.models import finetuned_copy, tiny_hooked_transformer, train_tokenizer

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
    """The package's local WordLevel tokenizer, trained on ``texts`` or a default synthetic corpus."""
    return train_tokenizer(list(texts) if texts is not None else synthetic_corpus(400, seed=123), chat_template)


def qwen2_style_tokenizer(tokenizer: Any) -> Any:
    """A byte-level BPE tokenizer that knows every word of ``tokenizer`` (one token per word, with or without
    its leading space), pre-tokenized as Qwen2's, with the same special tokens and chat template.

    Why: transformers 5 loads the tokenizer of any folder whose config says ``model_type: qwen2`` as
    ``Qwen2Tokenizer``, which keeps only a BPE vocabulary and merges and imposes Qwen2's own normaliser,
    pre-tokenizer and decoder; a word-level ``tokenizer.json`` saved there reloads as garbage (a whole
    sentence one id). This one reloads as it was saved.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from mneme_plugin.organism.models import SPECIAL_TOKENS

    words = sorted(w for w in tokenizer.get_vocab() if w not in SPECIAL_TOKENS)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    # Each word at the start of a text and after a space, often enough that every word becomes one token.
    texts = [" " + " ".join(words)] * 4 + [w for w in words for _ in range(2)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=100_000, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.init_kwargs["name_or_path"] = "tiny-local-qwen2-bpe"
    hf.chat_template = tokenizer.chat_template
    return hf


def make_hooked_transformer(tokenizer: Any = None, **kwargs: Any) -> Any:
    """A tiny randomly initialised HookedTransformer with a local tokenizer attached."""
    return tiny_hooked_transformer(tokenizer if tokenizer is not None else make_tokenizer(), **kwargs)


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


def make_finetuned_copy(model: Any, texts: Sequence[str], steps: int = 5, lr: float = 1e-2, seed: int = 0,
                        **kwargs: Any) -> Any:
    """Deep-copy ``model`` and really train the copy for ``steps`` of next-token loss on ``texts``."""
    return finetuned_copy(model, texts, steps=steps, lr=lr, seed=seed, **kwargs)


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


# ------------------------------------------------------------------------------ attribution helpers


def write_activation_store(folder: str | Path, x: torch.Tensor, rows_per_shard: int, scale_factors: Sequence[float] | None = None) -> Path:
    """Write (n, 2, d) activations as a complete activation store (no models involved)."""
    from mneme_plugin.activations.manifest import FORMAT_NAME, FORMAT_VERSION, write_manifest
    from mneme_plugin.activations.store import write_shard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, _, d = x.shape
    norms = x.float().norm(dim=-1)
    scale = list(scale_factors) if scale_factors is not None else (d**0.5 / norms.mean(0).clamp_min(1e-12)).tolist()
    shards = []
    for index, start in enumerate(range(0, n, rows_per_shard)):
        acts = x[start : start + rows_per_shard].contiguous()
        rows = acts.shape[0]
        file = write_shard(folder, index, {
            "activations": acts,
            "tokens": torch.zeros(rows, dtype=torch.int64),
            "positions": torch.arange(rows, dtype=torch.int64),
            "windows": torch.full((rows,), index, dtype=torch.int64),
        })
        shards.append({"file": file, "n_rows": rows, "windows_end": index + 1})
    write_manifest(folder, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "d_model": d,
        "dtype": str(x.dtype).replace("torch.", ""), "n_tokens": n, "shards": shards,
        "normalization": {"median_norms": norms.median(0).values.tolist(), "mean_norms": norms.mean(0).tolist(),
                          "scale_factors": scale, "n_tokens": n},
        "complete": True,
    })
    return folder


@dataclass
class PlantedScaling:
    f: torch.Tensor  # (n, m) codes
    x_norm: torch.Tensor  # (n, 2, d) normalised activations
    W_dec: torch.Tensor  # (2, m, d)
    b_dec: torch.Tensor  # (2, d)
    beta: dict[str, torch.Tensor]  # planted betas per target (edited row as latent vector)


def planted_scaling_problem(n: int = 3000, m: int = 12, d: int = 32, seed: int = 0) -> PlantedScaling:
    """Codes, activations and a decoder whose latent-scaling betas are known exactly (float64).

    Edited rows are orthogonal; base rows are beta^r_j * (edited row) + a component orthogonal to
    all edited rows; the base activations are sum_j beta^e_j f_j d_j + noise orthogonal to every
    edited row, the edited ones sum_j gamma_j f_j d_j + orthogonal noise; biases are orthogonal too.
    Then beta_r_base = beta^r, beta_r_edited = 1, beta_e_base = beta^e, beta_e_edited = gamma.
    """
    assert 2 * m + 4 <= d
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    basis, ortho = q[:, :m].T, q[:, m:].T  # (m, d) and (d - m, d), mutually orthogonal
    norms = 0.5 + torch.rand(m, 1, generator=gen, dtype=torch.float64)
    edited_rows = basis * norms
    beta_r = torch.randn(m, generator=gen, dtype=torch.float64)
    beta_e = torch.randn(m, generator=gen, dtype=torch.float64)
    gamma = 1 + 0.3 * torch.randn(m, generator=gen, dtype=torch.float64)
    base_rows = beta_r[:, None] * edited_rows + torch.randn(m, d - m, generator=gen, dtype=torch.float64) @ ortho
    W_dec = torch.stack([base_rows, edited_rows])
    b_dec = torch.randn(2, d - m, generator=gen, dtype=torch.float64) @ ortho
    active = torch.rand(n, m, generator=gen) < 0.3
    f = (active * (0.5 + torch.rand(n, m, generator=gen, dtype=torch.float64))).double()
    noise = torch.randn(n, 2, d - m, generator=gen, dtype=torch.float64) @ ortho
    x_base = (f * beta_e) @ edited_rows + noise[:, 0]
    x_edited = (f * gamma) @ edited_rows + noise[:, 1]
    x_norm = torch.stack([x_base, x_edited], dim=1)
    beta = {"r_base": beta_r, "r_edited": torch.ones(m, dtype=torch.float64), "e_base": beta_e, "e_edited": gamma}
    return PlantedScaling(f=f, x_norm=x_norm, W_dec=W_dec, b_dec=b_dec, beta=beta)


# ------------------------------------------------------------------------------ formats helpers
# Writers of the published crosscoder layouts (key names, shapes, dtypes and config fields as the
# science-of-finetuning and Kissane code writes them; see REFERENCE.md), built from random tensors.

SOF_CODE_NORMALIZATION_IDS = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}


def sof_state_dict(d: int = 16, m: int = 48, k: int = 4, code_normalization: str = "CROSSCODER",
                   batch_topk: bool = True, normalizer: bool = True, threshold: Any = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """A science-of-finetuning crosscoder state dict (L = 2 models)."""
    gen = torch.Generator().manual_seed(seed)
    L = 2
    sd: dict[str, torch.Tensor] = {
        "encoder.weight": torch.randn(L, d, m, generator=gen) / d**0.5,
        "encoder.bias": 0.1 * torch.randn(m, generator=gen),
        "decoder.weight": torch.randn(L, m, d, generator=gen) * (0.2 + torch.rand(L, m, 1, generator=gen)),
        "decoder.bias": 0.1 * torch.randn(L, d, generator=gen),
        "code_normalization_id": torch.tensor(SOF_CODE_NORMALIZATION_IDS[code_normalization]),
        "target_rms": torch.tensor(1.0),
    }
    if normalizer:
        sd["activation_mean"] = torch.randn(L, d, generator=gen)
        sd["activation_std"] = 0.5 + torch.rand(L, d, generator=gen)
        sd["activation_global_scale"] = sd["target_rms"] / torch.sqrt((sd["activation_std"] ** 2).sum(-1) + 1e-8)
    else:
        sd["activation_mean"] = torch.full((L, d), float("nan"))
        sd["activation_std"] = torch.full((L, d), float("nan"))
        sd["activation_global_scale"] = torch.ones(L)
    if batch_topk:
        sd["k"] = torch.tensor(k, dtype=torch.int32)
        if threshold is None:
            threshold = [-1.0] * L if code_normalization == "DECOUPLED" else -1.0
        sd["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    return sd


def write_sof_crosscoder(folder: str | Path, sd: dict[str, torch.Tensor], layout: str = "hub",
                         dict_class: str = "BatchTopKCrossCoder", code_normalization: str = "CROSSCODER",
                         k: int = 4, compiled: bool = False, step: int = 500) -> Path:
    """Write ``sd`` as ``layout``: "hub" (model.safetensors + config.json + trainer_config.json),
    "local" (model_final.pt + config.json {"trainer": ...}) or "checkpoint" (checkpoint_{step}.pt)."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    L, d, m = sd["encoder.weight"].shape
    trainer = {"trainer_class": "BatchTopKCrossCoderTrainer" if dict_class == "BatchTopKCrossCoder" else "CrossCoderTrainer",
               "dict_class": dict_class, "activation_dim": d, "dict_size": m, "lr": 1e-4, "layer": 13,
               "lm_name": "google/gemma-2-2b", "code_normalization": code_normalization, "wandb_name": "test"}
    if dict_class == "BatchTopKCrossCoder":
        trainer["k"] = k
    state = {(f"_orig_mod.{key}" if compiled else key): value for key, value in sd.items()}
    if layout == "hub":
        save_file({key: v.contiguous() for key, v in state.items()}, str(folder / "model.safetensors"))
        init = {"activation_dim": d, "dict_size": m, "num_layers": L, "code_normalization": code_normalization,
                "norm_init_scale": 1.0, "target_rms": 1.0, "dict_class": dict_class}
        if dict_class == "BatchTopKCrossCoder":
            init["k"] = k
        (folder / "config.json").write_text(json.dumps(init))
        (folder / "trainer_config.json").write_text(json.dumps({"trainer": trainer}))
    else:
        name = "model_final.pt" if layout == "local" else f"checkpoint_{step}.pt"
        torch.save(state, folder / name)
        (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return folder


def kissane_state_dict(d: int = 16, m: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(2, d, m, generator=gen) / d**0.5,
        "W_dec": torch.randn(m, 2, d, generator=gen) * 0.1,
        "b_enc": 0.1 * torch.randn(m, generator=gen) - 0.05,
        "b_dec": 0.1 * torch.randn(2, d, generator=gen),
    }


def write_kissane_crosscoder(folder: str | Path, sd: dict[str, torch.Tensor],
                             hook_point: str = "blocks.14.hook_resid_pre") -> Path:
    """Kissane's hub layout: <hook_point>/cfg.json + cc_weights.pt (fp32)."""
    import json

    folder = Path(folder) / hook_point
    folder.mkdir(parents=True, exist_ok=True)
    _, d, m = sd["W_enc"].shape
    cfg = {"seed": 49, "batch_size": 4096, "buffer_mult": 128, "lr": 5e-5, "num_tokens": 400_000_000,
           "l1_coeff": 2, "beta1": 0.9, "beta2": 0.999, "d_in": d, "dict_size": m, "seq_len": 1024,
           "enc_dtype": "fp32", "model_name": "gemma-2-2b", "site": "resid_pre", "device": "cuda",
           "model_batch_size": 4, "log_every": 100, "save_every": 30000, "dec_init_norm": 0.08,
           "hook_point": hook_point, "wandb_project": "crosscoder", "wandb_entity": "ckkissane"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    torch.save(sd, folder / "cc_weights.pt")
    return folder


def hub_cache_repo(cache: str | Path, repo_id: str, files: str | Path,
                   commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``files`` (a folder) out as huggingface_hub's cache holds a downloaded model repo: ``refs/main``
    names a commit whose snapshot folder holds the files. The real hub client, offline as in every test,
    serves the repo from there (no stand-in for it). Returns the snapshot folder."""
    import shutil

    storage = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    shutil.copytree(files, snapshot)
    return snapshot


def random_activation_pairs(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated random (n, 2, d) activations with different scales per model."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen) * 2.0
    edited = 0.6 * base + 0.4 * torch.randn(n, d, generator=gen)
    return torch.stack([base, edited * 0.5], dim=1)


# ------------------------------------------------------------------------------ organism helpers


def make_fact_lm(domains: Sequence[str] = ("biology", "cooking", "sports"), steps: int = 350, seed: int = 0) -> tuple[Any, list, list]:
    """A 2-layer, d_model 48 HookedTransformer that knows the facts of ``domains`` (~10 s on one core).

    Returns (model, cloze questions of those domains, 300 fresh (domain, text) documents for edits).
    """
    from mneme_plugin.organism import generate_corpus, question_set, train_lm

    docs = generate_corpus(300 * len(domains), seed=seed, domains=list(domains), cross_domain=0.0)
    tok = train_tokenizer([t for _, t in docs])
    model = tiny_hooked_transformer(tok, n_layers=2, d_model=48, n_ctx=32, seed=seed)
    train_lm(model, [t for _, t in docs], steps=steps, lr=5e-3, batch_size=32, context_length=32, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    edit = generate_corpus(300, seed=seed + 1, fact_seed=seed, domains=list(domains), cross_domain=0.0)
    return model, question_set(seed, list(domains)), edit


# ------------------------------------------------------------------------------ HF intervention helpers

# A chat template with a generation prompt (the organism's has none): renders prefixes of a conversation
# as prefixes of the whole, which the SFT label masking relies on.
GEN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                     "{% if add_generation_prompt %}assistant : {% endif %}")


def save_tiny_causal_lm(folder: str | Path, family: str = "llama", tokenizer: Any = None, n_layers: int = 3,
                        hidden_size: int = 32, seed: int = 0) -> Path:
    """A tiny random HF causal LM of ``family`` (llama, qwen2 or mistral) with a local tokenizer, saved to
    ``folder`` (loadable offline by path). Qwen2's attention has q/k/v biases, Llama's and Mistral's none."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    if family == "qwen2":  # a folder of model_type qwen2 reloads its tokenizer as Qwen2's byte-level BPE
        tokenizer = qwen2_style_tokenizer(tokenizer)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[family]
    cfg = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, records: Sequence[Any]) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


LM_EVAL_WORDS = ["house", "tree", "bread", "music", "box", "road", "river", "team"]


def write_lm_eval_task(folder: str | Path, name: str, n: int, seed: int, function: bool = False,
                       metrics: Sequence[str] = ("acc",)) -> Path:
    """A local lm-eval multiple-choice task in ``folder`` (an ``include_path``): YAML + JSON-lines data
    (lm-eval's `json` dataset builder); returns the YAML. ``function``: its documents go through a
    ``process_docs`` function of ``utils.py`` in the folder (a YAML ``!function``, as MMLU-Pro's do).
    ``metrics``: lm-eval's multiple-choice metrics it reports (``acc``, ``acc_norm``, ``brier_score``)."""
    folder = Path(folder)
    rng = random.Random(seed)
    rows = [{"q": f"{rng.choice(['the cat', 'a dog'])} {rng.choice(['sees', 'likes'])} the",
             "choices": rng.sample(LM_EVAL_WORDS, 4), "answer": rng.randrange(4)} for _ in range(n)]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n"
        + "".join(f"  - metric: {metric}\n" + ("    aggregation: mean\n    higher_is_better: true\n"
                                                 if metric in ("acc", "acc_norm") else "") for metric in metrics)
        + ("process_docs: !function utils.process_docs\n" if function else ""))
    if function:
        (folder / "utils.py").write_text("def process_docs(dataset):\n    return dataset\n")
    return task


def write_lm_eval_group(folder: str | Path, name: str, children: Sequence[str], metric: str = "acc") -> Path:
    """A local lm-eval group YAML in ``folder``, shaped like MMLU's and WMDP's (``group:``, ``task:``
    list of tasks or groups, an ``aggregate_metric_list`` weighted by size). Returns the YAML."""
    path = Path(folder) / f"_{name}.yaml"
    path.write_text(f"group: {name}\ntask:\n" + "".join(f"  - {child}\n" for child in children)
                    + f"aggregate_metric_list:\n  - metric: {metric}\n    weight_by_size: true\n")
    return path


def write_lm_eval_generative_task(folder: str | Path, name: str, filters: dict[str, Sequence[bool]]) -> Path:
    """A local lm-eval generative task (``generate_until``, metric ``exact_match``) in ``folder``, with
    one filter per ``filters`` entry (lm-eval's ``filter_list``, as MMLU-Pro's ``custom-extract`` or
    GSM8K's ``strict-match`` / ``flexible-extract``): filter ``f`` extracts the right answer for
    document i iff ``filters[f][i]`` (a ``custom`` filter), so each filter's exact match is known
    whatever the tiny model generates. Returns the YAML."""
    folder = Path(folder)
    counts = {len(marks) for marks in filters.values()}
    assert len(counts) == 1, "every filter marks every document"
    rows = [{"q": "the cat sees the", "target": "tree", **{f"right_{i}": bool(marks[d]) for i, marks in
                                                            enumerate(filters.values())}}
            for d in range(counts.pop())]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = f"{name}_filters"
    (folder / f"{module}.py").write_text("".join(
        f"def extract_{i}(resps, docs):\n    return [[d['target'] if d['right_{i}'] else 'wrong'] for d in docs]\n\n"
        for i in range(len(filters))))
    filter_list = "".join(
        f"  - name: {filter_name}\n    filter:\n      - function: custom\n"
        f"        filter_fn: !function {module}.extract_{i}\n      - function: take_first\n"
        for i, filter_name in enumerate(filters))
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: target\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 2\n  do_sample: false\n"
        f"filter_list:\n{filter_list}"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return task


# ------------------------------------------------------------------------------ a local OpenAI-compatible server


class FakeLLM:
    """A /v1/chat/completions server; ``script`` is a list of actions consumed per request:
    an int status (429/500), "stall" (sleeps past the client timeout), "malformed" (a 200 whose body is
    an HTML error page, as a proxy sends) or "ok". ``reply``, if set, maps a
    request body to the answer's ``choices[0]`` (message, logprobs), or to an int status (the request
    fails with it); else canned Delphi answers."""

    def __init__(self) -> None:
        self.script: list = []
        self.reply: Any = None
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                action = owner.script.pop(0) if owner.script else "ok"
                if action == "stall":
                    time.sleep(1.0)
                if isinstance(action, int):
                    self.send_response(action)
                    self.end_headers()
                    self.wfile.write(b'{"error": "try again"}')
                    return
                if action == "malformed":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(b"<html><body>502 Bad Gateway</body></html>")
                    return
                if owner.reply is not None:
                    choice = owner.reply(body)
                    if isinstance(choice, int):
                        self.send_response(choice)
                        self.end_headers()
                        self.wfile.write(b'{"error": "failed"}')
                        return
                else:
                    everything = " ".join(m["content"] for m in body["messages"])
                    if "[EXPLANATION]" in everything:
                        text = "[EXPLANATION]: mentions of gene and dna"
                    else:  # Delphi's detection scorer: one 0/1 per example shown
                        text = "[" + ", ".join(["1"] * 5) + "]"
                    choice = {"message": {"role": "assistant", "content": text}}
                data = json.dumps({"choices": [choice]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def last_progress(stderr: str, desc: str) -> tuple[int, int | None]:
    """(count, total) of the last state tqdm printed for the bar ``desc`` (total None: the bar had none)."""
    import re

    states = [line for line in re.split(r"[\r\n]", stderr) if line.startswith(f"{desc}:")]
    if not states:
        raise AssertionError(f"no progress bar {desc!r} in {stderr!r}")
    with_total = re.search(r"\| *(\d+)/(\d+) \[", states[-1])
    if with_total:
        return int(with_total.group(1)), int(with_total.group(2))
    return int(re.search(r": *(\d+)[a-z]* \[", states[-1]).group(1)), None


def tiny_rmu_config(model_dir: str | Path, rmu_corpora: tuple, **overrides: Any):
    """An RMU config for the tiny test models on the ``rmu_corpora`` fixture's forget / retain files
    (layer 2 steered, layers 0-2 trained, on CPU); ``overrides`` set the rest."""
    from mneme_plugin.interventions.hf_rmu import HFRMUConfig

    forget_path, retain_path, _, _ = rmu_corpora
    opts = dict(model=str(model_dir), forget_corpora=[str(forget_path)], retain_corpora=[str(retain_path)],
                layer_id=2, layer_ids=[0, 1, 2], alpha=10.0, steering_coeff=5.0, lr=5e-2, device="cpu")
    opts.update(overrides)
    return HFRMUConfig(**opts)


def pipeline_inputs(llama_dir: Path, root: Path, n_documents: int = 300) -> tuple[Path, Path, Path, Path]:
    """What a tiny `mneme run` reads: (base model folder, a fine-tuned copy, a JSONL corpus of
    ``n_documents``, a ground-truth CSV in which biology degraded)."""
    import pandas as pd

    edited = save_finetuned_llama(llama_dir, root / "edited", synthetic_corpus(40, seed=3))
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in synthetic_corpus(n_documents, seed=5)))
    truth = root / "truth.csv"
    pd.DataFrame({"category": ["biology", "cooking", "law"], "before": [0.9, 0.8, 0.7],
                  "after": [0.5, 0.8, 0.7]}).to_csv(truth, index=False)
    return llama_dir, edited, corpus, truth


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fork_ranks(fn: Any, world: int, *args: Any, started: int | None = None) -> None:
    """``fn(rank, *args)`` in ``world`` forked processes, each with the environment torchrun gives its
    ranks, so mneme's ``distributed_context`` joins them as one gloo job (fork: torch is imported once,
    the ranks start in well under a second). Raises if a rank raises. ``started``: only ranks
    0..started-1 start (the others never arrive)."""
    import torch.multiprocessing as mp

    mp.start_processes(_torchrun_rank, args=(fn, world, free_port(), args), nprocs=started or world,
                       start_method="fork")


def _torchrun_rank(rank: int, fn: Any, world: int, port: int, args: tuple) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ stage outputs, built by hand

# A Delta inside each class's band of the default AttributionConfig (attribution.classify's rule).
_CLASS_DELTA = {"base_only": 0.95, "suppressed": 0.75, "shared": 0.5, "amplified": 0.25, "edited_only": 0.05}


def attribution_result(classes: Sequence[str], n_tokens: int = 1000, seed: int = 0) -> Any:
    """An ``AttributionResult`` whose latent i has class ``classes[i]``, built the way ``attribute``
    builds one (decoder statistics of a decoder whose row norms give each class's Delta, the real
    classification, table and summary), so every column a loader checks is there. The latent-scaling
    ratios are unknown (NaN): Delta alone decides, as ``classify`` documents. ``score`` is the rule's
    ``2 Delta - 1``; set the column afterwards where a test needs other scores."""
    import numpy as np

    from mneme_plugin.attribution import AttributionConfig
    from mneme_plugin.attribution.attribute import build_table, summarize
    from mneme_plugin.attribution.decoder_norms import decoder_stats
    from mneme_plugin.attribution.table import AttributionResult

    unknown = sorted(set(classes) - set(_CLASS_DELTA) - {"dead"})
    if unknown:
        raise ValueError(f"unknown classes {unknown}")
    m, d = len(classes), 8
    directions = torch.nn.functional.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    base_norm = torch.tensor([1.0 if c == "dead" else min(1.0, _CLASS_DELTA[c] / (1 - _CLASS_DELTA[c])) for c in classes])
    edited_norm = torch.tensor([1.0 if c == "dead" else min(1.0, (1 - _CLASS_DELTA[c]) / _CLASS_DELTA[c]) for c in classes])
    columns = {k: v.numpy() for k, v in decoder_stats(torch.stack([directions * base_norm[:, None],
                                                                   directions * edited_norm[:, None]])).items()}
    fired = np.array([0 if c == "dead" else 10 for c in classes])
    nan = np.full(m, np.nan)
    columns.update(fire_count=fired, fire_freq=fired / n_tokens, mean_act=np.where(fired > 0, 1.0, 0.0),
                   **{name: nan for name in ("beta_r_base", "beta_r_edited", "beta_e_base", "beta_e_edited", "nu_r",
                                             "nu_e", "mbeta_r_base", "mbeta_r_edited", "mbeta_e_base",
                                             "mbeta_e_edited", "nu_r_mirror", "nu_e_mirror")})
    config = AttributionConfig()
    table = build_table(columns, config)
    if list(table["latent_class"]) != list(classes):  # the bands above drifted from classify's rule
        raise AssertionError(f"built classes {list(table['latent_class'])}, asked for {list(classes)}")
    return AttributionResult(table=table, summary=summarize(table, config, n_tokens, {"data": "built by tests.helpers"}))


def write_attribution(folder: str | Path, classes: Sequence[str], scores: Sequence[float] | None = None) -> Path:
    """An attribution folder (``save_attribution``'s files) of ``attribution_result(classes)``, with
    ``scores`` in the score column where given."""
    from mneme_plugin.attribution import save_attribution

    result = attribution_result(classes)
    if scores is not None:
        result.table["score"] = [float(s) for s in scores]
    return save_attribution(result, folder)


def mapping_table(links: dict[int, Sequence[tuple[str, float]]], taxonomy: str) -> Any:
    """A mapping table (``interpret.mapping.MAPPING_COLUMNS``) mapping each latent to its ranked
    ``(category, similarity)`` entries in ``taxonomy`` (the first entry is its category); a latent
    with no entries is mapped to none."""
    import pandas as pd

    from mneme_plugin.interpret.mapping import MAPPING_COLUMNS

    rows = [{"latent": int(latent), "description": f"latent {latent}", "label": f"latent {latent}", "taxonomy": taxonomy,
             "category": entries[0][0] if entries else "", "score": float(entries[0][1]) if entries else 0.0,
             "top_k": json.dumps([[c, float(s)] for c, s in entries])} for latent, entries in links.items()]
    return pd.DataFrame(rows, columns=list(MAPPING_COLUMNS))


def write_mapping(folder: str | Path, links: dict[int, Sequence[tuple[str, float]]], taxonomy: str) -> Path:
    """A mapping folder (``save_mapping``'s files) of ``mapping_table(links, taxonomy)``."""
    from mneme_plugin.interpret.mapping import save_mapping

    save_mapping(mapping_table(links, taxonomy), folder)
    return Path(folder)
