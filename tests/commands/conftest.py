from tests.interventions.conftest import hf_tokenizer, rmu_corpora, tiny_lm_dirs  # noqa: F401
