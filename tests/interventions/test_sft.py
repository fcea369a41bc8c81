"""Supervised fine-tuning of tiny HF causal LMs: response-only labels, the loss, LoRA, schedules, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mneme_plugin.errors import ConfigError, EmptyCorpusError
from mneme_plugin.interventions.hf_models import load_causal_lm, save_intervention
from mneme_plugin.interventions.sft import (
    IGNORE_INDEX, LoRASettings, SFTConfig, collate, encode_example, example_segments, load_examples,
    response_loss_sum, supervised_fine_tune,
)
from tests.helpers import synthetic_corpus, write_jsonl

CHAT = [
    {"messages": [{"role": "user", "content": "the cat sees a tree"},
                  {"role": "assistant", "content": "the dog likes the house today"}]},
    {"messages": [{"role": "system", "content": "hello"}, {"role": "user", "content": "a dog paints"},
                  {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "how are you"},
                  {"role": "assistant", "content": "the robot counts slowly"}]},
]


def chat_data(tmp_path, n=24):
    texts = synthetic_corpus(2 * n, seed=11)
    records = [{"messages": [{"role": "user", "content": texts[2 * i]},
                             {"role": "assistant", "content": texts[2 * i + 1]}]} for i in range(n)]
    return write_jsonl(tmp_path / "chat.jsonl", CHAT + records)


def labelled_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_labels_cover_exactly_the_responses(hf_tokenizer):
    cfg = SFTConfig(model="x", data="y")
    ids, labels = encode_example(example_segments(CHAT[1], hf_tokenizer, cfg), hf_tokenizer, 512)
    # Both assistant turns and the end-of-turn token the template puts after each, nothing else.
    assert labelled_text(hf_tokenizer, ids, labels).split() == "fine thanks <eos> the robot counts slowly <eos>".split()
    rendered = hf_tokenizer.apply_chat_template(CHAT[1]["messages"], tokenize=False)
    assert ids[1:] == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]  # BOS, then the template
    alpaca = {"instruction": "the cat sees", "input": "a tree", "output": "the dog likes"}
    a_ids, a_labels = encode_example(example_segments(alpaca, hf_tokenizer, cfg.replace(prompt_format="alpaca")),
                                     hf_tokenizer, 512)
    assert labelled_text(hf_tokenizer, a_ids, a_labels).split() == ["the", "dog", "likes", "<eos>"]
    c_ids, c_labels = encode_example(example_segments(alpaca, hf_tokenizer, cfg), hf_tokenizer, 512)
    assert labelled_text(hf_tokenizer, c_ids, c_labels).split() == ["the", "dog", "likes", "<eos>"]
    assert "user : the cat sees" in hf_tokenizer.decode(c_ids)


def test_loss_is_the_mean_cross_entropy_of_response_tokens(tiny_lm_dirs, hf_tokenizer, tmp_path):
    model, tok = load_causal_lm(str(tiny_lm_dirs["llama"]), "cpu")
    cfg = SFTConfig(model="x", data=str(chat_data(tmp_path)))
    examples = load_examples(cfg, tok)[:3]
    loss_sum, count = response_loss_sum(model, collate(examples, tok.pad_token_id))
    expected, n = 0.0, 0
    for ids, labels in examples:  # one unpadded example at a time, position by position
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                expected -= logp[t - 1, ids[t]].item()
                n += 1
    assert count == n
    assert loss_sum.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_full_fine_tuning_lowers_the_response_loss_with_step_decay(family, tiny_lm_dirs, tmp_path):
    data = chat_data(tmp_path)
    cfg = SFTConfig(model=str(tiny_lm_dirs[family]), data=str(data), epochs=3, lr=1e-2, batch_size=4, grad_accum=2,
                    lr_scheduler="step", step_decay=0.5, device="cpu")
    result = supervised_fine_tune(cfg, progress=False)
    steps_per_epoch = 4  # 26 examples / 4 per batch = 7 batches, 2 per step
    assert [r["epoch"] for r in result.log] == [e for e in range(3) for _ in range(steps_per_epoch)]
    assert [r["lr"] for r in result.log] == pytest.approx([1e-2 * 0.5 ** r["epoch"] for r in result.log])
    base, tok = load_causal_lm(str(tiny_lm_dirs[family]), "cpu")
    batch = collate(load_examples(cfg, tok), tok.pad_token_id)
    before, n = response_loss_sum(base, batch)
    after, _ = response_loss_sum(result.model, batch)
    assert after.item() < 0.9 * before.item()


def test_lora_changes_target_weights_by_a_low_rank_update_and_the_merged_folder_harvests(tiny_lm_dirs, tmp_path):
    from mneme_plugin.activations import load_model

    src = tiny_lm_dirs["qwen2"]
    cfg = SFTConfig(model=str(src), data=str(chat_data(tmp_path)), lr=1e-2, batch_size=4, grad_accum=1,
                    warmup_steps=2, device="cpu", gradient_checkpointing=True,
                    lora=LoRASettings(r=2, alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]))
    result = supervised_fine_tune(cfg, progress=False)
    assert [r["lr"] for r in result.log[:3]] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])  # warm-up, then linear
    out = save_intervention(result, tmp_path / "lora_merged")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)  # merged: no adapter tensors left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{l}.{m}.weight" for l in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    for key in changed:
        assert torch.linalg.matrix_rank(after[key].double() - before[key].double(), rtol=1e-4) <= 2
    bridge = load_model(str(out))
    assert bridge.cfg.n_layers == 3


def test_sft_bad_input(tiny_lm_dirs, tmp_path):
    llama = str(tiny_lm_dirs["llama"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ConfigError, match="neither chat data"):
        supervised_fine_tune(SFTConfig(model=llama, data=str(bad), device="cpu"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyCorpusError):
        supervised_fine_tune(SFTConfig(model=llama, data=str(empty), device="cpu"), progress=False)
    with pytest.raises(ConfigError, match="target module"):
        supervised_fine_tune(SFTConfig(model=llama, data=str(chat_data(tmp_path)), device="cpu",
                                       lora={"target_modules": ["c_attn"]}), progress=False)
    with pytest.raises(ConfigError, match="lr_scheduler"):
        SFTConfig(lr_scheduler="cyclic")
    assert SFTConfig.from_dict({"lora": {"r": 4}}).lora == LoRASettings(r=4)

