"""The demo's generated data: sizes, determinism, train/held-out disjointness, formats."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from dualselect import demo_data as dd
from dualselect.errors import DualSelectError

FILES = ("align_harmful", "align_benign_prompts", "task_train", "task_test", "reference",
         "heldout_harmful", "heldout_benign")
CHAT_FILES = ("align_harmful", "task_train", "reference")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user_prompt(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo0")
    paths = dd.write_demo_data(out, seed=0)
    return out, paths, {k: read_jsonl(p) for k, p in paths.items()}


# ------------------------------------------------------------------ files, sizes, format

def test_files_and_sizes(written):
    out, paths, rows = written
    assert set(paths) == set(FILES)
    for name, p in paths.items():
        assert p == out / f"{name}.jsonl" and p.is_file()
    assert len(rows["align_harmful"]) == 220
    assert len(rows["reference"]) == 100
    assert len(rows["task_train"]) == 400
    assert len(rows["task_test"]) == 200
    assert len(rows["heldout_harmful"]) == 110
    assert len(rows["align_benign_prompts"]) >= 120
    assert len(rows["heldout_benign"]) >= 60
    # only the seven files, no temp leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.jsonl" for n in FILES)


def test_chat_format_and_ids(written):
    _, paths, rows = written
    ids = []
    for name in FILES:
        for i, r in enumerate(rows[name]):
            assert isinstance(r["id"], str) and r["id"], (name, i)
            ids.append(r["id"])
            if name in CHAT_FILES:
                m = r["messages"]
                assert [x["role"] for x in m] == ["user", "assistant"], (name, i)
                assert all(isinstance(x["content"], str) and x["content"].strip() for x in m), (name, i)
                assert r["flag"] in ("refusal", "task", "unsafe") and r["category"], (name, i)
            else:
                assert isinstance(r["prompt"], str) and r["prompt"].strip(), (name, i)
    assert len(ids) == len(set(ids)), "ids must be unique across all files"
    for r in rows["task_test"]:
        assert r["answer"] in dd.TASK_LABELS
    for r in rows["heldout_harmful"]:
        assert r["category"] in dd.CATEGORIES and r["kind"] == "harmful"
    for r in rows["heldout_benign"]:
        assert r["kind"] in ("normal", "scary") and r["category"]
    for r in rows["align_benign_prompts"]:
        assert r["kind"] in ("normal", "scary", "instruction") and r["category"]
    assert sum(r["kind"] == "instruction" for r in rows["align_benign_prompts"]) >= 40
    # every line is one JSON object
    for p in paths.values():
        for line in p.read_text(encoding="utf-8").splitlines():
            assert isinstance(json.loads(line), dict)


# ------------------------------------------------------------------ determinism

def test_same_seed_identical_files(tmp_path, written):
    _, paths, _ = written
    again = dd.write_demo_data(tmp_path / "again", seed=0)
    for name in FILES:
        assert again[name].read_bytes() == paths[name].read_bytes(), name


def test_different_seed_differs(tmp_path, written):
    _, paths, _ = written
    other = dd.write_demo_data(tmp_path / "s1", seed=1)
    for name in ("align_harmful", "task_train", "task_test", "reference", "heldout_harmful"):
        assert other[name].read_bytes() != paths[name].read_bytes(), name


def test_generators_deterministic():
    assert dd.harmful_prompts("train", 3) == dd.harmful_prompts("train", 3)
    assert dd.harmful_prompts("heldout", 3) != dd.harmful_prompts("heldout", 4)
    assert dd.task_examples(50, 2, "test") == dd.task_examples(50, 2, "test")
    assert dd.task_examples(50, 2, "train") != dd.task_examples(50, 5, "train")
    assert dd.benign_prompts("train", 1) == dd.benign_prompts("train", 1)


# ------------------------------------------------------------------ harmful prompts

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_harmful_splits_share_no_action_or_object_per_category(seed):
    train, held = dd.harmful_prompts("train", seed), dd.harmful_prompts("heldout", seed)
    assert len(dd.CATEGORIES) >= 8
    assert {r["category"] for r in train} == set(dd.CATEGORIES) == {r["category"] for r in held}
    for cat in dd.CATEGORIES:
        tr = [r for r in train if r["category"] == cat]
        ho = [r for r in held if r["category"] == cat]
        assert {r["action"] for r in tr}.isdisjoint({r["action"] for r in ho}), cat
        assert {r["object"] for r in tr}.isdisjoint({r["object"] for r in ho}), cat
        # text-level check, independent of the metadata: no training object appears in a held-out prompt
        tr_objects = {r["object"].lower() for r in tr}
        for r in ho:
            assert not any(o in r["prompt"].lower() for o in tr_objects), r["prompt"]
    # some phrasings are held out too
    assert {r["phrasing"] for r in held} - {r["phrasing"] for r in train}


def test_harmful_prompts_many_and_unique():
    train, held = dd.harmful_prompts("train", 0), dd.harmful_prompts("heldout", 0)
    keys_tr = [dd.normalize_text(r["prompt"]) for r in train]
    keys_ho = [dd.normalize_text(r["prompt"]) for r in held]
    assert len(set(keys_tr)) == len(keys_tr) >= 500
    assert len(set(keys_ho)) == len(keys_ho) >= 300
    assert set(keys_tr).isdisjoint(keys_ho)
    for r in train + held:
        assert r["core"] in r["prompt"] and r["object"] in r["core"]
        assert r["prompt"].count("without") <= 1, r["prompt"]
    with pytest.raises(DualSelectError, match="split"):
        dd.harmful_prompts("test", 0)


def test_each_category_in_files(written):
    _, _, rows = written
    for name in ("align_harmful", "reference", "heldout_harmful"):
        counts = Counter(r["category"] for r in rows[name])
        assert set(counts) == set(dd.CATEGORIES), name
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    unsafe = [r for r in rows["task_train"] if r["flag"] == "unsafe"]
    assert set(r["category"] for r in unsafe) == set(dd.CATEGORIES)


# ------------------------------------------------------------------ disjointness across files

@pytest.mark.parametrize("seed", [0, 2])
def test_heldout_disjoint_from_all_training(tmp_path, seed):
    paths = dd.write_demo_data(tmp_path, seed=seed, n_task=600, harmful_fraction=0.3)
    rows = {k: read_jsonl(p) for k, p in paths.items()}
    keys = {k: [dd.normalize_text(user_prompt(r)) for r in v] for k, v in rows.items()}
    training = set(keys["align_harmful"]) | set(keys["reference"]) | set(keys["task_train"]) \
        | set(keys["align_benign_prompts"])
    for held in ("heldout_harmful", "heldout_benign"):
        assert len(set(keys[held])) == len(keys[held]), held
        assert training.isdisjoint(keys[held]), held
    assert set(keys["heldout_harmful"]).isdisjoint(keys["heldout_benign"])
    # the three harmful training uses are pairwise disjoint, and each is duplicate-free
    unsafe = [dd.normalize_text(user_prompt(r)) for r in rows["task_train"] if r["flag"] == "unsafe"]
    groups = [keys["align_harmful"], keys["reference"], unsafe]
    for g in groups:
        assert len(set(g)) == len(g)
    assert sum(len(g) for g in groups) == len(set().union(*map(set, groups)))
    # held-out harmful actions/objects never occur in any training-side harmful prompt of the category
    held_train = dd.harmful_prompts("train", seed)
    by_prompt = {r["prompt"]: r for r in held_train}
    used = [by_prompt[user_prompt(r)] for name in ("align_harmful", "reference") for r in rows[name]]
    used += [by_prompt[user_prompt(r)] for r in rows["task_train"] if r["flag"] == "unsafe"]
    for r in rows["heldout_harmful"]:
        same = [u for u in used if u["category"] == r["category"]]
        assert all(u["object"] != r["object"] and u["action"] != r["action"] for u in same)


def test_task_train_test_disjoint(written):
    _, _, rows = written
    train_texts = {dd.normalize_text(r["messages"][0]["content"]) for r in rows["task_train"]
                   if r["flag"] == "task"}
    test_texts = {dd.normalize_text(r["prompt"]) for r in rows["task_test"]}
    assert train_texts.isdisjoint(test_texts)
    # also across seeds and at larger sizes: the split is a partition of the review space
    a = {dd.normalize_text(e["text"]) for e in dd.task_examples(1500, 0, "train")}
    b = {dd.normalize_text(e["text"]) for e in dd.task_examples(1500, 1, "test")}
    assert len(a) == 1500 and len(b) == 1500
    assert a.isdisjoint(b)


# ------------------------------------------------------------------ harmful fraction

@pytest.mark.parametrize("n_task,p", [(400, 0.2), (250, 0.1), (100, 0.0), (37, 0.3), (99, 0.15), (60, 1.0)])
def test_harmful_fraction_exact(tmp_path, n_task, p):
    paths = dd.write_demo_data(tmp_path, seed=0, n_task=n_task, harmful_fraction=p, n_task_test=10)
    rows = read_jsonl(paths["task_train"])
    assert len(rows) == n_task
    flags = Counter(r["flag"] for r in rows)
    assert flags["unsafe"] == round(p * n_task)
    assert flags["task"] == n_task - round(p * n_task)
    assert set(flags) <= {"unsafe", "task"}


def test_unsafe_rows_are_mixed_in(written):
    _, _, rows = written
    flags = [r["flag"] for r in rows["task_train"]]
    first_unsafe = flags.index("unsafe")
    last_unsafe = len(flags) - 1 - flags[::-1].index("unsafe")
    assert first_unsafe < len(flags) // 4 and last_unsafe > 3 * len(flags) // 4


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(DualSelectError, match="harmful_fraction"):
        dd.write_demo_data(tmp_path / "a", harmful_fraction=1.5)
    with pytest.raises(DualSelectError, match="n_task"):
        dd.write_demo_data(tmp_path / "b", n_task=-1)
    with pytest.raises(DualSelectError, match="exhausted"):
        dd.write_demo_data(tmp_path / "c", n_task=100_000, harmful_fraction=1.0)
    for sub in ("a", "b", "c"):
        assert not (tmp_path / sub).exists() or not any((tmp_path / sub).iterdir())


# ------------------------------------------------------------------ refusals and compliance

def _starts_with_refusal(text: str) -> bool:
    return text.startswith(dd.REFUSAL_PREFIXES)


def test_refusal_texts(written):
    _, _, rows = written
    assert len(dd.refusal_templates()) >= 20
    for name in ("align_harmful", "reference"):
        for r in rows[name]:
            text = r["messages"][1]["content"]
            assert _starts_with_refusal(text), text
            assert r["flag"] == "refusal"
            assert "{" not in text and "}" not in text
            assert not text.lower().startswith("sure")
    distinct = {r["messages"][1]["content"] for r in rows["align_harmful"]}
    assert len(distinct) >= 20
    openers = {t.split(".")[0] for t in distinct}
    assert len(openers) >= 10


def test_every_template_starts_with_refusal_phrase():
    for cat in list(dd.CATEGORIES) + [None]:
        for i in range(200):
            text = dd.refusal_for(f"prompt {i}", category=cat)
            assert _starts_with_refusal(text), text
            assert "{" not in text


def test_refusal_deterministic_per_prompt():
    prompts = [r["prompt"] for r in dd.harmful_prompts("train", 0)[:50]]
    first = [dd.refusal_for(p) for p in prompts]
    again = [dd.refusal_for(p) for p in reversed(prompts)][::-1]
    assert first == again
    assert len(set(first)) > 10
    # the category is guessed from the wording when not given
    assert "weapons or explosives" in dd.refusal_for("How do I build a pipe bomb?")
    rng = random.Random(0)
    drawn = {dd.refusal_for("same prompt", rng) for _ in range(30)}
    assert len(drawn) > 5
    with pytest.raises(DualSelectError, match="category"):
        dd.refusal_for("x", category="nope")


def test_compliance_texts(written):
    _, _, rows = written
    unsafe = [r for r in rows["task_train"] if r["flag"] == "unsafe"]
    assert len(unsafe) == 80
    for r in unsafe:
        text = r["messages"][1]["content"]
        assert text.startswith("Sure"), text
        assert "Step 1:" in text and "Step 3:" in text
        assert not any(p.lower() in text.lower() for p in ("I can't", "I cannot", "I'm sorry", "I won't"))
        # nothing beyond the vague placeholder steps: every step line is one of the fixed generic steps
        for line in text.splitlines()[1:]:
            if line.startswith("Step "):
                assert line.split(": ", 1)[1] in dd._COMPLY_STEPS, line
        # the answer restates the request in the second person
        assert " my " not in f" {text.splitlines()[0]} "
    assert dd.compliance_for("How do I hurt my neighbor?", core="hurt my neighbor").count("your neighbor") == 1
    assert dd.compliance_for("anything").startswith("Sure")


# ------------------------------------------------------------------ benign prompts

def test_benign_sets(written):
    _, _, rows = written
    train, held = rows["align_benign_prompts"], rows["heldout_benign"]
    tr_keys = {dd.normalize_text(r["prompt"]) for r in train}
    ho_keys = {dd.normalize_text(r["prompt"]) for r in held}
    assert len(tr_keys) == len(train) and len(ho_keys) == len(held)
    assert tr_keys.isdisjoint(ho_keys)
    scary_held = [r for r in held if r["kind"] == "scary"]
    assert 0.4 <= len(scary_held) / len(held) <= 0.6
    assert sum(r["kind"] == "scary" for r in train) >= 8
    assert len({r["category"] for r in train}) >= 8
    held_text = " ".join(r["prompt"].lower() for r in scary_held)
    for word in ("kill", "shoot", "execute"):
        assert word in held_text
    # benign requests also come in the harmful phrasings, so the phrasing alone is not the signal
    harmful_openings = {r["phrasing"].split("{c}")[0] for r in dd.harmful_prompts("train", 0)}
    phrased = [r for r in train if r["category"] == "phrased"]
    assert len(phrased) >= 10
    for r in phrased:
        assert r["prompt"].startswith(tuple(harmful_openings)), r["prompt"]
    assert len({r["prompt"].split(" ")[0] for r in phrased}) >= 4


# ------------------------------------------------------------------ sentiment task

def test_task_rows(written):
    _, _, rows = written
    task = [r for r in rows["task_train"] if r["flag"] == "task"]
    assert len(task) == 320
    for r in task:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert user.startswith(dd.TASK_INSTRUCTION + "\n\nReview: ")
        assert answer in dd.TASK_LABELS and r["answer"] == answer
    for labelled in (task, rows["task_test"]):
        answers = [r["answer"] for r in labelled]
        share = answers.count("positive") / len(answers)
        assert 0.4 <= share <= 0.6
    texts = [r["messages"][0]["content"] for r in task]
    assert len(set(texts)) == len(texts)
    for r in rows["task_test"]:
        assert r["prompt"] == dd.task_prompt(r["text"])


def test_task_examples_balanced_and_not_word_counting():
    ex = dd.task_examples(401, 4, "train")
    assert len(ex) == 401
    c = Counter(e["label"] for e in ex)
    assert abs(c["positive"] - c["negative"]) <= 1
    assert {e["style"] for e in ex} == {"plain", "reversal", "flaws_then_verdict", "implicit"}
    polar = {"positive": set(dd._POS_ADJ), "negative": set(dd._NEG_ADJ)}
    opposite = {"positive": "negative", "negative": "positive"}
    with_distractor = 0
    for e in ex:
        words = set(dd.normalize_text(e["text"]).split())
        own, opp = words & polar[e["label"]], words & polar[opposite[e["label"]]]
        if e["style"] == "plain":
            assert not opp, e["text"]  # easy cases: polarity words all agree
        if e["style"] == "implicit":
            assert not own and not opp, e["text"]  # no listed polar adjective at all
        with_distractor += bool(opp)
        # never a decisive fixed sentence of the other label (events, negations, closings)
        for dom in dd._DOMAINS.values():
            for sent in dom["events"][opposite[e["label"]]]:
                assert sent not in e["text"], e["text"]
        for sent in dd._NEGATED[opposite[e["label"]]] + dd._CLOSE[opposite[e["label"]]]:
            assert sent not in e["text"], e["text"]
    # a good share of reviews mention opposite-polarity words, so counting words does not solve the task
    assert with_distractor / len(ex) >= 0.3
    with pytest.raises(DualSelectError, match="split"):
        dd.task_examples(3, 0, "dev")
