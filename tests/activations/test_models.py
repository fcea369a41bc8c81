"""Model loading, pair validation and the stop-early forward."""

from __future__ import annotations

import pytest
import torch

from mneme_plugin.activations import HarvestConfig, forward_to_hook, harvest, load_model, validate_pair
from mneme_plugin.errors import ConfigError, LayerOutOfRangeError, ModelMismatchError
from tests.helpers import make_hooked_transformer, make_tokenizer

HOOK = "blocks.1.hook_resid_post"


def _tokens(tok, n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, len(tok), (n, t), generator=g)
    x[:, 0] = tok.bos_token_id
    return x


@pytest.mark.parametrize("pair", ["ht_pair", "bridge_pair"])
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", HOOK, "blocks.1.hook_resid_pre"])
def test_stop_early_equals_full_forward(pair, hook, request, tiny_tokenizer):
    for model in request.getfixturevalue(pair):
        x = _tokens(tiny_tokenizer)
        _, cache = model.run_with_cache(x, names_filter=[hook])
        got = forward_to_hook(model, x, hook)
        assert torch.equal(got, cache[hook])
        # The temporary hook is gone and the model still runs normally.
        assert not model.hook_dict[hook].fwd_hooks
        assert model(x).shape[:2] == x.shape


def test_bridge_boots_local_folder_by_name(bridge_pair, llama_dir):
    base, _ = bridge_pair
    assert HOOK in base.hook_dict
    assert base.cfg.d_model == 32 and base.cfg.n_layers == 2
    assert str(llama_dir) in base._mneme_source_name


def test_pair_is_really_different(ht_pair, tiny_tokenizer):
    base, edited = ht_pair
    x = _tokens(tiny_tokenizer)
    assert not torch.allclose(forward_to_hook(base, x, HOOK), forward_to_hook(edited, x, HOOK))


def test_d_model_mismatch(ht_pair, tiny_tokenizer):
    other = make_hooked_transformer(tiny_tokenizer, d_model=48, n_heads=4)
    with pytest.raises(ModelMismatchError, match=r"d_model=32.*d_model=48"):
        validate_pair(ht_pair[0], other, 1, HOOK)


def test_layer_count_mismatch(ht_pair, tiny_tokenizer):
    other = make_hooked_transformer(tiny_tokenizer, n_layers=3)
    with pytest.raises(ModelMismatchError, match=r"2 layers.*3"):
        validate_pair(ht_pair[0], other, 1, HOOK)


def test_vocab_size_mismatch(ht_pair):
    tok = make_tokenizer(["completely different words only here"] * 3)
    other = make_hooked_transformer(tok)
    with pytest.raises(ModelMismatchError, match="d_vocab"):
        validate_pair(ht_pair[0], other, 1, HOOK)


def test_tokenizer_mapping_mismatch(ht_pair, tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tiny_tokenizer.get_vocab())
    a, b = "cat", "dog"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different mapping
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.init_kwargs.update(name_or_path="swapped", add_bos_token=True)
    other = make_hooked_transformer(tok)
    with pytest.raises(ModelMismatchError, match="Tokenizers differ"):
        validate_pair(ht_pair[0], other, 1, HOOK)


def test_layer_out_of_range(ht_pair, corpus):
    with pytest.raises(LayerOutOfRangeError, match=r"0\.\.1"):
        harvest(*ht_pair, corpus, HarvestConfig(layer=5), progress=False)


def test_unknown_hook_lists_close_names(ht_pair):
    with pytest.raises(LayerOutOfRangeError, match="hook_resid_post"):
        validate_pair(*ht_pair, 1, "blocks.1.hook_resid_pots")


def test_not_a_model():
    with pytest.raises(ConfigError, match="HookedTransformer"):
        load_model(torch.nn.Linear(2, 2))


def test_config_validation():
    with pytest.raises(ConfigError, match="dtype"):
        HarvestConfig(layer=1, dtype="int8")
    with pytest.raises(ConfigError, match="outlier_factor"):
        HarvestConfig(layer=1, outlier_factor=0.5)
    with pytest.raises(ConfigError, match="layer"):
        HarvestConfig(layer=-1)
    assert HarvestConfig(layer=3, hook_name="blocks.{layer}.hook_mlp_out").resolved_hook_name == "blocks.3.hook_mlp_out"
    assert HarvestConfig.from_dict(HarvestConfig(layer=2).to_dict()) == HarvestConfig(layer=2)


def test_a_missing_or_empty_model_folder_is_a_config_error(tmp_path, llama_dir):
    """Issue 11 item 6: no hub lookup and no traceback for a folder that is not a model."""
    from mneme_plugin.activations import load_model
    from mneme_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"model: the model folder {tmp_path / 'nope'} does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=rf"model: the model folder {tmp_path / 'empty'} is empty"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no config.json"):
        load_model(str(tmp_path / "other"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((llama_dir / "config.json").read_text())  # no weights, no tokenizer
    with pytest.raises(ConfigError, match=rf"Cannot load the model folder '{broken}'"):
        load_model(str(broken))
    # Run stages name which model failed.
    with pytest.raises(ConfigError, match=rf"Cannot load the edited model folder '{broken}'"):
        load_model(str(broken), role="edited")
    with pytest.raises(ConfigError, match=rf"base: the model folder {tmp_path / 'nope'} does not exist"):
        load_model(str(tmp_path / "nope"), role="base")


def test_windows_longer_than_the_models_read(ht_pair, corpus):
    n_ctx = ht_pair[0].cfg.n_ctx
    with pytest.raises(ConfigError, match=rf"context_length {2 * n_ctx} is longer than .* \({n_ctx} positions\)"):
        harvest(*ht_pair, corpus, HarvestConfig(layer=1, context_length=2 * n_ctx), progress=False)


def test_a_mistyped_local_model_folder_is_not_taken_for_a_hub_name(tmp_path, monkeypatch, hub_cache, llama_dir):
    """`models/edtied` beside a local `models/` folder is a typo, refused at once with the folder's
    contents, not looked up on the hub; a hub model of that name in the local cache is still accepted."""
    import shutil

    from mneme_plugin.activations import load_model
    from mneme_plugin.activations.models import check_model_spec
    from mneme_plugin.errors import ConfigError
    from tests.helpers import hub_cache_repo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copytree(llama_dir, tmp_path / "models" / "edited")
    problems = check_model_spec("models/edtied", "models.edited")
    assert len(problems) == 1
    assert problems[0].startswith("models.edited: there is no model folder models/edtied "
                                  "(did you mean models/edited?): models/ holds edited.")
    with pytest.raises(ConfigError, match="there is no model folder models/edtied"):
        load_model("models/edtied", role="edited")
    # An organisation that is no local folder stays a hub name; a cached hub model is accepted.
    assert check_model_spec("other-org/edtied", "models.edited") == []
    hub_cache_repo(hub_cache, "models/edtied", llama_dir)
    assert check_model_spec("models/edtied", "models.edited") == []


def test_a_local_folder_named_like_a_hub_organisation_leaves_its_hub_names_alone(tmp_path, monkeypatch, hub_cache):
    """A folder `meta-llama/` here (the user's own notes, say) whose folders are nothing like `Llama-3.2-3B`
    does not make `meta-llama/Llama-3.2-3B` a mistyped local folder: it stays a hub name."""
    from mneme_plugin.activations.models import ModelSpec, check_model_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta-llama" / "eval-notes").mkdir(parents=True)
    assert ModelSpec.parse("meta-llama/Llama-3.2-3B").kind == "hub"
    assert check_model_spec("meta-llama/Llama-3.2-3B", "models.base") == []
    (tmp_path / "meta-llama" / "Llama-3.2-3B-edited").mkdir()  # a close match: read as a typo of it
    assert check_model_spec("meta-llama/Llama-3.2-3B", "models.base")[0].startswith(
        "models.base: there is no model folder meta-llama/Llama-3.2-3B (did you mean meta-llama/Llama-3.2-3B-edited?)")


def test_a_hub_model_s_weights_are_its_commit_in_the_local_hub_cache(tmp_path, hub_cache, llama_dir):
    """`weights_digest`, what every cache key and stage digest names a model's weights by: a hub id not
    downloaded has none (its name is all there is), a cached one the commit its revision resolves to, which
    moves with `refs/main`; a local folder its files' metadata."""
    from mneme_plugin.activations.models import weights_digest
    from mneme_plugin.files import stat_digest
    from tests.helpers import hub_cache_repo

    assert weights_digest("someone/tiny") is None
    hub_cache_repo(hub_cache, "someone/tiny", llama_dir, commit="a" * 40)
    assert weights_digest("someone/tiny") == "hub commit " + "a" * 40
    assert weights_digest("someone/tiny") == weights_digest("someone/tiny", "main")  # unchanged cache, same digest
    hub_cache_repo(hub_cache, "someone/tiny", llama_dir, commit="b" * 40)  # a new commit on main downloaded
    assert weights_digest("someone/tiny") == "hub commit " + "b" * 40
    assert weights_digest("someone/tiny", "a" * 40) == "hub commit " + "a" * 40  # a revision pinned to a commit
    (hub_cache / "models--someone--tiny" / "refs" / "v1").write_text("a" * 40)  # a tag
    assert weights_digest("someone/tiny", "v1") == "hub commit " + "a" * 40
    assert weights_digest("someone/tiny", "v2") is None
    assert weights_digest(str(llama_dir)) == stat_digest(llama_dir) is not None


def test_a_hub_id_neither_cached_nor_downloadable_fails_at_once_saying_what_to_do(tmp_path, hub_cache, llama_dir):
    """Offline, a hub id not in the local hub cache is refused before the hub client is asked; with the
    hub unreachable (an endpoint nothing listens on), after one request, without the client's retries."""
    import os
    import socket
    from pathlib import Path
    import subprocess
    import sys

    from mneme_plugin.activations import load_model
    from mneme_plugin.interventions.hf_models import load_causal_lm
    from tests.helpers import hub_cache_repo

    expected = (rf"base: the hub model someone/nmae is neither a local model folder nor in the local Hugging Face cache "
                rf"\({hub_cache}\), and HF_HUB_OFFLINE is set, so it is not downloaded: check the spelling, or download "
                r"it first \(`hf download someone/nmae`\)")
    with pytest.raises(ConfigError, match=expected):
        load_model("someone/nmae", role="base")
    with pytest.raises(ConfigError, match="model: the hub model someone/nmae is neither"):
        load_causal_lm("someone/nmae", device="cpu")
    hub_cache_repo(hub_cache, "someone/name", llama_dir)
    assert load_model("someone/name").cfg.n_layers == 2  # a cached one loads, offline

    with socket.socket() as sock:  # a local port nothing listens on: the hub is unreachable
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint,
           "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = "from mneme_plugin.activations import load_model\nload_model('someone/nmae', role='edited')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Retrying" not in run.stderr
    assert (f"ConfigError: edited: the hub model someone/nmae is neither a local model folder nor in the local Hugging "
            f"Face cache ({hub_cache}), and the hub ({endpoint}) cannot be reached") in run.stderr
    assert "or set HF_HUB_OFFLINE=1 to use only the local cache" in run.stderr


def test_a_cached_hub_model_loads_from_the_cache_after_one_probe_when_the_hub_cannot_be_reached(hub_cache, llama_dir, tiny_tokenizer):
    """HF_HUB_OFFLINE unset and the hub unreachable (an endpoint that drops every connection, then a closed port): the models and
    the tokenizer of a hub id in the local hub cache load from there after one request in all, with one log
    line per load naming the cached commit, instead of the hub client's retries of every optional file."""
    import os
    import re
    import socket
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from tests.helpers import hub_cache_repo

    commit = "c" * 40

    def logged(endpoint):
        return (re.escape(f"The hub ({endpoint}) cannot be reached (") + r"\w+Error: .+" + re.escape(
            f"): loading someone/tiny from the local Hugging Face cache, commit {commit} (set HF_HUB_OFFLINE=1 to use "
            "the cache without asking the hub).\n"))

    hub_cache_repo(hub_cache, "someone/tiny", llama_dir, commit=commit)  # no .no_exist markers: as `hf download` leaves it
    requests = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def drop_every_connection():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:  # the server socket was closed
                    return
                requests.append(conn.recv(200).split(b"\r\n")[0].decode())
                conn.close()

        threading.Thread(target=drop_every_connection, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint,
               "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        code = ("from mneme_plugin.activations import load_model\n"
                "from mneme_plugin.interventions.hf_models import load_causal_lm\n"
                "from mneme_plugin.interpret.explain import load_tokenizer\n"
                "print(load_model('someone/tiny').cfg.n_layers)\n"
                "print(load_causal_lm('someone/tiny', device='cpu')[0].config.num_hidden_layers)\n"
                "print(len(load_tokenizer('unused', 'someone/tiny')))\n")
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "2", str(len(tiny_tokenizer))]
    assert "Retrying" not in run.stderr
    # One probe for the whole process (the hub client may also ask, once, about agent harnesses).
    assert [r for r in requests if "someone/tiny" in r] == ["GET /api/models/someone/tiny HTTP/1.1"], requests
    assert len(re.findall(logged(endpoint), run.stderr)) == 3, run.stderr

    with socket.socket() as sock:  # a local port nothing listens on, as on a node without a route out
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env["HF_ENDPOINT"] = endpoint
    # A process started while the cache is used (as vLLM starts its engine) uses it too, and later ones do not.
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"HF_HUB_OFFLINE\"])'])\n"
    code = (code.split("print(load_causal_lm")[0] + "from mneme_plugin.activations.models import hub_cache_when_unreachable\n"
            "with hub_cache_when_unreachable('someone/tiny'):\n    " + child + child)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["2", "1", "0"], run.stderr
    assert "Retrying" not in run.stderr
    assert len(re.findall(logged(endpoint), run.stderr)) == 2, run.stderr


def test_with_hf_hub_offline_set_the_cache_is_used_as_before_without_a_probe(hub_cache, llama_dir):
    from mneme_plugin.activations.models import _HUB_UNREACHABLE, hub_cache_when_unreachable, hub_unreachable
    from tests.helpers import hub_cache_repo

    hub_cache_repo(hub_cache, "someone/tiny", llama_dir)
    assert hub_unreachable("someone/tiny") is None
    with hub_cache_when_unreachable("someone/tiny"):
        pass
    assert _HUB_UNREACHABLE == {}  # nothing asked


def test_a_hub_id_not_downloaded_yet_is_asked_about_once_per_process(hub_cache):
    """`mneme run` checks its hub models before the first stage and every loader checks again: the hub's
    answer about an id (it has it; it has no such model) is remembered, so one request per id suffices,
    and a mistyped id still fails at once with the hub's answer."""
    import os
    import subprocess
    import sys
    import threading
    from http.server import ThreadingHTTPServer
    from pathlib import Path

    requests = []

    def answer(path):  # a local hub that has someone/real and nothing else
        return FOUND if path.startswith("/api/models/someone/real") else REPO_NOT_FOUND

    server = ThreadingHTTPServer(("127.0.0.1", 0), hub_handler(requests, answer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
               "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_CACHE": str(hub_cache),
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        code = ("from mneme_plugin.activations.models import hub_model_problem, require_hub_model\n"
                "from mneme_plugin.errors import ConfigError\n"
                "print(hub_model_problem('someone/real'))\n"
                "require_hub_model('someone/real', 'base')\n"
                "print(hub_model_problem('someone/nmae'))\n"
                "try:\n"
                "    require_hub_model('someone/nmae', 'edited')\n"
                "except ConfigError as err:\n"
                "    print(err)\n")
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr
    real, nmae = ([r for r in requests if r.startswith(f"/api/models/someone/{name}")] for name in ("real", "nmae"))
    assert len(real) == 1 and len(nmae) == 1, requests
    lines = run.stdout.splitlines()
    assert lines[0] == "None" and "the hub has no model someone/nmae" in lines[1], run.stdout
    assert lines[2].startswith("edited: the hub model someone/nmae") and lines[2].endswith(lines[1][-60:]), run.stdout


def test_an_unreachable_hub_or_a_server_error_is_asked_again_after_a_while(monkeypatch):
    """A run lasts hours: a network blip or a hub server error at its first check was remembered for the
    whole process, so every later hub model was refused (or loaded offline) after the network came back.
    Those outcomes now stand for HUB_RECHECK_AFTER_S; a lasting answer (no such model) stays remembered."""
    import socket
    import threading
    from http.server import ThreadingHTTPServer

    from huggingface_hub import constants

    from mneme_plugin.activations import models

    requests = []

    def answer(path):  # someone/flaky: a server error at first, then found; someone/real found; nothing else
        if path.startswith("/api/models/someone/flaky"):
            return FOUND if sum(r.startswith("/api/models/someone/flaky") for r in requests) > 1 else SERVER_BUSY
        return FOUND if path.startswith("/api/models/someone/real") else REPO_NOT_FOUND

    with socket.socket() as sock:  # a port nothing listens on yet: the hub is unreachable
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_HUB_UNREACHABLE", {})
    monkeypatch.setattr(models, "_HUB_ANSWERS", {})
    assert models.hub_unreachable("someone/real") is not None
    server = ThreadingHTTPServer(("127.0.0.1", port), hub_handler(requests, answer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert models.hub_unreachable("someone/real") is not None and requests == []  # remembered for a while
        monkeypatch.setattr(models, "HUB_RECHECK_AFTER_S", 0.0)  # ... which has passed: asked again
        assert models.hub_unreachable("someone/real") is None and len(requests) == 1
        monkeypatch.setattr(models, "HUB_RECHECK_AFTER_S", 300.0)
        first = models._probe_hub("someone/flaky", None)
        assert first.response.status_code == 503 and models._probe_hub("someone/flaky", None) is first
        assert len(requests) == 2
        monkeypatch.setattr(models, "HUB_RECHECK_AFTER_S", 0.0)
        assert models._probe_hub("someone/flaky", None) is None and len(requests) == 3  # the hub has it now
        assert "the hub has no model someone/nmae" in models.hub_model_problem("someone/nmae")
        assert "the hub has no model someone/nmae" in models.hub_model_problem("someone/nmae")
        assert len(requests) == 4  # a missing model is asked about once, whatever the time
    finally:
        server.shutdown()
        server.server_close()


# A local hub's answers to `GET /api/models/<id>`: (status, JSON body, extra headers).
FOUND = (200, {"id": "someone/real", "sha": "e" * 40}, {})
REPO_NOT_FOUND = (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
SERVER_BUSY = (503, {"error": "busy"}, {})


def hub_handler(requests, answer):
    """A request handler for a local hub: each path is appended to ``requests``, ``answer(path)`` answers it."""
    import json
    from http.server import BaseHTTPRequestHandler

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            status, payload, headers = answer(self.path)
            body = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Hub
