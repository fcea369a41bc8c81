"""Write the WMDP-RMU smoke data into smoke/wmdp_rmu/ (relative to where it runs): a tiny random Llama,
forget / retain corpora, the MNEME corpus (general sentences with some forget-topic texts among them) and
local lm-eval tasks named like MMLU subjects and WMDP.

    python recipes/wmdp_rmu/make_smoke.py && mneme run recipes/wmdp_rmu/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smoke_data as sd  # noqa: E402
from tests.helpers import write_jsonl  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("smoke/wmdp_rmu")

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sd.tiny_model(OUT / "base", "llama")
    write_jsonl(OUT / "forget.jsonl", [{"text": t} for t in sd.forget_texts(240, seed=0)])
    sd.corpus(OUT / "retain.jsonl", n=240, seed=3)
    sd.corpus(OUT / "corpus.jsonl", n=800, topic=sd.FORGET_WORDS, n_topic=200)
    sd.lm_eval_tasks(OUT / "tasks", ["mmlu_anatomy", "mmlu_virology", "mmlu_college_biology",
                                     "mmlu_computer_security", "wmdp_bio", "wmdp_cyber"])
    print(f"Smoke data written to {OUT}")
