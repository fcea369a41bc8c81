"""Loading the model pair, validating it, and the stop-early forward pass.

Models are TransformerLens objects: a ``HookedTransformer`` or a ``TransformerBridge``. A string
is booted with ``TransformerBridge.boot_transformers`` (hub name or local HF folder). We do *not*
call ``enable_compatibility_mode()``: the bridge already exposes ``blocks.{L}.hook_resid_post``
as an alias, and compatibility mode folds LayerNorm and centres writing weights, which changes the
residual stream. Model diffing (like the published crosscoders) wants the raw HF residual.
"""

from __future__ import annotations

import difflib
import os
import time
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mneme_plugin.errors import ConfigError, LayerOutOfRangeError, ModelMismatchError

if TYPE_CHECKING:  # torch is imported where a model is loaded or run: `mneme info` and the dry run need none of it
    import torch


class _StopForward(Exception):
    """Raised from the hook to abandon the forward pass once the activation is captured."""


ORGANISM_PREFIX = "organism:"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model named in a config comes from: ``kind`` is "organism" (``organism:PATH``, a
    saved CPU organism model), "local" (an existing HF model folder) or "hub" (a hub name)."""

    kind: str
    location: str

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        if spec.startswith(ORGANISM_PREFIX):
            return cls("organism", spec[len(ORGANISM_PREFIX):])
        path = Path(spec).expanduser()
        # A spec that can only be a path (not a hub org/name) is a local folder, existing or not.
        if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
            return cls("local", str(path))
        return cls("hub", spec)


def check_model_spec(spec: str, where: str) -> list[str]:
    """Problems with a model spec that can be seen without loading it (missing folders and files,
    an organism model not in the current safetensors + JSON format)."""
    parsed = ModelSpec.parse(spec)
    if parsed.kind == "organism":
        from mneme_plugin.errors import CheckpointError
        from mneme_plugin.organism.build import organism_model_files

        try:
            organism_model_files(parsed.location)
        except CheckpointError as err:
            return [f"{where}: {err}"]
        return []
    if parsed.kind == "local":
        path = Path(parsed.location)
        if not path.exists():
            return [f"{where}: the model folder {spec} does not exist (and it is no hub name of the form org/name)."]
        if not path.is_dir():
            return [f"{where}: the model {spec} is a file: give a Hugging Face model folder or a hub name."]
        if not (path / "config.json").is_file():
            content = "is empty" if not any(path.iterdir()) else "holds no config.json"
            return [f"{where}: the model folder {spec} {content}: expected a Hugging Face model folder "
                    "(config.json, weights, tokenizer), e.g. one written by save_pretrained."]
    if parsed.kind == "hub":
        typo = _mistyped_local_folder(spec)
        if typo:
            return [f"{where}: {typo}"]
    return []


def is_hf_model_config(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model's config.json (it names a model_type), not a crosscoder's."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "mneme-crosscoder"


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit that ``revision`` (a branch or tag, default ``main``, or a commit hash) of the hub model
    ``repo_id`` resolves to in the local huggingface_hub cache (``refs/<revision>``, then the snapshot
    holding its config.json), read by the hub client without the network; None when it is not downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id or revision the hub client refuses is in no cache
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local huggingface_hub cache holds ``repo_id``'s config.json (no network)."""
    return hub_commit(repo_id) is not None


def weights_digest(spec: str, revision: str | None = None) -> str | None:
    """What identifies the weights a model spec names, for every cache key and stage input digest that
    must change when they do: a local folder's (or organism model's) file metadata (``files.stat_digest``);
    for a hub id in the local hub cache, the commit its ``revision`` resolves to there (``hub_commit``: a
    new commit on ``main`` downloaded into the cache changes it; the snapshot's files are not digested, as
    a later download adds files of the same commit); None for a hub id not downloaded yet (its name and
    revision are then all that is known) or a folder that does not exist."""
    from mneme_plugin.files import stat_digest

    parsed = ModelSpec.parse(spec)
    if parsed.kind == "hub":
        commit = hub_commit(spec, revision)
        return f"hub commit {commit}" if commit is not None else None
    return stat_digest(parsed.location)


# Whether the hub at an endpoint answered this process's last probe: (None when it did, else why it could not
# be reached; when). Remembered so that neither the probe nor the hub client's retries are repeated per model;
# "unreachable" only for HUB_RECHECK_AFTER_S, since a run lasts hours and the network may come back.
_HUB_UNREACHABLE: dict[str, tuple[str | None, float]] = {}
# The hub's answer about a model (endpoint, id, revision): (None when it has it, else its error; when).
# Remembered so that the check before a run's first stage and every loader's check of a model not downloaded
# yet ask once; a server error or rate limit (HTTP 429, 5xx) only for HUB_RECHECK_AFTER_S.
_HUB_ANSWERS: dict[tuple[str, str, str | None], tuple[Exception | None, float]] = {}
# Seconds after which an outcome that may change (the hub unreachable, a server error) is asked again.
HUB_RECHECK_AFTER_S = 300.0


def _transient(err: Exception | None) -> bool:
    """Whether the hub's answer may change soon: a rate limit or a server error (not a missing or gated model)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def _fresh(entry: tuple[Any, float] | None, transient: bool) -> bool:
    """Whether a remembered outcome still stands: a lasting one always, a transient one for HUB_RECHECK_AFTER_S."""
    return entry is not None and (not transient or time.monotonic() - entry[1] < HUB_RECHECK_AFTER_S)


def _remembered_unreachable(endpoint: str) -> tuple[bool, str | None]:
    """(whether this process knows if the hub at ``endpoint`` can be reached, why it cannot or None)."""
    entry = _HUB_UNREACHABLE.get(endpoint)
    if entry is None or not _fresh(entry, entry[0] is not None):
        return False, None
    return True, entry[0]


def _probe_hub(spec: str, revision: str | None) -> Exception | None:
    """One request to the hub about ``spec`` (no retries; none when this process has the hub's answer about it
    already, ``_HUB_ANSWERS``), its outcome remembered in ``_HUB_UNREACHABLE`` and the answer in ``_HUB_ANSWERS``
    unless the id was refused before any request: the error, or None when the hub has the model."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    asked = (constants.ENDPOINT, spec, revision)
    known = _HUB_ANSWERS.get(asked)
    if known is not None and _fresh(known, _transient(known[0])):
        return known[0]
    try:
        HfApi().model_info(spec, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HFValidationError as err:
        return err
    except HfHubHTTPError as err:  # the hub answered (no such model, gated, a server error)
        _HUB_UNREACHABLE[constants.ENDPOINT] = (None, time.monotonic())
        _HUB_ANSWERS[asked] = (err, time.monotonic())
        return err
    except Exception as err:  # the hub is unreachable: no network, DNS, proxy, timeout
        first = str(err).splitlines()[0] if str(err) else "no answer"
        _HUB_UNREACHABLE[constants.ENDPOINT] = (f"{type(err).__name__}: {first}", time.monotonic())
        return err
    _HUB_UNREACHABLE[constants.ENDPOINT] = (None, time.monotonic())
    _HUB_ANSWERS[asked] = (None, time.monotonic())
    return None


def hub_unreachable(spec: str, revision: str | None = None) -> str | None:
    """Why the hub cannot be reached (None when it can, or HF_HUB_OFFLINE is set), found by this process's
    last probe (``_probe_hub``, about ``spec``) and remembered for every later model (an unreachable hub for
    HUB_RECHECK_AFTER_S, then asked again)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    known, why = _remembered_unreachable(constants.ENDPOINT)
    if not known:
        _probe_hub(spec, revision)
        why = _remembered_unreachable(constants.ENDPOINT)[1]
    return why


def hub_model_problem(spec: str, revision: str | None = None) -> str | None:
    """Why the hub id ``spec`` cannot be loaded, found at once rather than after the hub client's retries
    (about 25 s with the hub unreachable, then an error that names no remedy): it is neither a local
    folder nor in the local hub cache, and HF_HUB_OFFLINE forbids downloading it, or one request to the
    hub (no retries; or the remembered outcome of an earlier one, ``hub_unreachable``) finds no such model
    or revision, or cannot reach the hub. None when it is cached, the hub has it (the loader downloads it),
    the hub's answer settles nothing (a gated model, a server error: the loader's own message says more),
    or ``spec`` is no hub id."""
    if ModelSpec.parse(spec).kind != "hub" or hub_commit(spec, revision) is not None:
        return None
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    named = spec if revision is None else f"{spec} (revision {revision})"
    what = (f"the hub model {named} is neither a local model folder nor in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE})")
    download = f"download it first (`hf download {spec}`" + (f" --revision {revision}" if revision else "") + ")"
    if constants.HF_HUB_OFFLINE:
        return (f"{what}, and HF_HUB_OFFLINE is set, so it is not downloaded: check the spelling, or {download} "
                "where the hub is reachable, or unset HF_HUB_OFFLINE to let it be downloaded now.")
    # The hub's answer about this model, unless an earlier probe found the hub unreachable.
    err = None if _remembered_unreachable(constants.ENDPOINT)[1] else _probe_hub(spec, revision)
    unreachable = _remembered_unreachable(constants.ENDPOINT)[1]
    if unreachable:
        return (f"{what}, and the hub ({constants.ENDPOINT}) cannot be reached ({unreachable}): check the spelling "
                f"and the network, or {download} where the hub is reachable, or set HF_HUB_OFFLINE=1 to use only "
                "the local cache.")
    if isinstance(err, GatedRepoError):
        return None
    if isinstance(err, RevisionNotFoundError):
        return f"{what}, and the hub has no revision {revision!r} of {spec}: check the revision."
    if isinstance(err, RepositoryNotFoundError):
        return (f"{what}, and the hub has no model {spec} (or it is private and you are not logged in): check the "
                "spelling (or the local folder's path), or log in (`hf auth login`).")
    if isinstance(err, HFValidationError):
        return f"{spec} is neither a local model folder nor a valid hub id: {str(err).splitlines()[0]}"
    return None  # the hub has it (or answered with an error the loader's own message explains)


def require_hub_model(spec: str, who: str, revision: str | None = None) -> None:
    """Raise a ConfigError naming ``who`` (``base``, ``--edited``...) when ``hub_model_problem`` finds one."""
    problem = hub_model_problem(spec, revision)
    if problem:
        raise ConfigError(f"{who}: {problem}")


def require_model(spec: str, who: str, revision: str | None = None) -> None:
    """Raise a ConfigError naming ``who`` for the first problem with the model ``spec`` that can be seen
    before loading it: a local folder that is missing or holds no model (``check_model_spec``), a hub id
    neither cached nor on the hub (``require_hub_model``). For the commands that load two models in turn,
    so that a wrong second one fails before the first is evaluated."""
    problems = check_model_spec(spec, who)
    if problems:
        raise ConfigError(problems[0])
    require_hub_model(spec, who, revision)


@contextmanager
def hub_cache_when_unreachable(spec: str, revision: str | None = None) -> Iterator[None]:
    """Load the hub model ``spec`` within this block from the local hub cache alone when it is cached there and
    the hub cannot be reached (``hub_unreachable``), saying so in one log line: the hub client's offline mode
    for the block, as HF_HUB_OFFLINE=1 would set, instead of its retries of every file request (minutes per
    model). Otherwise (a reachable hub, whose newer ``main`` is fetched as before; HF_HUB_OFFLINE set; a
    local folder; a model not cached) the block runs unchanged."""
    commit = hub_commit(spec, revision) if ModelSpec.parse(spec).kind == "hub" else None
    unreachable = hub_unreachable(spec, revision) if commit is not None else None
    if not unreachable:
        yield
        return
    from huggingface_hub import constants

    logging.getLogger("mneme_plugin").warning(
        "The hub (%s) cannot be reached (%s): loading %s from the local Hugging Face cache, commit %s "
        "(set HF_HUB_OFFLINE=1 to use the cache without asking the hub).", constants.ENDPOINT, unreachable, spec, commit)
    offline, offline_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    # The environment too: processes started in the block (vLLM's engine) read their hub client's mode from it.
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        if offline_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline_env


def _mistyped_local_folder(spec: str) -> str | None:
    """What is wrong with a hub-shaped name ``org/name`` that reads as a typo of a local model folder:
    ``org`` is a folder here holding a folder close to ``name`` (``models/edtied`` beside ``models/edited``),
    ``org/name`` is not, and no downloaded hub model of that name is cached. It would otherwise be looked
    up on the hub and, in ``mneme run``, only fail after the stages of the previous config were discarded.
    A folder merely named like the organisation (``meta-llama/`` beside ``meta-llama/Llama-3.2-3B``) leaves
    the name a hub name. None when fine."""
    parent, name = Path(spec).parent, Path(spec).name
    if not parent.is_dir() or _in_hub_cache(spec):
        return None
    held = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    close = difflib.get_close_matches(name, held, n=1)
    if not close:
        return None
    listing = ", ".join(held[:12]) + (", ..." if len(held) > 12 else "")
    return (f"there is no model folder {spec} (did you mean {parent / close[0]}?): {parent}/ holds {listing}. "
            f"Read as a hub name, {spec} is not in the local hub cache either; to use a hub model whose name is "
            f"this close to a folder here, download it first (`hf download {spec}`).")


def load_model(model: Any, device: str = "cpu", dtype: str = "float32", role: str = "model") -> Any:
    """The model object for ``model``: an object is returned unchanged; a string is a model spec
    (``ModelSpec``): ``organism:PATH`` loads a saved organism model, a hub name or local HF folder
    is booted with the TransformerBridge. ``role`` (``base`` / ``edited``) names it in errors."""
    if isinstance(model, str):
        spec = ModelSpec.parse(model)
        require_model(model, role)
        if spec.kind == "organism":
            # Imported here: the organism builds on this package, not the reverse.
            from mneme_plugin.organism.build import load_organism_model

            return load_organism_model(spec.location)
        from huggingface_hub.errors import HFValidationError
        from transformer_lens.model_bridge import TransformerBridge

        from mneme_plugin.devices import resolve_device

        device = str(resolve_device(device))
        try:
            with hub_cache_when_unreachable(model):
                bridge = TransformerBridge.boot_transformers(model, device=device, dtype=_torch_dtype(dtype))
        except (OSError, HFValidationError) as err:
            where = "model folder" if spec.kind == "local" else "hub model"
            who = "" if role == "model" else f"{role} "
            raise ConfigError(f"Cannot load the {who}{where} {model!r}: {str(err).splitlines()[0]}") from err
        bridge.eval()
        # Remembered for the manifest: a local folder by its absolute path, so a store harvested from `base` in
        # one working directory is not taken for one of another directory's `base` (``same_source``).
        bridge._mneme_source_name = str(Path(model).expanduser().resolve()) if spec.kind == "local" else model
        return bridge
    if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
        raise ConfigError(
            f"Expected a TransformerLens HookedTransformer / TransformerBridge or a model name, "
            f"got {type(model).__name__}."
        )
    return model


def same_model(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` name (or are) the same model: the same object, the same local folder
    (however the path is spelt) or the same hub name."""
    if a is b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def same_source(recorded: Any, now: str) -> bool:
    """Whether a model name a file recorded (a manifest's ``base_model``) is the model named ``now``
    (``model_name``). Local folders are recorded by their absolute path; a relative path recorded by an
    earlier version is resolved from the working directory, as it was then."""
    if recorded == now:
        return True
    return isinstance(recorded, str) and not Path(recorded).is_absolute() and same_model(recorded, now)


def model_name(model: Any) -> str:
    """The name recorded in the manifest."""
    return str(getattr(model, "_mneme_source_name", None) or getattr(model.cfg, "model_name", None) or type(model).__name__)


def model_tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"Model {model_name(model)} has no tokenizer; attach one (model.set_tokenizer(...)).")
    return tok


def model_device(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"Model dtype {name!r} is not one of {sorted(dtypes)}.")
    return dtypes[name]


def _vocab_size(model: Any) -> int:
    return int(getattr(model.cfg, "d_vocab", 0) or 0)


def validate_pair(base: Any, edited: Any, layer: int, hook_name: str, context_length: int | None = None) -> None:
    """Raise a clear error if the pair cannot be compared at ``hook_name`` over windows of
    ``context_length`` tokens."""
    nb, ne = model_name(base), model_name(edited)
    db, de = int(base.cfg.d_model), int(edited.cfg.d_model)
    if db != de:
        raise ModelMismatchError(
            f"d_model differs: base {nb} has d_model={db}, edited {ne} has d_model={de}. "
            "A crosscoder needs two models of the same architecture (the edited model must be a "
            "fine-tuned / unlearned copy of the base)."
        )
    lb, le = int(base.cfg.n_layers), int(edited.cfg.n_layers)
    if lb != le:
        raise ModelMismatchError(
            f"Layer count differs: base {nb} has {lb} layers, edited {ne} has {le}. "
            "Use an edited model derived from the base model."
        )
    vb, ve = _vocab_size(base), _vocab_size(edited)
    if vb != ve:
        raise ModelMismatchError(
            f"Vocabulary size differs: base {nb} has d_vocab={vb}, edited {ne} has d_vocab={ve}. "
            "Both models must share one tokenizer, since they are run on the same token ids."
        )
    tb, te = getattr(base, "tokenizer", None), getattr(edited, "tokenizer", None)
    if tb is not None and te is not None and tb is not te:
        if len(tb) != len(te) or tb.get_vocab() != te.get_vocab():
            vocab_b, vocab_e = tb.get_vocab(), te.get_vocab()
            diff = sorted(set(vocab_b.items()) ^ set(vocab_e.items()), key=lambda kv: kv[1])[:5]
            raise ModelMismatchError(
                f"Tokenizers differ: base {nb} has {len(tb)} tokens, edited {ne} has {len(te)}; "
                f"first differing (token, id) entries: {diff}. Both models must share one tokenizer."
            )
    if not 0 <= layer < lb:
        raise LayerOutOfRangeError(
            f"Layer {layer} is out of range for {nb}, which has {lb} layers: valid layers are 0..{lb - 1}."
        )
    for model in (base, edited):
        check_hook(model, hook_name)
        n_ctx = getattr(model.cfg, "n_ctx", None)
        if context_length is not None and isinstance(n_ctx, int) and 0 < n_ctx < context_length:
            raise ConfigError(
                f"context_length {context_length} is longer than {model_name(model)} reads ({n_ctx} positions): "
                f"use windows of at most {n_ctx} tokens (--context-length, harvest.context_length)."
            )


def check_hook(model: Any, hook_name: str) -> None:
    names = list(model.hook_dict.keys())
    if hook_name not in model.hook_dict:
        close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
        raise LayerOutOfRangeError(
            f"Hook {hook_name!r} does not exist in {model_name(model)}. "
            + (f"Close names: {close}." if close else f"It has {len(names)} hooks, e.g. {names[:5]}.")
        )


def forward_to_hook(model: Any, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """Activations at ``hook_name`` for ``tokens`` (B, T), without running later layers.

    A temporary hook stores the activation and raises a private exception; the model's own hook
    context manager removes the hook on the way out, so no hook is left behind.
    """
    captured: dict[str, torch.Tensor] = {}

    def grab(activation: torch.Tensor, hook: Any) -> None:
        captured["x"] = activation.detach()
        raise _StopForward

    import torch

    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(tokens.to(model_device(model)), return_type=None)
    except _StopForward:
        pass
    finally:
        # The bridge keeps the last HF KV cache; a truncated run leaves it incomplete.
        if hasattr(model, "_last_hf_cache"):
            try:
                del model._last_hf_cache
            except AttributeError:
                pass
    if "x" not in captured:
        raise LayerOutOfRangeError(f"Hook {hook_name!r} never fired in {model_name(model)}'s forward pass.")
    return captured["x"]
