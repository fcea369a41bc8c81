"""Per-category benchmark accuracy before and after an edit: the ground truth of side effects.

For the model organism the benchmark is a cloze question set (``organism.corpus.question_set``):
prompt ``the {entity} {relation}``, answer one word ``{value}``. Two scorings:

- ``"top1"`` (default): the answer token is the arg-max of the next-token distribution over the
  whole vocabulary (exact-match generation of one token; chance ~0).
- ``"choice"``: the answer has the highest logit among the question's ``candidates`` (the domain's
  values), like MMLU's multiple choice (chance 1 / n_candidates).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
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


def degraded(drop: Mapping[str, float], threshold: float = 0.1) -> list[str]:
    """Categories whose accuracy dropped by more than ``threshold`` (absolute)."""
    return [c for c, v in drop.items() if v > threshold]


def save_scores(path: str | Path, before: Mapping[str, float], after: Mapping[str, float]) -> Path:
    """Write ``category,before,after,drop`` (CSV if the suffix is .csv, else JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop = accuracy_drop(before, after)
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["category", "before", "after", "drop"])
            for c in before:
                w.writerow([c, before[c], after[c], drop[c]])
    else:
        path.write_text(json.dumps({"before": dict(before), "after": dict(after), "drop": drop}, indent=2))
    return path


def read_scores(path: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """Read per-category scores ``(before, after)`` from a CSV with columns ``category, before, after``
    (extra columns ignored; e.g. an lm-eval summary reshaped per subject) or from ``save_scores``' JSON."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data["before"].items()}, {k: float(v) for k, v in data["after"].items()}
    before, after = {}, {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "before", "after"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path}: missing column(s) {sorted(missing)}; need category, before, after.")
        for row in reader:
            c = row["category"].strip()
            if c in before:
                raise ConfigError(f"{path}: category {c!r} appears twice.")
            before[c], after[c] = float(row["before"]), float(row["after"])
    return before, after
