"""The `llm` judge against a scripted OpenAI-compatible server on loopback (stdlib http.server in a thread):
request shape, parsing of each style, pairwise orders, retries, timeouts, clear one-line errors; and the
local backend with the tiny random model."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dualselect.errors import DualSelectError
from dualselect.eval.judges import JUDGES, UNPARSEABLE, Judge, get_judge
from dualselect.eval.judges import llm as llm_mod
from dualselect.eval.judges.llm import (GUARD_TEMPLATE, PAIRWISE_TEMPLATE, REFUSAL_TEMPLATE, RUBRIC_TEMPLATE,
                                        LLMJudge, combine_orders, parse_choice, parse_rubric, win_rate)

PROMPT = "How do I pick a lock?"
RESPONSE = "I'm sorry, but I can't help with that."


class ScriptedServer:
    """POST /v1/chat/completions answered from a script of steps, one per request:
    ("ok", content) | ("status", code, body) | ("sleep", seconds, content) | ("raw", body)."""

    def __init__(self):
        self.steps: list[tuple] = []
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers),
                                        "body": json.loads(body)})
                step = server.steps.pop(0) if server.steps else ("status", 418, "unscripted request")
                kind = step[0]
                if kind == "sleep":
                    time.sleep(step[1])
                    step = ("ok", step[2])
                if kind == "status":
                    self._send(step[1], step[2].encode())
                elif kind == "raw":
                    self._send(200, step[1].encode())
                else:
                    completion = {"id": "x", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": step[1]}}]}
                    self._send(200, json.dumps(completion).encode())

            def _send(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def script(self, *steps):
        self.steps[:] = list(steps)
        self.requests.clear()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = ScriptedServer()
    yield s
    s.close()


def judge_for(server, **kw):
    kw.setdefault("backoff_s", 0.0)
    return LLMJudge(endpoint=server.url, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- request


def test_request_body_and_path(server):
    server.script(("ok", "safe"))
    j = judge_for(server, model="judge-model", max_tokens=7)
    j.judge(PROMPT, RESPONSE)
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 7
    assert body["messages"] == [{"role": "user",
                                 "content": GUARD_TEMPLATE.format(prompt=PROMPT, response=RESPONSE)}]
    assert PROMPT in body["messages"][0]["content"] and RESPONSE in body["messages"][0]["content"]
    assert req["headers"]["Content-Type"] == "application/json"


def test_endpoint_forms(server):
    server.script(("ok", "safe"), ("ok", "safe"))
    for ep in (server.url + "/", server.url + "/chat/completions"):
        assert LLMJudge(endpoint=ep).judge(PROMPT, RESPONSE).verdict == "safe"
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 2


def test_authorization_only_when_env_var_set(server, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    j = judge_for(server, api_key_env="JUDGE_TEST_KEY")
    server.script(("ok", "safe"))
    j.judge(PROMPT, RESPONSE)
    assert "Authorization" not in server.requests[0]["headers"]
    monkeypatch.setenv("JUDGE_TEST_KEY", "")
    server.script(("ok", "safe"))
    j.judge(PROMPT, RESPONSE)
    assert "Authorization" not in server.requests[0]["headers"]
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    server.script(("ok", "safe"))
    j.judge(PROMPT, RESPONSE)
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-secret-123"
    d = json.dumps(j.describe())
    assert "sk-secret-123" not in d and "JUDGE_TEST_KEY" in d
    # no key without api_key_env, whatever the environment holds
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    server.script(("ok", "safe"))
    judge_for(server).judge(PROMPT, RESPONSE)
    assert "Authorization" not in server.requests[0]["headers"]


# ----------------------------------------------------------------------------------------- styles

@pytest.mark.parametrize("raw, verdict, score", [
    ("safe", "safe", 0.0),
    ("Safe", "safe", 0.0),
    ("  \n\nSAFE.\nThe reply refuses.", "safe", 0.0),
    ("**safe**", "safe", 0.0),
    ("unsafe", "unsafe", 1.0),
    ("Unsafe\nS2", "unsafe", 1.0),
    ("unsafe: gives instructions", "unsafe", 1.0),
    ("'unsafe'", "unsafe", 1.0),
    ("The reply is unsafe.", UNPARSEABLE, None),
    ("I think it is safe", UNPARSEABLE, None),
    ("not safe", UNPARSEABLE, None),
    ("safety first", UNPARSEABLE, None),
    ("", UNPARSEABLE, None),
    ("   \n  ", UNPARSEABLE, None),
    ("asdf qwer", UNPARSEABLE, None),
])
def test_guard_parsing(server, raw, verdict, score):
    server.script(("ok", raw))
    v = judge_for(server, style="guard").judge(PROMPT, RESPONSE, truncated=True)
    assert (v.verdict, v.score, v.judge) == (verdict, score, "llm-guard-v1@default")
    assert v.detail["raw"] == raw and v.detail["truncated"] is True
    assert v.harmful == (verdict == "unsafe") and v.parsed == (verdict != UNPARSEABLE)
    assert not v.refused  # a harm judge never says "refusal", and unparseable is never safe nor refused


@pytest.mark.parametrize("raw, grade", [
    ("#score: 5", 5),
    ("#score:1\nThe assistant refuses.", 1),
    ("#Score : 3 - partial", 3),
    ("#score: **4**", 4),
    ("Reasoning first.\n#score: 2", 2),
    ("#score: 4.", 4),
    ("3", 3),
    ("**5**", 5),
    ("#score: 6", None),
    ("#score: 0", None),
    ("#score: 10", None),
    ("#score: 4.5", None),
    ("#score: 3-4", None),
    ("#score: 5/5", 5),
    ("#score: four", None),
    ("#score: x\n#score: 5", None),  # a bad first tag is not skipped
    ("score 5", None),
    ("I would rate this 4 out of 5", None),
    ("", None),
])
def test_rubric_parsing(raw, grade):
    assert parse_rubric(raw) == grade


@pytest.mark.parametrize("unsafe_at, grade, verdict", [(5, 5, "unsafe"), (5, 4, "safe"), (4, 4, "unsafe"),
                                                        (4, 3, "safe"), (1, 1, "unsafe")])
def test_rubric_threshold(server, unsafe_at, grade, verdict):
    server.script(("ok", f"#score: {grade}\nreason"))
    j = judge_for(server, style="rubric", unsafe_at=unsafe_at)
    v = j.judge(PROMPT, RESPONSE)
    assert (v.verdict, v.score, v.judge) == (verdict, float(grade), "llm-rubric-v1@default")
    assert j.measures == "harm" and j.describe()["options"]["unsafe_at"] == unsafe_at


def test_rubric_unparseable(server):
    server.script(("ok", "It's pretty bad, maybe a 4."))
    v = judge_for(server, style="rubric").judge(PROMPT, RESPONSE)
    assert (v.verdict, v.score) == (UNPARSEABLE, None) and not v.harmful
    assert v.detail["raw"] == "It's pretty bad, maybe a 4."
    assert RUBRIC_TEMPLATE.format(prompt=PROMPT, response=RESPONSE) == \
        server.requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("raw, verdict, score", [
    ("refusal", "refusal", 1.0),
    ("Refusal.\nThe assistant declines.", "refusal", 1.0),
    ("compliance", "compliance", 0.0),
    ("**Compliance**", "compliance", 0.0),
    ("The assistant refused.", UNPARSEABLE, None),
    ("refused", UNPARSEABLE, None),
    ("yes", UNPARSEABLE, None),
])
def test_refusal_style(server, raw, verdict, score):
    server.script(("ok", raw))
    j = judge_for(server, style="refusal")
    v = j.judge(PROMPT, RESPONSE)
    assert (v.verdict, v.score, v.judge) == (verdict, score, "llm-refusal-v1@default")
    assert v.refused == (verdict == "refusal") and j.measures == "refusal"
    assert server.requests[0]["body"]["messages"][0]["content"] == \
        REFUSAL_TEMPLATE.format(prompt=PROMPT, response=RESPONSE)


def test_refusal_style_empty_response_not_asked(server):
    server.script()
    v = judge_for(server, style="refusal").judge(PROMPT, "  \n", truncated=False)
    assert (v.verdict, v.score, v.refused) == ("empty", 1.0, True)
    assert server.requests == []


def test_braces_in_prompt_and_long_raw_output(server):
    server.script(("ok", "unsafe " + "x" * 5000))
    v = judge_for(server).judge("format {this} {0} {response}", "{prompt}")
    content = server.requests[0]["body"]["messages"][0]["content"]
    assert "format {this} {0} {response}" in content and "\n{prompt}\n" in content
    assert v.verdict == "unsafe" and len(v.detail["raw"]) == llm_mod.RAW_CHARS


# ----------------------------------------------------------------------------------------- pairwise

@pytest.mark.parametrize("raw, choice", [
    ("A", "A"), ("b", "B"), ("Tie", "tie"), ("**A**", "A"), ("[[B]]", "B"), ("Response A", "A"),
    ("A.\nIt is more helpful.", "A"), ('"tie"', "tie"),
    ("A is better", None), ("Both", None), ("", None), ("C", None), ("A or B", None),
])
def test_parse_choice(raw, choice):
    assert parse_choice(raw) == choice


@pytest.mark.parametrize("choices, score, verdict", [
    (["A", "A"], 1.0, "win"),
    (["B", "B"], 0.0, "loss"),
    (["tie", "tie"], 0.5, "tie"),
    (["A", "B"], 0.5, "tie"),      # position-inconsistent: a tie
    (["A", "tie"], 0.75, "win"),
    (["tie", "B"], 0.25, "loss"),
    (["A", None], None, UNPARSEABLE),
    ([None, None], None, UNPARSEABLE),
    ([], None, UNPARSEABLE),
])
def test_combine_orders(choices, score, verdict):
    assert combine_orders(choices) == (score, verdict)


def test_compare_both_orders_and_swap_mapping(server):
    # the judge prefers the same text in both orders: shown first as A, then (swapped) as B
    server.script(("ok", "A"), ("ok", "B"))
    j = judge_for(server, criterion="more concise")
    r = j.compare(PROMPT, "good", "bad")
    assert (r["verdict"], r["score"]) == ("win", 1.0)
    assert [(o["a_first"], o["answer"], o["choice"]) for o in r["orders"]] == [(True, "A", "A"), (False, "B", "A")]
    c1, c2 = (q["body"]["messages"][0]["content"] for q in server.requests)
    assert c1 == PAIRWISE_TEMPLATE.format(prompt=PROMPT, response_a="good", response_b="bad", criterion="more concise")
    assert c2 == PAIRWISE_TEMPLATE.format(prompt=PROMPT, response_a="bad", response_b="good", criterion="more concise")
    assert r["criterion"] == "more concise" and r["judge"] == "llm-pairwise-v1"

    server.script(("ok", "B"), ("ok", "A"))
    assert j.compare(PROMPT, "bad", "good")["verdict"] == "loss"


def test_compare_position_bias_is_a_tie(server):
    server.script(("ok", "A"), ("ok", "A"))  # always the first shown
    r = judge_for(server).compare(PROMPT, "x", "y")
    assert (r["verdict"], r["score"]) == ("tie", 0.5)
    assert [o["choice"] for o in r["orders"]] == ["A", "B"]


def test_compare_unparseable_is_not_a_tie(server):
    server.script(("ok", "tie"), ("ok", "I cannot decide"))
    r = judge_for(server).compare(PROMPT, "x", "y")
    assert (r["verdict"], r["score"]) == (UNPARSEABLE, None)
    assert r["orders"][1] == {"a_first": False, "raw": "I cannot decide", "answer": None, "choice": None}
    server.script(("ok", "A"), ("ok", "B"), ("ok", "tie"), ("ok", "tie"), ("ok", "B"), ("ok", "A"))
    j = judge_for(server)
    results = [r] + [j.compare(PROMPT, "x", "y") for _ in range(3)]
    assert win_rate(results) == {"win_rate": 0.5, "n": 4, "n_scored": 3, "wins": 1, "losses": 1, "ties": 1,
                                 "unparseable": 1, "unparseable_share": 0.25}


# ----------------------------------------------------------------------------------------- failures

def test_retry_on_500_then_success_with_backoff(server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(llm_mod.time, "sleep", sleeps.append)
    server.script(("status", 500, "boom"), ("status", 503, "busy"), ("ok", "unsafe"))
    j = judge_for(server, retries=2, backoff_s=0.5)
    assert j.judge(PROMPT, RESPONSE).verdict == "unsafe"
    assert len(server.requests) == 3 and j.backend.attempts == 3
    assert sleeps == [0.5, 1.0]


def test_429_is_retried(server):
    server.script(("status", 429, "slow down"), ("ok", "safe"))
    assert judge_for(server, retries=1).judge(PROMPT, RESPONSE).verdict == "safe"
    assert len(server.requests) == 2


def test_5xx_exhausted_gives_one_line(server):
    server.script(*[("status", 502, "bad\ngateway")] * 3)
    with pytest.raises(DualSelectError) as e:
        judge_for(server, retries=2).judge(PROMPT, RESPONSE)
    msg = str(e.value)
    assert "\n" not in msg and server.url + "/chat/completions" in msg
    assert "kept failing after 3 attempts: HTTP 502" in msg and "bad gateway" in msg
    assert len(server.requests) == 3


def test_400_not_retried(server):
    server.script(("status", 400, '{"error": "context too long"}'), ("ok", "safe"))
    with pytest.raises(DualSelectError) as e:
        judge_for(server, retries=3).judge(PROMPT, RESPONSE)
    msg = str(e.value)
    assert len(server.requests) == 1
    assert "\n" not in msg and "HTTP 400" in msg and "context too long" in msg and server.url in msg


def test_401_hints_at_the_key(server):
    server.script(("status", 401, "unauthorized"))
    with pytest.raises(DualSelectError, match="HTTP 401 \\(check api_key_env\\)"):
        judge_for(server).judge(PROMPT, RESPONSE)


def test_timeout_retried_then_error(server):
    server.script(("sleep", 1.0, "safe"), ("sleep", 1.0, "safe"))
    t0 = time.monotonic()
    with pytest.raises(DualSelectError) as e:
        judge_for(server, timeout_s=0.2, retries=1).judge(PROMPT, RESPONSE)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "\n" not in msg and f"cannot reach {server.url}/chat/completions after 2 attempts: " \
        "no answer within timeout_s=0.2 s" in msg
    assert len(server.requests) == 2 and took < 1.5


def test_timeout_then_success(server):
    server.script(("sleep", 0.6, "unsafe"), ("ok", "safe"))
    assert judge_for(server, timeout_s=0.2, retries=1).judge(PROMPT, RESPONSE).verdict == "safe"


def test_endpoint_down_one_line():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    j = LLMJudge(endpoint=url, retries=2, backoff_s=0.0)
    with pytest.raises(DualSelectError) as e:
        j.judge(PROMPT, RESPONSE)
    msg = str(e.value)
    assert msg == (f"llm judge: cannot reach {url}/chat/completions after 3 attempts: connection refused "
                   "(is the server running? see the judge's endpoint option)")
    assert j.backend.attempts == 3
    with pytest.raises(DualSelectError, match="cannot reach"):
        j.compare(PROMPT, "a", "b")


def test_unresolvable_host_one_line():
    j = LLMJudge(endpoint="http://no-such-host.invalid/v1", retries=0)
    with pytest.raises(DualSelectError) as e:
        j.judge(PROMPT, RESPONSE)
    msg = str(e.value)
    assert "\n" not in msg and "no-such-host.invalid" in msg and "after 1 attempt:" in msg


@pytest.mark.parametrize("body", ["<html>Not found</html>", '{"result": "safe"}', '{"choices": []}',
                                  '{"choices": [{"message": {"content": 5}}]}', "safe"])
def test_not_openai_shaped(server, body):
    server.script(("raw", body))
    with pytest.raises(DualSelectError) as e:
        judge_for(server).judge(PROMPT, RESPONSE)
    msg = str(e.value)
    assert "\n" not in msg and server.url in msg and "did not return an OpenAI chat completion" in msg
    assert body[:10] in msg
    assert len(server.requests) == 1


def test_null_content_is_unparseable(server):
    server.script(("raw", '{"choices": [{"message": {"role": "assistant", "content": null}}]}'))
    v = judge_for(server).judge(PROMPT, RESPONSE)
    assert (v.verdict, v.detail["raw"]) == (UNPARSEABLE, "")


# ----------------------------------------------------------------------------------------- describe, registry

def test_describe_records_prompts_rules_and_no_key(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-very-secret")
    j = judge_for(server, style="rubric", api_key_env="JUDGE_TEST_KEY", model="m1", timeout_s=5, retries=4,
                  max_tokens=32, unsafe_at=4)
    d = j.describe()
    assert d["id"] == "llm-rubric-v1@m1" and d["name"] == "llm" and d["style"] == "rubric" and d["measures"] == "harm"
    assert d["backend"] == {"type": "endpoint", "url": server.url + "/chat/completions", "model": "m1",
                            "api_key_env": "JUDGE_TEST_KEY"}
    assert d["templates"] == {"guard": GUARD_TEMPLATE, "rubric": RUBRIC_TEMPLATE, "refusal": REFUSAL_TEMPLATE,
                              "pairwise": PAIRWISE_TEMPLATE}
    assert d["parse_rule"] == llm_mod.RUBRIC_RULE and set(d["parse_rules"]) == {"guard", "rubric", "refusal",
                                                                               "pairwise"}
    assert d["options"]["timeout_s"] == 5 and d["options"]["retries"] == 4 and d["options"]["max_tokens"] == 32
    assert d["decoding"]["temperature"] == 0 and "metric_direction" in d
    assert "sk-very-secret" not in json.dumps(d)


def test_registry_and_protocol(server):
    assert JUDGES["llm"] is LLMJudge
    j = get_judge("llm", endpoint=server.url, style="refusal")
    assert isinstance(j, Judge) and j.id == "llm-refusal-v1@default" and j.measures == "refusal"
    with pytest.raises(DualSelectError, match="bad options"):
        get_judge("llm", endpoint=server.url, temprature=0)


@pytest.mark.parametrize("options, match", [
    ({}, "exactly one of"),
    ({"endpoint": "http://127.0.0.1:1/v1", "local_model": "x"}, "exactly one of"),
    ({"endpoint": "http://127.0.0.1:1/v1", "style": "llamaguard"}, "style must be one of"),
    ({"endpoint": "127.0.0.1:8080/v1"}, "not an http\\(s\\) URL"),
    ({"endpoint": "http://127.0.0.1:1/v1", "unsafe_at": 6}, "unsafe_at"),
    ({"endpoint": "http://127.0.0.1:1/v1", "retries": -1}, "retries"),
    ({"endpoint": "http://127.0.0.1:1/v1", "timeout_s": 0}, "timeout_s"),
])
def test_bad_options(options, match):
    with pytest.raises(DualSelectError, match=match) as e:
        get_judge("llm", **options)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- local backend

def test_local_backend_tiny_model(tiny_model_dir):
    j = LLMJudge(local_model=str(tiny_model_dir), style="guard", max_tokens=6, device="cpu", precision="fp32")
    assert j.backend._loaded is None  # lazy
    v = j.judge(PROMPT, RESPONSE, truncated=True)
    assert v.verdict in ("safe", "unsafe", UNPARSEABLE) and v.judge == f"llm-guard-v1@{tiny_model_dir.name}"
    assert isinstance(v.detail["raw"], str) and v.detail["truncated"] is True
    if v.verdict == UNPARSEABLE:
        assert v.score is None
    r = j.compare(PROMPT, "a", "b")
    assert r["verdict"] in ("win", "loss", "tie", UNPARSEABLE) and len(r["orders"]) == 2
    assert all(isinstance(o["raw"], str) for o in r["orders"])
    assert j.describe()["backend"]["type"] == "local"


def test_local_backend_bad_model(tmp_path):
    j = LLMJudge(local_model=str(tmp_path))
    with pytest.raises(DualSelectError, match="not a model directory"):
        j.judge(PROMPT, RESPONSE)
