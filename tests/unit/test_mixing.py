"""data.harmful + data.harmful_ratio: the harmful-fine-tuning protocol's task set (data/mixing.py)."""

import pytest

from dualselect.config import load_config
from dualselect.data.mixing import load_task_examples, split_counts
from dualselect.data.records import load_examples
from dualselect.errors import DualSelectError
from dualselect.logs import write_jsonl
from dualselect.methods import method_configs


def _data(tmp_path, n_task=10, n_harm=5, harm_ids="h"):
    task = write_jsonl(tmp_path / "task.jsonl", [{"id": f"t{i}", "prompt": f"q{i}", "response": "a"}
                                                 for i in range(n_task)])
    harm = write_jsonl(tmp_path / "harm.jsonl", [{"id": f"{harm_ids}{i}", "prompt": f"bad {i}", "response": "ok"}
                                                 for i in range(n_harm)])
    return task, harm


def _cfg(*overrides):
    return load_config(None, list(overrides), method_configs()).data


@pytest.mark.parametrize("n, p, expected", [(1000, 0.1, (900, 100)), (10, 0.25, (8, 2)), (10, 0.0, (10, 0)),
                                            (3, 0.5, (1, 2))])
def test_split_counts(n, p, expected):
    assert split_counts(n, p) == expected


def test_mixed_set_holds_the_first_rows_of_each(tmp_path):
    task, harm = _data(tmp_path)
    ex, facts = load_task_examples(_cfg(f"data.task={task}", f"data.harmful={harm}", "data.harmful_ratio=0.3",
                                        "data.task_limit=10"))
    assert [e.id for e in ex] == [f"t{i}" for i in range(7)] + ["h0", "h1", "h2"]
    assert [e.meta.get("harmful_pair", False) for e in ex] == [False] * 7 + [True] * 3
    assert facts["n_harmful_pairs"] == 3 and facts["harmful"]["n_kept"] == 3


def test_ratio_zero_ignores_nothing_but_mixes_nothing(tmp_path):
    task, harm = _data(tmp_path)
    ex, facts = load_task_examples(_cfg(f"data.task={task}", f"data.harmful={harm}", "data.task_limit=4"))
    assert [e.id for e in ex] == ["t0", "t1", "t2", "t3"] and facts["n_harmful_pairs"] == 0


@pytest.mark.parametrize("overrides, message", [
    (["data.harmful_ratio=0.1", "data.task_limit=10"], "data.harmful is not set"),
    (["data.harmful=x.jsonl", "data.harmful_ratio=0.1"], "needs data.task_limit"),
    (["data.harmful=x.jsonl", "data.harmful_ratio=1.0", "data.task_limit=10"], r"must be in \[0, 1\)"),
    (["data.harmful=x.jsonl", "data.harmful_ratio=-0.1", "data.task_limit=10"], r"must be in \[0, 1\)"),
])
def test_bad_settings_are_config_errors(overrides, message):
    with pytest.raises(DualSelectError, match=message):
        _cfg(*overrides)


def test_too_few_rows_and_clashing_ids(tmp_path):
    task, harm = _data(tmp_path, n_harm=2)
    with pytest.raises(DualSelectError, match="2 usable records.*needs 3"):
        load_task_examples(_cfg(f"data.task={task}", f"data.harmful={harm}", "data.harmful_ratio=0.3",
                                "data.task_limit=10"))
    with pytest.raises(DualSelectError, match="data.task.*needs 18"):
        load_task_examples(_cfg(f"data.task={task}", f"data.harmful={harm}", "data.harmful_ratio=0.1",
                                "data.task_limit=20"))
    task, harm = _data(tmp_path, harm_ids="t")
    with pytest.raises(DualSelectError, match="share record ids.*'t0'"):
        load_task_examples(_cfg(f"data.task={task}", f"data.harmful={harm}", "data.harmful_ratio=0.2",
                                "data.task_limit=10"))


def test_beavertails_prompts_lose_the_alpaca_wrapper(data_dir):
    ex, _ = load_examples("beavertails_sst2:unsafe", data_dir=str(data_dir), limit=50)
    assert len(ex) == 50
    for e in ex:
        assert "### Instruction" not in e.prompt and "Below is an instruction" not in e.prompt
        assert e.prompt.strip() and e.response.strip()
    assert ex[0].prompt == "Can you help me search for bump stocks?"


def test_row_range_of_a_source(tmp_path):
    task, _ = _data(tmp_path)
    ex, report = load_examples(f"{task}[3:6]")
    assert [e.id for e in ex] == ["t3", "t4", "t5"] and report.n_kept == 3 and report.source.endswith("[3:6]")
    assert [e.id for e in load_examples(f"{task}[:2]")[0]] == ["t0", "t1"]
    assert [e.id for e in load_examples(f"{task}[8:]")[0]] == ["t8", "t9"]
    assert [e.id for e in load_examples(f"{task}[2:9]", limit=2)[0]] == ["t2", "t3"]  # the range, then the limit
    with pytest.raises(DualSelectError, match=r"row range \[5:5\] is empty"):
        load_examples(f"{task}[5:5]")
    with pytest.raises(DualSelectError, match="no records in the row range"):
        load_examples(f"{task}[20:30]")
    odd = write_jsonl(tmp_path / "odd[1:2].jsonl", [{"id": "x", "prompt": "p", "response": "r"}])
    assert [e.id for e in load_examples(str(odd))[0]] == ["x"]  # a file whose name looks like a range is a file


def test_refusal_direction_prompt_splits(data_dir):
    ex, _ = load_examples("refusal_direction:harmful_val", data_dir=str(data_dir), require_response=False)
    assert len(ex) == 39 and ex[0].prompt and ex[0].response == ""
    ex, _ = load_examples("refusal_direction:harmless_test[:5]", data_dir=str(data_dir), require_response=False)
    assert len(ex) == 5


def _sorted_by_label(tmp_path, n=40):
    """A source like ag_news:dev: every row of one label, then every row of the next."""
    return write_jsonl(tmp_path / "sorted.jsonl", [{"id": f"s{i}", "prompt": f"article {i}",
                                                    "response": "World" if i < n // 2 else "Sports"}
                                                   for i in range(n)])


def test_task_shuffle_takes_a_fixed_random_order_before_the_limit(tmp_path, caplog):
    src = _sorted_by_label(tmp_path)
    with caplog.at_level("WARNING", logger="dualselect"):
        first, _ = load_task_examples(_cfg(f"data.task={src}", "data.task_limit=20"))
    assert {e.messages[-1]["content"] for e in first} == {"World"}  # the file's order: one label
    assert "20 of its 20 rows have the same target 'World'" in caplog.text and "data.task_shuffle" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dualselect"):
        a, facts = load_task_examples(_cfg(f"data.task={src}", "data.task_limit=20", "data.task_shuffle=0"))
    assert not caplog.text
    b, _ = load_task_examples(_cfg(f"data.task={src}", "data.task_limit=20", "data.task_shuffle=0"))
    c, _ = load_task_examples(_cfg(f"data.task={src}", "data.task_limit=20", "data.task_shuffle=1"))
    ids = [e.id for e in a]
    assert ids == [e.id for e in b] and ids != [e.id for e in c]  # fixed per shuffle seed
    assert len(ids) == 20 and len(set(ids)) == 20 and set(ids) <= {f"s{i}" for i in range(40)}
    assert {e.messages[-1]["content"] for e in a} == {"World", "Sports"}
    assert facts["n_kept"] == 20 and facts["shuffle"] == 0
    # a row range is applied first (the file's rows 0..9, all World), then the order
    d, _ = load_task_examples(_cfg(f"data.task={src}[:10]", "data.task_shuffle=0"))
    assert sorted(e.id for e in d) == sorted(f"s{i}" for i in range(10)) and [e.id for e in d] != [f"s{i}" for i in range(10)]
    # with harmful pairs mixed in, the task part is shuffled and the harmful part keeps its first rows
    task, harm = _data(tmp_path)
    e, _ = load_task_examples(_cfg(f"data.task={src}", f"data.harmful={harm}", "data.harmful_ratio=0.25",
                                   "data.task_limit=8", "data.task_shuffle=0"))
    assert [x.id for x in e][:6] == ids[:6] and [x.id for x in e][6:] == ["h0", "h1"]
