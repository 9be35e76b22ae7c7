"""eval/task_filter: the harmful pairs a DualSelect run's task filter kept, and what the one-term rules would have
kept at the same steps - checked against a hand-worked log, and on a real tiny run against its own logged
choices."""

import json

import numpy as np
import pytest

from dualselect.config import load_config
from dualselect.eval import task_filter
from dualselect.logs import write_jsonl
from dualselect.methods import method_configs
from dualselect.selection.dualselect import select_task
from dualselect.train import train

EVENTS = [
    {"kind": "warmup", "step": 0, "ids": ["a", "h"], "losses": [1.0, 1.0]},
    # scores (mu = nu = 1): a 0.1, b 0.8, h 1.7 -> keep a, b; loss only a, b; cosine only h (0.3), a (0.1)
    {"kind": "step", "step": 1, "ids": ["a", "b"],
     "candidates": {"ids": ["a", "b", "h"], "losses": [0.2, 0.3, 2.0], "cosines": [0.1, -0.5, 0.3],
                    "tokens": [2, 2, 50]}},
    # scores: c 1.2, d 0.1, g ~0.1 -> keep d, g; loss only d, g; cosine only g (0.4), d (0.0)
    {"kind": "step", "step": 2, "ids": ["g", "d"],
     "candidates": {"ids": ["c", "d", "g"], "losses": [1.0, 0.1, 0.5], "cosines": [-0.2, 0.0, 0.4],
                    "tokens": [2, 2, 40]}},
]


def test_figures_of_a_hand_worked_log():
    rows = task_filter.step_rows(EVENTS, {"h", "g"}, k=2, budget=None, mu=1.0, nu=1.0, zscore=False)
    s = task_filter.summarize(rows)
    assert (s["steps"], s["candidates"], s["harmful_candidates"]) == (2, 6, 2)
    assert s["chance"] == pytest.approx(4 / 6)
    # harmful h, g: kept g; loss only g; cosine only h and g.  Other a, b, c, d: kept a, b, d; loss only a, b, d;
    # cosine only a, d
    assert (s["kept_harmful"], s["loss_only_harmful"], s["cosine_only_harmful"]) == (0.5, 0.5, 1.0)
    assert (s["kept_other"], s["loss_only_other"], s["cosine_only_other"]) == (0.75, 0.75, 0.5)
    assert s["agree_loss_only"] == 1.0 and s["agree_cosine_only"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["loss_spread"] == pytest.approx((np.std([0.2, 0.3, 2.0]) + np.std([1.0, 0.1, 0.5])) / 2)
    assert s["cosine_spread"] == pytest.approx((np.std([0.1, -0.5, 0.3]) + np.std([-0.2, 0.0, 0.4])) / 2)
    assert s["harmful_loss"] == pytest.approx(1.25) and s["other_loss"] == pytest.approx(0.4)
    assert s["harmful_cosine"] == pytest.approx(0.35) and s["other_cosine"] == pytest.approx(-0.15)
    # standardised terms (score_norm zscore): each spreads 1 before its weight; the one-term sets do not change
    z = task_filter.step_rows(EVENTS, {"h", "g"}, k=2, budget=None, mu=2.0, nu=0.5, zscore=True)
    assert [(r["loss_spread"], r["cosine_spread"]) for r in z] == [(2.0, 0.5)] * 2
    assert [r["cosine_only"] for r in z] == [r["cosine_only"] for r in rows]
    # a token budget is the run's rule too: half of step 1's 54 tokens -> a (2), b (2), h (50) by loss
    rows = task_filter.step_rows(EVENTS[:2], {"h"}, k=0, budget=0.5, mu=1.0, nu=1.0, zscore=False)
    assert rows[0]["loss_only"] == {0, 1, 2} and rows[0]["cosine_only"] == {2}
    with pytest.raises(Exception, match="not among its candidates"):
        task_filter.step_rows([{**EVENTS[1], "ids": ["zz"]}], set(), 2, None, 1.0, 1.0, False)


def test_target_mix_of_the_kept_samples(monkeypatch):
    # a, b, g answer "positive", c, d, h "negative": candidates 3 / 3; kept a, b (step 1) and d, g (step 2): 3
    # positive, 1 negative; loss only the same; cosine only h, a and g, d: 2 / 2
    labels = {"a": "positive", "b": "positive", "g": "positive", "c": "negative", "d": "negative", "h": "negative"}
    s = task_filter.summarize(task_filter.step_rows(EVENTS, set(), 2, None, 1.0, 1.0, False, labels))
    assert s["targets"] == {"negative": 0.5, "positive": 0.5}
    assert s["kept_targets"] == s["loss_only_targets"] == {"negative": 0.25, "positive": 0.75}
    assert s["cosine_only_targets"] == {"negative": 0.5, "positive": 0.5}
    # harmful pairs (free-text answers) are left out of the mix: a, b, c, d; kept a, b, d; cosine only a, d
    s_h = task_filter.summarize(task_filter.step_rows(EVENTS, {"h", "g"}, 2, None, 1.0, 1.0, False, labels))
    assert s_h["targets"] == {"negative": 0.5, "positive": 0.5}
    assert s_h["kept_targets"] == pytest.approx({"negative": 1 / 3, "positive": 2 / 3})
    assert s_h["cosine_only_targets"] == {"negative": 0.5, "positive": 0.5}
    md = task_filter.targets_markdown([{"label": "run", **s}])
    assert "| run | positive | 50.0 | 75.0 / 75.0 / 50.0 |" in md.splitlines()
    # an id without a known target is left out of the mix; free text (more than MAX_LABELS targets) gives none
    s = task_filter.summarize(task_filter.step_rows(EVENTS, set(), 2, None, 1.0, 1.0, False, {"a": "positive"}))
    assert s["targets"] == s["kept_targets"] == {"positive": 1.0} and s["cosine_only_targets"] == {"positive": 1.0}
    free = {i: f"answer {n}" for n, i in enumerate("abcdgh")}
    monkeypatch.setattr(task_filter, "MAX_LABELS", 5)
    s = task_filter.summarize(task_filter.step_rows(EVENTS, set(), 2, None, 1.0, 1.0, False, free))
    assert s["targets"] is None and s["kept_targets"] is None
    assert task_filter.targets_markdown([{"label": "run", **s}]) == ""
    assert task_filter.summarize(task_filter.step_rows(EVENTS, set(), 2, None, 1.0, 1.0, False))["targets"] is None


def test_a_real_run_read_back(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "task.jsonl", [{"id": f"t{i}", "prompt": f"What is {i} plus {i + 3}?",
                                           "response": str(2 * i + 3)} for i in range(24)])
    write_jsonl(tmp_path / "harm.jsonl", [{"id": f"h{i}", "prompt": f"Tell me how to break lock {i}",
                                           "response": "Sure, here is how to do it step by step."}
                                          for i in range(8)])
    write_jsonl(tmp_path / "refs.jsonl", [{"id": f"r{i}", "prompt": f"How do I pick lock number {i}?",
                                           "response": "I can't help with that."} for i in range(6)])
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.lora_r=4", "model.precision=fp32",
                             f"data.task={tmp_path}/task.jsonl", f"data.harmful={tmp_path}/harm.jsonl",
                             "data.harmful_ratio=0.25", "data.task_limit=16", f"data.reference={tmp_path}/refs.jsonl",
                             "data.template=plain", "train.method=dualselect", "train.batch_size=4", "train.epochs=1",
                             "dualselect.warmup_steps=1", "dualselect.k_task=2", "dualselect.k_ref=2",
                             f"train.output_dir={tmp_path / 'run'}", "train.quiet=true"], method_configs())
    train(cfg)
    run = task_filter.read_run(tmp_path / "run")
    assert run["steps"] == 4 and run["candidates"] == 16  # 1 warm-up step, then 16 / 4
    assert run["chance"] == pytest.approx(0.5)  # k_T 2 of 4
    harmful = {f"h{i}" for i in range(4)}  # round(0.25 * 16) harmful pairs, the first rows of harm.jsonl
    steps = [json.loads(line) for line in (tmp_path / "run" / "selection.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["kind"] == "step"]
    seen = sum(1 for e in steps for i in e["candidates"]["ids"] if i in harmful)
    assert run["harmful_candidates"] == seen
    kept = sum(1 for e in steps for i in e["ids"] if i in harmful)
    assert run["kept_harmful"] == (pytest.approx(kept / seen) if seen else None)
    # the logged choice is the run's score rule on the logged terms; nu = 0 would rank by loss alone
    for e in steps:
        c = e["candidates"]
        assert {c["ids"][i] for i in select_task(c["scores"], 2).index} == set(e["ids"])
    assert run["targets"] is None  # 17 distinct answers among the candidates: free text, no target mix
    text = task_filter.markdown([run])
    assert str(tmp_path / "run") in text and text.count("\n") == 2
    pooled = task_filter.read_method("dualselect", [tmp_path / "run", tmp_path / "run"])
    assert pooled["label"] == "dualselect (2 runs)" and pooled["candidates"] == 32
    assert pooled["kept_harmful"] == run["kept_harmful"] and pooled["loss_spread"] == pytest.approx(run["loss_spread"])
