import numpy as np
import pandas as pd
import pytest
import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret.contexts import LatentContexts
from mneme_plugin.sideeffects import RemediateConfig, remediate, select_samples
from tests.helpers import make_hooked_transformer, make_tokenizer, synthetic_corpus


def _contexts(tokens: torch.Tensor) -> LatentContexts:
    return LatentContexts(
        latents=[3, 7, 9], tokens=tokens, locations=torch.zeros(0, 3, dtype=torch.long), values=torch.zeros(0),
        per_latent=[{"latent": 3, "top_rows": [0, 1, 2]}, {"latent": 7, "top_rows": [4, 5]},
                    {"latent": 9, "top_rows": [2, 3]}],
        n_tokens=int(tokens.numel()), n_contexts=len(tokens), background=np.zeros(0, dtype=np.int64),
    )


def test_samples_come_from_the_most_suppressed_collected_latents():
    tokens = torch.arange(60).view(6, 10)
    attribution = pd.DataFrame({"latent": [3, 7, 9, 11], "latent_class": ["suppressed", "amplified", "base_only", "base_only"],
                                "score": [0.4, -0.9, 0.8, 0.99]})
    rows, latents = select_samples(_contexts(tokens), attribution, RemediateConfig(samples_per_latent=2))
    assert latents == [9, 3]  # 11 was not collected, 7 is amplified
    assert torch.equal(rows, tokens[[2, 3, 0, 1]])
    with pytest.raises(ConfigError, match="No collected latent"):
        select_samples(_contexts(tokens), attribution, RemediateConfig(classes=("edited_only",)))


def test_remediation_lowers_the_loss_on_the_lost_material():
    tok = make_tokenizer()
    model = make_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    texts = synthetic_corpus(40, seed=9)
    ids = [tok.bos_token_id]
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
    samples = torch.tensor(ids[: 16 * 16]).view(16, 16)

    def evaluator(m):
        with torch.no_grad():
            return {"lost material": -m(samples, return_type="loss").item()}

    result = remediate(model, samples, RemediateConfig(steps=40, lr=3e-3, batch_size=8), evaluator=evaluator,
                       latents=[1], progress=False)
    assert result.after["lost material"] > result.before["lost material"] + 0.5
    assert list(result.table().columns) == ["category", "before_remediation", "after_remediation"]
