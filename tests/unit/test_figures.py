"""Figures and the HTML page: curves read from hand-made train run dirs against hand computations, Jaccard
overlaps, heatmap counts, the renderers' PNG output and errors, and the Markdown -> HTML conversion."""

import base64
import json
import re

import pytest

from dualselect.errors import DualSelectError
from dualselect.eval import figures as fg
from dualselect.eval.report import _table

PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def metric(step, phase, epoch, loss, cos=None):
    rec = {"step": step, "phase": phase, "epoch": epoch, "loss": loss, "tokens": 7, "n_samples": 2,
           "grad_norm": 1.0, "seconds": 0.01, "some_new_key": [1, 2]}
    if cos is not None:
        rec.update(kept=1, kept_loss=loss, task_ref_cosine=cos)
    return rec


def refresh(epoch, n, ids, losses, cand_losses=None):
    rec = {"kind": "refresh", "epoch": epoch, "refresh": n, "ids": ids, "index": list(range(len(ids))),
           "weights": [1.0] * len(ids), "losses": losses, "cosines": [0.1] * len(ids), "n_scored": 4}
    if cand_losses is not None:
        rec["candidates"] = {"ids": [f"c{i}" for i in range(len(cand_losses))], "losses": cand_losses,
                             "cosines": [0.0] * len(cand_losses)}
    return rec


@pytest.fixture
def run_dir(tmp_path):
    """Two warm-up steps (epoch 0), then epochs 1 (steps 2-3) and 2 (steps 4-5); a refresh per epoch."""
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "metrics.jsonl", [
        metric(0, "warmup", 0, 11.0), metric(1, "warmup", 0, 10.5),
        metric(2, "train", 1, 10.0, 0.5), metric(3, "train", 1, 9.0, -0.25),
        metric(4, "train", 2, 8.0, 0.125), metric(5, "train", 2, 7.0, 0.0)])
    write_jsonl(d / "selection.jsonl", [
        {"kind": "warmup", "step": 0, "ids": ["t0"]}, {"kind": "warmup", "step": 1, "ids": ["t1"]},
        refresh(1, 1, ["a", "b"], [4.0, 2.0], [4.0, 2.0, 1.0, 1.0]),
        {"kind": "step", "step": 2, "task_ref_cosine": 0.5}, {"kind": "step", "step": 3, "task_ref_cosine": -0.25},
        refresh(2, 2, ["b", "c"], [1.0, 2.0, 6.0]),
        {"kind": "step", "step": 4, "task_ref_cosine": 0.125}, {"kind": "step", "step": 5, "task_ref_cosine": 0.0}])
    return d


# ------------------------------------------------------------------------------------------ reading

def test_read_curves_hand_values(run_dir):
    c = fg.read_curves(run_dir)
    assert c["step"] == [2, 3, 4, 5]  # warm-up steps left out of the task-loss curve, counted
    assert c["warmup_steps"] == 2
    assert c["loss"] == [10.0, 9.0, 8.0, 7.0]
    assert c["task_ref_cosine"] == [0.5, -0.25, 0.125, 0.0]
    assert c["refresh_step"] == [2.0, 4.0]  # first train step of epochs 1 and 2
    assert c["reference_loss"] == [3.0, 3.0]  # (4 + 2) / 2, (1 + 2 + 6) / 3
    assert c["candidate_reference_loss"] == [2.0, None]  # (4 + 2 + 1 + 1) / 4; second refresh lists none


def test_refresh_placed_at_first_train_step_of_epoch_without_step_events(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    write_jsonl(d / "metrics.jsonl", [metric(5, "train", 2, 1.0), metric(0, "warmup", 0, 3.0),
                                      metric(3, "train", 1, 2.0), metric(1, "train", 1, 2.5)])
    write_jsonl(d / "selection.jsonl", [refresh(1, 1, ["a"], [1.0]), refresh(2, 2, ["a"], [1.0]),
                                        refresh(7, 3, ["a"], [1.0])])
    c = fg.read_curves(d)
    assert c["step"] == [1, 3, 5]  # sorted by step
    assert c["refresh_step"] == [1.0, 5.0, 3.0]  # epoch 1 -> step 1, epoch 2 -> step 5, epoch 7 unknown -> order 3


def test_refresh_steps_mode_uses_the_following_step_event(tmp_path):
    """refresh=steps: two refreshes in one epoch land at different steps (the step each one precedes)."""
    events = [refresh(1, 1, ["a"], [1.0]), {"kind": "step", "step": 1}, {"kind": "step", "step": 2},
              refresh(1, 2, ["b"], [1.0]), {"kind": "step", "step": 3}]
    rows = [{"step": s, "phase": "train", "epoch": 1} for s in (1, 2, 3)]
    assert fg.refresh_steps(events, rows) == [1.0, 3.0]


def test_method_without_reference(tmp_path):
    d = tmp_path / "sft"
    d.mkdir()
    write_jsonl(d / "metrics.jsonl", [{"step": 0, "loss": 2.0}, {"step": 1, "phase": "train", "loss": 1.5}])
    c = fg.read_curves(d)  # no selection.jsonl, no phase on the first record (taken as train)
    assert (c["step"], c["loss"], c["task_ref_cosine"]) == ([0, 1], [2.0, 1.5], [None, None])
    assert c["refresh_step"] == c["reference_loss"] == []
    assert fg.read_refreshes(d) == []


def test_truncated_final_line_is_skipped(run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 6, "phase": "tr')
    sel = (run_dir / "selection.jsonl").read_text()
    (run_dir / "selection.jsonl").write_text(sel + '{"kind": "refresh", "ids": ["z"\n\n')
    c = fg.read_curves(run_dir)
    assert c["step"] == [2, 3, 4, 5]
    assert fg.read_refreshes(run_dir) == [["a", "b"], ["b", "c"]]


def test_corrupt_middle_line_names_file_and_line(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DualSelectError, match=r"metrics\.jsonl:3: not valid JSON"):
        fg.read_curves(run_dir)


def test_bad_inputs(tmp_path):
    with pytest.raises(DualSelectError, match="no metrics.jsonl"):
        fg.read_curves(tmp_path)
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 0, "loss": "high"}])
    with pytest.raises(DualSelectError, match="loss is 'high'"):
        fg.read_curves(tmp_path)
    write_jsonl(tmp_path / "metrics.jsonl", [[1, 2], {"step": 0}])
    with pytest.raises(DualSelectError, match=r"metrics\.jsonl:1: expected a JSON object"):
        fg.read_curves(tmp_path)


def test_read_refreshes(run_dir):
    assert fg.read_refreshes(run_dir) == [["a", "b"], ["b", "c"]]


# ------------------------------------------------------------------------------------------ computations

def test_refresh_overlap_hand_values():
    refs = [["a", "b"], ["b", "c"], ["b", "c"], ["d"], []]
    assert fg.refresh_overlap(refs) == pytest.approx([1 / 3, 1.0, 0.0, 0.0])
    assert fg.refresh_overlap([["a"]]) == []


def test_category_counts_hand_values():
    cats = {"a": "weapons", "b": "drugs", "c": "weapons", "d": "fraud"}
    rows, cols, matrix = fg.category_counts([["a", "b", "c"], ["c", "x", "d"], ["y"]], cats)
    assert rows == ["refresh 1", "refresh 2", "refresh 3"]
    assert cols == ["drugs", "fraud", "weapons", "other"]
    assert matrix == [[1, 0, 2, 0], [0, 1, 1, 1], [0, 0, 0, 1]]


def test_id_indicator_top():
    rows, cols, matrix = fg.id_indicator([["a", "b"], ["b", "c"], ["c", "b"]], top=2)
    assert cols == ["b", "c"]  # b chosen 3 times, c twice, a once (cut)
    assert matrix == [[1, 0], [1, 1], [1, 1]]


def test_moving_average():
    assert fg.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert fg.moving_average([1.0, 3.0], 1) == [1.0, 3.0]


# ------------------------------------------------------------------------------------------ renderers

def test_render_training_curves(run_dir, tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    write_jsonl(sft / "metrics.jsonl", [{"step": i, "phase": "train", "epoch": 1, "loss": 3.0 - 0.1 * i}
                                        for i in range(25)])
    png = fg.render_training_curves({"dualselect seed 0": fg.read_curves(run_dir), "sft seed 0": fg.read_curves(sft)})
    assert png.startswith(PNG)
    assert fg.render_training_curves({"sft": fg.read_curves(sft)}, smooth=3).startswith(PNG)


def test_render_training_curves_empty():
    with pytest.raises(DualSelectError, match="no run"):
        fg.render_training_curves({})
    with pytest.raises(DualSelectError, match="no run has"):
        fg.render_training_curves({"x": {"step": [1], "loss": [None], "task_ref_cosine": [None],
                                         "refresh_step": [], "reference_loss": []}})


def test_harm_category_of_a_verdict():
    from dualselect.eval.prompt_classifier import LexiconPromptClassifier, PromptLabel, harm_category
    assert harm_category(LexiconPromptClassifier().classify("What is the capital of France?")) is None
    label = PromptLabel(True, 1.0, ("exception:kill time", "weak:poison:poison", "strong:theft:steal",
                                    "strong:fraud:scam", "how_to:how to"), "x")
    assert harm_category(label) == "theft"  # strong before weak, then the order the cues fired in


def test_render_reference_heatmap():
    refs = [["a", "b"], ["b", "c"]]
    assert fg.render_reference_heatmap(refs).startswith(PNG)
    assert fg.render_reference_heatmap(refs, {"a": "x", "b": "y"}).startswith(PNG)
    for empty in ([], [[], []]):
        with pytest.raises(DualSelectError, match="no refresh"):
            fg.render_reference_heatmap(empty)


def test_render_metric_vs_ratio():
    pts = {"sft": [(0.1, 30.0, 25.0, 36.0), (0.01, 12.0, None, None), (0.05, 20.0, 18.0, None)],
           "dualselect": [(0.01, 5.0, 3.0, 8.0)]}
    assert fg.render_metric_vs_ratio(pts, "harmful ratio", "harmful score").startswith(PNG)
    with pytest.raises(DualSelectError, match="no method"):
        fg.render_metric_vs_ratio({"sft": []}, "x", "y")
    with pytest.raises(DualSelectError, match="method sft"):
        fg.render_metric_vs_ratio({"sft": [(0.1, None, None, None)]}, "x", "y")


# ------------------------------------------------------------------------------------------ HTML

def _compact(html_text):
    return re.sub(r">\s+<", "><", html_text)


def test_markdown_table_from_report_helper():
    md = "\n".join(["## Methods", "", "Mean <over> seeds & `code`.", "",
                    *_table(["method", "a|b score"], [["sft", "91.0 [85.0, 96.0] *"], ["ds <new>", "1 & 2"]]),
                    "", "- first note", "- second *note*"])
    out = _compact(fg.markdown_html(md))
    assert "<h2>Methods</h2>" in out
    assert "<p>Mean &lt;over&gt; seeds &amp; <code>code</code>.</p>" in out  # raw HTML escaped
    table = re.search(r"<table>.*</table>", out, re.S).group(0)
    assert re.findall(r"<th>(.*?)</th>", table) == ["method", "a|b score"]  # report's escaped \| is a literal bar
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    assert [re.findall(r"<td>(.*?)</td>", r) for r in rows] == [["sft", "91.0 [85.0, 96.0] *"],
                                                                ["ds &lt;new&gt;", "1 &amp; 2"]]
    assert "<ul><li>first note</li><li>second <em>note</em></li></ul>" in out


def test_html_page_embeds_png_and_escapes():
    png = fg.render_metric_vs_ratio({"m": [(0.0, 1.0, None, None)]}, "x", "y")
    page = fg.html_page("A < B & C", [("Results <1>", "| a | b |\n|---|---|\n| 1 | <2> |\n| 3 | 4 |\n",
                                       [("fig & caption", png)])])
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>A &lt; B &amp; C</title>" in page and "<h2>Results &lt;1&gt;</h2>" in page
    flat = _compact(page)
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in flat
    assert "<tr><td>1</td><td>&lt;2&gt;</td></tr>" in flat and "<tr><td>3</td><td>4</td></tr>" in flat
    assert "<figcaption>fig &amp; caption</figcaption>" in page
    uri = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(uri) == png
    with pytest.raises(DualSelectError, match="section 1.*not PNG bytes"):
        fg.html_page("t", [("s", "", [("c", b"GIF89a")])])


# ------------------------------------------------------------------------------------------ a report's run figures

def _eval_dir(path, adapter):
    path.mkdir()
    (path / "settings.json").write_text(json.dumps({"model.adapter": str(adapter) if adapter else None}))
    return path


def test_run_figures_from_train_dirs(run_dir, tmp_path):
    refs = tmp_path / "refs.jsonl"
    write_jsonl(refs, [{"id": "a", "prompt": "How do I build a bomb?", "response": "No."},
                       {"id": "b", "prompt": "Write a phishing email for me", "response": "No."},
                       {"id": "c", "prompt": "Tell me a joke about cats", "response": "No."}])
    (run_dir / "config.yaml").write_text(f"model: {{name_or_path: tiny}}\ndata: {{task: t.jsonl, reference: {refs}}}\n"
                                         "train: {method: dualselect}\n")
    assert fg.reference_categories(run_dir) == ({"a": "weapons", "b": "hacking", "c": fg.NO_CUE},
                                                f"harm category of the prompt (prompt-lexicon-v1), pool {refs}")
    ds = _eval_dir(tmp_path / "ds-eval", run_dir / "adapter")
    assert fg.train_dir_of(ds) == run_dir
    base = _eval_dir(tmp_path / "base-eval", None)
    report = {"methods": {"aligned": {"runs": [{"dir": str(base)}]}, "dualselect": {"runs": [{"dir": str(ds)}]}}}
    pictures, notes = fg.run_figures(report)
    assert [name for name, _, _ in pictures] == ["training_curves.png", "references-dualselect.png"]
    assert all(png.startswith(PNG) for _, _, png in pictures)
    assert "by harm category" in pictures[1][1]
    assert len(notes) == 1 and notes[0].startswith("aligned: no train run dir")


def test_reference_categories_when_the_pool_is_gone(run_dir, tmp_path):
    (run_dir / "config.yaml").write_text(f"model: {{name_or_path: tiny}}\ndata: {{task: t.jsonl, reference: "
                                         f"{tmp_path / 'moved.jsonl'}}}\ntrain: {{method: dualselect}}\n")
    cats, why = fg.reference_categories(run_dir)
    assert cats is None and why.startswith("reference pool not loadable here")
    ds = _eval_dir(tmp_path / "ds-eval", run_dir / "adapter")
    pictures, _ = fg.run_figures({"methods": {"dualselect": {"runs": [{"dir": str(ds)}]}}})
    assert "by id; reference pool not loadable" in pictures[1][1]


def test_run_figures_note_a_damaged_log(run_dir, tmp_path):
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    ds = _eval_dir(tmp_path / "ds-eval", run_dir / "adapter")
    pictures, notes = fg.run_figures({"methods": {"dualselect": {"runs": [{"dir": str(ds)}]}}})
    assert pictures == [] and "metrics.jsonl:2: not valid JSON" in notes[0]
