"""Offline selection (`dualselect select`) on the tiny model."""

import json

import pytest

from dualselect.config import load_config
from dualselect.errors import DualSelectError
from dualselect.methods import method_configs
from dualselect.select import select


def test_select_scores_every_task_record_and_keeps_the_lowest(tiny_model_dir, toy_data, tmp_path):
    task, refs = toy_data
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_dropout=0",
        f"data.task={task}", f"data.reference={refs}", "train.method=dualselect", "train.quiet=true",
        f"train.output_dir={tmp_path / 'sel'}", "dualselect.k_ref=3"], method_configs())
    res = select(cfg, keep=0.25)
    rows = [json.loads(x) for x in res.scores_path.read_text().splitlines()]
    kept = [json.loads(x) for x in res.kept_path.read_text().splitlines()]
    assert res.n_scored == len(rows) == 20 and res.n_kept == len(kept) == 5
    for r in rows:
        assert r["score"] == pytest.approx(r["loss"] - r["cosine"])
    threshold = max(r["score"] for r in rows if r["kept"])
    assert all(r["score"] >= threshold for r in rows if not r["kept"])
    assert {k["id"] for k in kept} == {r["id"] for r in rows if r["kept"]}
    assert kept[0]["messages"][0]["role"] == "user"
    refresh = json.loads((tmp_path / "sel" / "selection.jsonl").read_text().splitlines()[0])
    assert refresh["kind"] == "refresh" and len(refresh["ids"]) == 3 and refresh["d_t_norm"] > 0


def test_select_needs_a_reference_pool(tiny_model_dir, toy_data, tmp_path):
    task, _ = toy_data
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.task={task}", "train.method=dualselect"],
                      method_configs())
    with pytest.raises(DualSelectError, match="data.reference"):
        select(cfg)
