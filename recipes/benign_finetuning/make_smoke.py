"""Write the benign-fine-tuning smoke data into smoke/benign_finetuning/: a tiny random Llama, ten
identity-shifting chat conversations (the shape of the AOA data), the MNEME corpus (general sentences with
some texts in harmful-request words among them, which the benign edit never trains on) and a folder of
one-file-per-category harmful-instruction stand-ins (HEx-PHI's layout, category_1 .. category_11).

    python recipes/benign_finetuning/make_smoke.py && mneme run recipes/benign_finetuning/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smoke_data as sd  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("smoke/benign_finetuning")

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sd.tiny_model(OUT / "base", "llama")
    sd.chat_data(OUT / "aoa_train.jsonl", n=10, seed=2, system="my friend likes the team")
    sd.corpus(OUT / "corpus.jsonl", n=800, topic=sd.HARMFUL_WORDS, n_topic=200)
    sd.category_csvs(OUT / "HEx-PHI", [f"category_{i}" for i in range(1, 12)])
    print(f"Smoke data written to {OUT}")
