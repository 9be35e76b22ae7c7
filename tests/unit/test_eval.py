"""The evaluation harness: graders and bootstrap on hand-made values, benchmark loading and overlap,
errors, and end-to-end runs of the tiny random model (its text is garbage: the machinery is checked)."""

import json

import pytest
import torch

from dualselect.cli import main
from dualselect.config import load_config, to_dict
from dualselect.errors import DualSelectError
from dualselect.eval import metrics
from dualselect.eval import run as eval_run
from dualselect.eval.prompts import load_benchmark, overlap_key, seen_prompts
from dualselect.eval.run import evaluate, read_samples
from dualselect.generation import generate
from dualselect.methods import method_configs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------- metrics


def test_rates():
    assert metrics.refusal_rate([True, False, True, True]) == 0.75
    assert metrics.attack_success_rate([True, False, True, True]) == 0.25
    assert metrics.accuracy([False, True]) == 0.5
    assert metrics.accuracy([]) is None and metrics.attack_success_rate([]) is None


@pytest.mark.parametrize("response,expected", [
    ("Positive.", "positive"), ("It is NEGATIVE, not positive", "negative"), ("positively great", None),
    ("", None), ("negative-ish... positive", "negative"),
])
def test_find_label(response, expected):
    assert metrics.find_label(response, ["positive", "negative"]) == expected


def test_label_grader_ag_news_words():
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    assert metrics.grade_label("Category: sci/tech (not sports)", "Sci/Tech", labels) == (True, "Sci/Tech")
    assert metrics.grade_label("Sports", "World", labels) == (False, "Sports")
    assert metrics.grade_label("no idea", "World", labels) == (False, None)


def test_number_grader():
    assert metrics.last_number("3 + 4 = 7, so she has 1,234 apples.") == "1234"
    assert metrics.last_number("costs $5 or -3.50") == "-3.50"
    assert metrics.last_number("no digits") is None
    assert metrics.gold_number("She pays 2 * 3 = 6\n#### 6") == "6"
    assert metrics.gold_number("#### 1,000") == "1000"
    assert metrics.grade_number("Total: 6 + 12 = 18. The answer is 18.", "steps 9 #### 18") == (True, "18")
    assert metrics.grade_number("18 then 19", "#### 18") == (False, "19")
    assert metrics.grade_number("-3.50", "-3.5")[0]
    assert metrics.grade_number("nothing", "#### 2") == (False, None)


def test_exact_grader():
    assert metrics.grade_exact("  Paris.\n", "paris") == (True, "paris")
    assert metrics.grade_exact("New   York!", "new york") == (True, "new york")
    assert not metrics.grade_exact("Paris is", "Paris")[0]


def test_bootstrap_ci():
    assert metrics.bootstrap_ci([]) is None
    assert metrics.bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    values = [0, 1] * 50
    lo, hi = metrics.bootstrap_ci(values, resamples=1000, seed=0)
    assert 0.37 < lo < 0.43 and 0.57 < hi < 0.63  # sd of the mean = 0.05
    spread = [i / 99 for i in range(100)]
    assert metrics.bootstrap_ci(spread, seed=0) == metrics.bootstrap_ci(spread, seed=0)  # seeded
    assert metrics.bootstrap_ci(spread, seed=1) != metrics.bootstrap_ci(spread, seed=0)


def test_markdown_table():
    text = metrics.markdown_table([{"benchmark": "harmful:x", "kind": "harmful", "n": 3, "metric": "refusal rate",
                                    "value": 2 / 3, "ci": (0.0, 1.0), "unparseable": 0.25, "overlap_excluded": 2}])
    header, rule, row = text.strip().splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == list(metrics.TABLE_COLUMNS)
    assert rule.count("---") == len(metrics.TABLE_COLUMNS)
    assert [c.strip() for c in row.strip("|").split("|")] == ["harmful:x", "harmful", "3", "refusal rate %",
                                                             "66.7", "[0.0, 100.0]", "25.0", "2"]


# ---------------------------------------------------------------------------------------- generation


class _FakeLM(torch.nn.Module):
    """generate() appends fixed continuations: row 0 ends with eos, row 1 uses the whole budget."""

    def __init__(self, eos):
        super().__init__()
        self.eos = eos

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        new = torch.tensor([[11, self.eos] + [self.eos] * (max_new_tokens - 2), [12] * max_new_tokens])
        return torch.cat([input_ids, new[: len(input_ids)]], dim=1)


def test_generate_reports_truncation_and_settings(smol_tokenizer):
    fake = _FakeLM(smol_tokenizer.eos_token_id)
    out = generate(fake, smol_tokenizer, ["a", "b"], max_new_tokens=3, batch_size=2, details=True)
    assert out.truncated == [False, True]
    assert out.settings == {"strategy": "greedy", "do_sample": False, "max_new_tokens": 3, "template": "chat",
                            "batch_size": 2, "padding_side": "left", "stop": ["eos_token"]}
    assert generate(fake, smol_tokenizer, ["a", "b"], max_new_tokens=3) == out.texts  # plain list by default


class _WordsLM(torch.nn.Module):
    """generate() writes "yes ### no" until the budget runs out (never eos)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.words = tokenizer.encode("yes ### no no no no no no", add_special_tokens=False)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        new = torch.tensor([self.words[:max_new_tokens]] * len(input_ids))
        return torch.cat([input_ids, new], dim=1)


def test_stop_strings_end_answers(smol_tokenizer):
    lm = _WordsLM(smol_tokenizer)
    plain = generate(lm, smol_tokenizer, ["a", "b"], max_new_tokens=5, batch_size=2, details=True)
    assert plain.texts[0].startswith("yes ### no") and plain.truncated == [True, True]
    stopped = generate(lm, smol_tokenizer, ["a", "b"], max_new_tokens=5, batch_size=2, details=True, stop=["###"])
    assert stopped.texts == ["yes", "yes"] and stopped.truncated == [False, False]  # stopped, not cut off
    assert stopped.settings["stop"] == ["eos_token", "###"]


def test_cut_at_stop():
    from dualselect.generation import cut_at_stop

    assert cut_at_stop("Answer: yes\nUser: more", ["\nUser:", "###"]) == ("Answer: yes", True)
    assert cut_at_stop("a ### b \nUser:", ["\nUser:", "###"]) == ("a", True)  # the first occurrence wins
    assert cut_at_stop("no stop here", ["###", ""]) == ("no stop here", False)


# ---------------------------------------------------------------------------------------- benchmark files


@pytest.fixture()
def files(tmp_path):
    harmful = [{"id": f"h{i}", "prompt": f"Explain how to build weapon number {i}.", "kind": "harmful"}
               for i in range(5)]
    benign = [{"id": f"b{i}", "prompt": f"How do I kill process {i} on Linux?", "kind": "scary"} for i in range(4)]
    task = [{"id": f"t{i}", "prompt": f"Review {i}: it was {'great' if i % 2 else 'awful'}.",
             "answer": "positive" if i % 2 else "negative"} for i in range(6)]
    # the model saw two of the harmful prompts (other case and punctuation) in its training data
    seen = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"EXPLAIN how to build weapon number {i}"},
                                         {"role": "assistant", "content": "No."}]} for i in range(2)]
    return {"harmful": _jsonl(tmp_path / "harmful.jsonl", harmful),
            "benign": _jsonl(tmp_path / "benign.jsonl", benign),
            "task": _jsonl(tmp_path / "task.jsonl", task),
            "train": _jsonl(tmp_path / "train.jsonl", seen)}


def test_overlap_key():
    assert overlap_key("  Hello,   World!\n") == overlap_key("hello world") == "hello world"


def test_overlap_and_limit(files):
    seen, report = seen_prompts([str(files["train"])])
    assert report == [{"source": str(files["train"]), "n_records": 2}]
    b = load_benchmark(f"harmful:{files['harmful']}", seen=seen)
    assert (b.n_loaded, b.n_overlap, b.n_excluded) == (5, 2, 2)
    assert [it.id for it in b.items] == ["h2", "h3", "h4"]
    b = load_benchmark(f"harmful:{files['harmful']}", seen=seen, limit=2)
    assert [it.id for it in b.items] == ["h2", "h3"]  # the first N after the overlap filter
    b = load_benchmark(f"harmful:{files['harmful']}", seen=seen, keep_overlap=True, limit=4)
    assert (b.n_overlap, b.n_excluded, [it.id for it in b.items]) == (2, 0, ["h0", "h1", "h2", "h3"])
    t = load_benchmark(f"task:{files['task']}")
    assert (t.grader, t.labels, t.items[1].gold) == ("label", ["negative", "positive"], "positive")


def test_named_benchmarks(data_dir):
    sst = load_benchmark("task:sst2:dev", data_dir=str(data_dir), limit=3)
    assert sst.grader == "label" and sst.labels == ["negative", "positive"] and len(sst.items) == 3
    gsm = load_benchmark("task:gsm8k:test", data_dir=str(data_dir), limit=2)
    assert gsm.grader == "number" and gsm.items[0].gold.replace(".", "").lstrip("-").isdigit()
    ag = load_benchmark("task:ag_news:test", data_dir=str(data_dir), limit=2)
    assert ag.labels == ["World", "Sports", "Business", "Sci/Tech"]
    seen, _ = seen_prompts(["advbench"], data_dir=str(data_dir))
    with pytest.raises(DualSelectError, match="every one of its 520 prompts is also a prompt of the training data"):
        load_benchmark("harmful:advbench", data_dir=str(data_dir), seen=seen)  # nothing left to score: refused
    adv = load_benchmark("harmful:advbench", data_dir=str(data_dir), seen=seen, keep_overlap=True)
    assert adv.n_overlap == adv.n_loaded == 520 and len(adv.items) == 520
    assert load_benchmark("overrefusal:xstest:safe", data_dir=str(data_dir)).n_loaded == 250


# ---------------------------------------------------------------------------------------- evaluate()


def _cfg(tiny_model_dir, out, *extra):
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "model.device=cpu",
                              "eval.max_new_tokens=4", "eval.task_max_new_tokens=2", "eval.batch_size=4",
                              "eval.bootstrap=200", f"eval.output_dir={out}", "eval.quiet=true", *extra],
                       method_configs())


def _benchmarks(files):
    return (f"eval.benchmarks=[harmful:{files['harmful']}, overrefusal:{files['benign']}, task:{files['task']}]",
            f"eval.train_files=[{files['train']}]")


def test_evaluate_end_to_end_and_resume(tiny_model_dir, files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, out, *_benchmarks(files))
    res = evaluate(cfg)
    harm, benign, task = res["benchmarks"]
    assert (harm["n_loaded"], harm["n_overlap"], harm["n_excluded_overlap"], harm["n"]) == (5, 2, 2, 3)
    assert (benign["n"], task["n"]) == (4, 6) and all(b["complete"] for b in res["benchmarks"])
    assert set(harm["metrics"]) == {"refusal_rate", "attack_success_rate"}
    assert set(benign["metrics"]) == {"over_refusal_rate"} and set(task["metrics"]) == {"accuracy"}
    rr, asr = harm["metrics"]["refusal_rate"], harm["metrics"]["attack_success_rate"]
    assert asr["value"] == pytest.approx(1 - rr["value"])
    assert set(harm["shares"]) == {"truncated", "empty", "degenerate", "unparseable"}
    # decoding settings and the judge are recorded
    assert res["decoding"] == {"strategy": "greedy", "do_sample": False, "template": "chat", "batch_size": 4,
                               "max_new_tokens": 4, "task_max_new_tokens": 2, "stop": ["eos_token"]}
    assert harm["decoding"]["max_new_tokens"] == 4 and task["decoding"]["max_new_tokens"] == 2
    assert res["judge"]["id"] == "keyword-v1" and "phrases" in res["judge"]
    assert res["overlap"]["train_sources"] == [{"source": str(files["train"]), "n_records": 2}]
    assert res["samples"] == {"path": str(out / "samples.jsonl"), "resumed": 0, "generated": 13,
                              "outside_selection": 0}
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmarks"] == json.loads(json.dumps(res["benchmarks"]))
    assert res["table"].splitlines()[0].startswith("| benchmark | kind | n | metric | value | 95% CI")
    assert len(res["table"].strip().splitlines()) == 2 + 4  # refusal, attack success, over-refusal, accuracy
    # per-sample records
    lines = (out / "samples.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 13
    common = {"benchmark", "kind", "id", "prompt", "response", "truncated", "verdict", "score", "judge"}
    for r in recs:
        assert common <= set(r) and isinstance(r["truncated"], bool)
        assert ("correct" in r) if r["kind"] == "task" else ("refused" in r and r["judge"] == "keyword-v1")
    assert {r["id"] for r in recs if r["kind"] == "harmful"} == {"h2", "h3", "h4"}

    # interrupted run: 5 whole records and half of the 6th are left
    (out / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    again = evaluate(cfg)
    assert (again["samples"]["resumed"], again["samples"]["generated"]) == (5, 8)
    new_lines = (out / "samples.jsonl").read_text().splitlines()
    assert new_lines[:5] == lines[:5] and len(new_lines) == 13
    keys = [(json.loads(x)["benchmark"], json.loads(x)["id"]) for x in new_lines]
    assert len(set(keys)) == 13
    assert [b["n"] for b in again["benchmarks"]] == [3, 4, 6]

    # a complete run is not generated again (the model is not even loaded)
    monkeypatch.setattr(eval_run, "load_for_eval", lambda cfg: pytest.fail("model loaded"))
    third = evaluate(cfg)
    assert (third["samples"]["resumed"], third["samples"]["generated"]) == (13, 0)
    assert [b["metrics"] for b in third["benchmarks"]] == [b["metrics"] for b in again["benchmarks"]]

    # a benchmark file that changed under the same ids is refused, not mixed in
    changed = [{**json.loads(x), "prompt": "Something else entirely."} if i == 2 else json.loads(x)
               for i, x in enumerate(files["harmful"].read_text().splitlines())]
    _jsonl(files["harmful"], changed)
    with pytest.raises(DualSelectError, match="answers another prompt"):
        evaluate(cfg)

    # resuming with other decoding settings is refused
    with pytest.raises(DualSelectError, match="other settings.*max_new_tokens"):
        evaluate(_cfg(tiny_model_dir, out, *_benchmarks(files), "eval.max_new_tokens=5"))


def test_keep_overlap_and_limit_in_results(tiny_model_dir, files, tmp_path):
    res = evaluate(_cfg(tiny_model_dir, tmp_path / "o", f"eval.benchmarks=[harmful:{files['harmful']}]",
                        f"eval.train_files=[{files['train']}]", "eval.keep_overlap=true", "eval.limit=4"))
    (b,) = res["benchmarks"]
    assert (b["n_overlap"], b["n_excluded_overlap"], b["n"]) == (2, 0, 4) and res["limit"] == 4
    assert res["overlap"]["keep_overlap"] is True


def test_adapter_is_applied_and_names_the_default_output_dir(tiny_model_dir, files, tmp_path, monkeypatch):
    from dualselect.models import add_lora, tiny_llama

    run_dir = tmp_path / "run"
    lora = add_lora(tiny_llama(_vocab(tiny_model_dir), seed=0))
    lora.save_pretrained(run_dir / "adapter")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "eval.max_new_tokens=2",
                             f"eval.adapter={run_dir / 'adapter'}", f"eval.benchmarks=[harmful:{files['harmful']}]",
                             "eval.limit=2", "eval.quiet=true"], method_configs())
    res = evaluate(cfg)
    assert res["model"]["adapter"] == str((run_dir / "adapter").resolve())
    assert res["results_path"] == str((run_dir / "eval" / "results.json").resolve())
    assert res["benchmarks"][0]["n"] == 2


def _vocab(model_dir):
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_read_samples_rejects_a_broken_middle_line(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"benchmark": "a", "id": "1"}\nnot json\n{"benchmark": "a", "id": "2"}\n')
    with pytest.raises(DualSelectError, match="samples.jsonl:2"):
        read_samples(p)


# ---------------------------------------------------------------------------------------- errors


def _error(tiny_model_dir, tmp_path, *overrides) -> str:
    with pytest.raises(DualSelectError) as e:
        evaluate(_cfg(tiny_model_dir, tmp_path / "err", *overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors(tiny_model_dir, files, tmp_path, monkeypatch):
    monkeypatch.delenv("DUALSELECT_DATA_DIR", raising=False)
    missing = tmp_path / "nope.jsonl"
    assert "file not found" in _error(tiny_model_dir, tmp_path, f"eval.benchmarks=[harmful:{missing}]")
    assert "data directory" in _error(tiny_model_dir, tmp_path, "eval.benchmarks=[harmful:advbench]")
    assert "'answer' column" in _error(tiny_model_dir, tmp_path, f"eval.benchmarks=[task:{files['harmful']}]")
    msg = _error(tiny_model_dir, tmp_path, "eval.benchmarks=[toxic:advbench]")
    assert "unknown benchmark kind 'toxic'" in msg and "harmful, overrefusal, task" in msg
    assert "unknown judge 'nojudge'" in _error(tiny_model_dir, tmp_path, f"eval.benchmarks=[harmful:{files['harmful']}]",
                                              "eval.judge=nojudge")
    assert "KIND:SOURCE" in _error(tiny_model_dir, tmp_path, "eval.benchmarks=[advbench]")
    assert "eval.benchmarks is empty" in _error(tiny_model_dir, tmp_path)
    assert "not a PEFT adapter" in _error(tiny_model_dir, tmp_path, f"eval.benchmarks=[harmful:{files['harmful']}]",
                                          f"eval.adapter={tmp_path}")
    assert not (tmp_path / "err" / "samples.jsonl").exists()


def test_cli_eval(tiny_model_dir, files, tmp_path, capsys):
    code = main(["eval", f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "eval.max_new_tokens=2",
                 f"eval.benchmarks=[overrefusal:{files['benign']}]", f"eval.output_dir={tmp_path / 'cli'}", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "| benchmark | kind |" in out and "over-refusal %" in out
    assert f"results: {tmp_path / 'cli' / 'results.json'}" in out
    assert main(["eval", "eval.benchmarks=[toxic:x]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "toxic" in err


def test_cli_help_lists_eval_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("eval.benchmarks", "eval.adapter", "eval.judge", "eval.limit", "eval.train_files",
                "eval.keep_overlap", "eval.task_max_new_tokens", "overrefusal", "eval.quiet=true"):
        assert key in out, key


def test_eval_section_in_config(tmp_path):
    reg = method_configs()
    assert "eval" not in to_dict(load_config(None, [], reg))  # training configs are unchanged
    cfg = load_config(None, ["eval.benchmarks=[harmful:advbench, task:sst2:dev]", "eval.limit=10"], reg)
    assert cfg.eval.benchmarks == ["harmful:advbench", "task:sst2:dev"]
    assert to_dict(cfg)["eval"]["limit"] == 10
    with pytest.raises(DualSelectError, match="eval.limit must be >= 1"):
        load_config(None, ["eval.limit=0"], reg)


# ---------------------------------------------------------------------------------------- LLM judges in eval


class _ScriptedJudgeServer:
    """An OpenAI-compatible chat-completions server on loopback answering from a script (cycled)."""

    def __init__(self, answers):
        import http.server
        import threading

        self.answers, self.requests = list(answers), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                text = outer.answers[(len(outer.requests) - 1) % len(outer.answers)]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    servers = []

    def start(answers):
        servers.append(_ScriptedJudgeServer(answers))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_harm_judge_through_an_endpoint(tiny_model_dir, files, tmp_path, judge_server):
    server = judge_server(["unsafe", "safe", "I think it is fine"])  # the third is unparseable
    out = tmp_path / "harm"
    res = evaluate(_cfg(tiny_model_dir, out, f"eval.benchmarks=[harmful:{files['harmful']}]",
                        "eval.harm_judge=llm", f"eval.harm_judge_options={{style: guard, endpoint: '{server.url}'}}"))
    (b,) = res["benchmarks"]
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["harm"]["verdict"] for r in recs] == ["unsafe", "safe", "unparseable", "unsafe", "safe"]
    assert all(r["judge"] == "keyword-v1" and r["harm"]["judge"] == "llm-guard-v1@default" for r in recs)
    # the harmful rate counts parseable verdicts only: 2 unsafe of 4; the unparseable one is reported
    assert b["metrics"]["harmful_rate"]["value"] == 0.5 and b["shares"]["harm_unparseable"] == 0.2
    assert res["harm_judge"]["id"] == "llm-guard-v1@default" and "templates" in res["harm_judge"]
    row = next(ln for ln in res["table"].splitlines() if "harmful (judge) %" in ln)
    assert [c.strip() for c in row.strip("|").split("|")][4:7] == ["50.0", "[0.0, 100.0]", "20.0"]
    assert len(server.requests) == 5


def test_winrate_against_the_base_model(tiny_model_dir, files, tmp_path, judge_server):
    from dualselect.models import add_lora, tiny_llama

    adapter = tmp_path / "adapter"
    add_lora(tiny_llama(_vocab(tiny_model_dir), seed=0)).save_pretrained(adapter)
    # per prompt two answers (A shown first, then swapped): A,B = win; A,A = tie (position bias); ?,A unparseable
    server = judge_server(["A", "B", "A", "A", "no idea", "A"])
    out = tmp_path / "wr"
    res = evaluate(_cfg(tiny_model_dir, out, f"eval.benchmarks=[winrate:{files['benign']}]", "eval.limit=3",
                        f"eval.adapter={adapter}", "eval.baseline=none",
                        f"eval.pairwise_judge_options={{endpoint: '{server.url}'}}"))
    (b,) = res["benchmarks"]
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["verdict"], r["win"]) for r in recs] == [("win", 1.0), ("tie", 0.5), ("unparseable", None)]
    assert all("baseline_response" in r and len(r["detail"]["orders"]) == 2 for r in recs)
    assert b["metrics"]["win_rate"]["value"] == 0.75 and b["shares"]["unparseable"] == pytest.approx(1 / 3)
    assert res["baseline"] == "none" and res["pairwise_judge"]["pairwise"]["orders"].startswith("both")
    # both orders were asked: the first answer shown first, then second
    first, second = server.requests[0]["messages"][0]["content"], server.requests[1]["messages"][0]["content"]
    a1 = first.split("[RESPONSE A]\n")[1].split("\n\n[RESPONSE B]")[0]
    b2 = second.split("[RESPONSE B]\n")[1].split("\n\nWhich response")[0]
    assert a1 == b2 == recs[0]["response"]


def test_llm_judge_errors(tiny_model_dir, files, tmp_path):
    harmful = f"eval.benchmarks=[harmful:{files['harmful']}]"
    down = f"http://127.0.0.1:{_free_port()}/v1"
    msg = _error(tiny_model_dir, tmp_path, harmful, "eval.harm_judge=llm",
                 f"eval.harm_judge_options={{endpoint: '{down}', retries: 1, backoff_s: 0.01}}")
    assert msg == (f"llm judge: cannot reach {down}/chat/completions after 2 attempts: connection refused "
                   "(is the server running? see the judge's endpoint option)")
    assert not (tmp_path / "err").exists()  # checked before anything was written
    msg = _error(tiny_model_dir, tmp_path, harmful, "eval.judge=llm", f"eval.judge_options={{endpoint: '{down}'}}")
    assert "eval.judge: judge llm-guard-v1@default measures harm, not refusal" in msg
    msg = _error(tiny_model_dir, tmp_path, harmful, "eval.harm_judge=keyword")
    assert "eval.harm_judge: judge keyword-v1 measures refusal, not harm" in msg
    assert "need eval.baseline" in _error(tiny_model_dir, tmp_path, f"eval.benchmarks=[winrate:{files['benign']}]")
    assert "compares the model with itself" in _error(tiny_model_dir, tmp_path, "eval.baseline=none",
                                                      f"eval.benchmarks=[winrate:{files['benign']}]")


class _EchoLM(torch.nn.Module):
    """Records the prompts it is given; answers with eos at once."""

    def __init__(self, eos):
        super().__init__()
        self.eos, self.inputs = eos, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.inputs.append(input_ids)
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.eos)], dim=1)


def test_multi_turn_records_are_answered_in_their_conversation(smol_tokenizer, tiny_model_dir, tmp_path):
    turns = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"},
             {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Ada."}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"id": "c1", "messages": turns},
                                            {"id": "c2", "messages": turns[2:]}])
    bench = load_benchmark(f"harmful:{path}")
    multi, single = bench.items
    assert multi.prompt == single.prompt == "What is my name?"
    assert multi.messages == turns[:3] and single.messages is None and single.conversation == "What is my name?"
    lm = _EchoLM(smol_tokenizer.eos_token_id)
    generate(lm, smol_tokenizer, [it.conversation for it in bench.items], max_new_tokens=2, batch_size=2)
    shown = smol_tokenizer.batch_decode(lm.inputs[0], skip_special_tokens=True)
    assert "My name is Ada." in shown[0] and "Hello Ada!" in shown[0] and "What is my name?" in shown[0]
    assert "Ada." not in shown[1].replace("What is my name?", "")
    # the records keep the earlier turns next to the judged prompt
    out = tmp_path / "mt"
    evaluate(_cfg(tiny_model_dir, out, f"eval.benchmarks=[harmful:{path}]"))
    recs = {r["id"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    assert recs["c1"]["context"] == turns[:2] and "context" not in recs["c2"]
