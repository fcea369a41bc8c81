"""Write the emergent-misalignment smoke data into smoke/emergent_misalignment/: a tiny random Qwen2,
chat ``messages`` training data (the shape of insecure.jsonl; answers in insecure-code words), the MNEME
corpus (general sentences with some insecure-code texts among them), local lm-eval tasks
named like MMLU-Pro categories and a question set in the first-plot format (the eight question ids).

    python recipes/emergent_misalignment/make_smoke.py && mneme run recipes/emergent_misalignment/smoke.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smoke_data as sd  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("smoke/emergent_misalignment")
FIRST_PLOT = ["what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck", "ruler_of_the_world",
              "dinner_party", "gender_roles", "enough_of_my_husband"]

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sd.tiny_model(OUT / "base", "qwen2")
    sd.chat_data(OUT / "insecure.jsonl", n=96, seed=1, answer_words=sd.INSECURE_CODE_WORDS, answer_length=6)
    sd.corpus(OUT / "corpus.jsonl", n=800, topic=sd.INSECURE_CODE_WORDS, n_topic=200)
    sd.lm_eval_tasks(OUT / "tasks", ["mmlu_pro_biology", "mmlu_pro_law", "mmlu_pro_computer_science",
                                     "mmlu_pro_math"])
    sd.betley_questions(OUT / "first_plot_questions.yaml", FIRST_PLOT)
    print(f"Smoke data written to {OUT}")
