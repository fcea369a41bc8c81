"""The ground-truth table's lm-eval reader."""

import json

from mneme_plugin.groundtruth import read_lm_eval_results, scores_from_lm_eval


def test_lm_eval_results_are_read(tmp_path):
    def write(name, accs):
        data = {"results": {f"mmlu_{k}": {"alias": k, "acc,none": v, "acc_stderr,none": 0.01} for k, v in accs.items()},
                "n-samples": {f"mmlu_{k}": {"original": 100, "effective": 100} for k in accs}}
        (tmp_path / name).write_text(json.dumps(data))
        return tmp_path / name

    before = write("b.json", {"virology": 0.6, "anatomy": 0.5})
    after = write("a.json", {"virology": 0.3, "anatomy": 0.5})
    frame = read_lm_eval_results(before)
    assert set(frame["category"]) == {"virology", "anatomy"} and set(frame["n"]) == {100}
    scores = scores_from_lm_eval(before, after).set_index("category")
    assert scores.loc["virology", "after"] == 0.3
