"""Per-category benchmark accuracy before and after an edit: the ground truth of side effects.

For the model organism the benchmark is a cloze question set (``organism.corpus.question_set``):
prompt ``the {entity} {relation}``, answer one word ``{value}``. Two scorings:

- ``"top1"`` (default): the answer token is the arg-max of the next-token distribution over the
  whole vocabulary (exact-match generation of one token; chance ~0).
- ``"choice"``: the answer has the highest logit among the question's ``candidates`` (the domain's
  values), like MMLU's multiple choice (chance 1 / n_candidates).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mneme_plugin.errors import ConfigError

MODES = ("top1", "choice")


def _token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ConfigError(f"Answer {word!r} is not a single in-vocabulary token ({ids}); the cloze benchmark "
                          "needs one-token answers.")
    return ids[0]


@torch.no_grad()
def question_correct(model: Any, questions: Sequence[Any], mode: str = "top1", batch_size: int = 256) -> list[bool]:
    """Per question, whether ``model`` answers it (see the module doc for ``mode``).

    ``questions`` need ``prompt``, ``answer`` and (for ``"choice"``) ``candidates`` attributes.
    Prompts are BOS-prefixed; questions are grouped by prompt length, so no padding is involved.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    tok = model.tokenizer
    encoded = [[tok.bos_token_id] + tok(q.prompt, add_special_tokens=False)["input_ids"] for q in questions]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    correct = [False] * len(questions)
    was_training = model.training
    model.eval()
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            logits = model(torch.tensor([encoded[i] for i in chunk]), return_type="logits")[:, -1]
            for row, i in enumerate(chunk):
                q = questions[i]
                answer = _token_id(tok, q.answer)
                if mode == "top1":
                    correct[i] = int(logits[row].argmax()) == answer
                else:
                    cands = [_token_id(tok, c) for c in q.candidates]
                    scores = logits[row, cands]
                    correct[i] = cands[int(scores.argmax())] == answer
    if was_training:
        model.train()
    return correct


def domain_accuracy(model: Any, questions: Sequence[Any], mode: str = "top1") -> dict[str, float]:
    """Accuracy per ``question.domain`` (category), in first-seen order of the domains."""
    correct = question_correct(model, questions, mode)
    hits: dict[str, list[bool]] = {}
    for q, c in zip(questions, correct):
        hits.setdefault(q.domain, []).append(c)
    return {d: sum(v) / len(v) for d, v in hits.items()}


def accuracy_drop(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``before - after`` per category (positive = the edit degraded it); categories must match."""
    if set(before) != set(after):
        raise ConfigError(f"before and after cover different categories: {sorted(set(before) ^ set(after))}.")
    return {c: before[c] - after[c] for c in before}
