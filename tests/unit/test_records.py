import csv
import gzip
import hashlib
import json
import sys
import types

import pytest

from dualselect.data import Example, load_examples
from dualselect.data.records import parse_hh
from dualselect.errors import DualSelectError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_example_properties():
    ex = Example("a", [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                       {"role": "assistant", "content": "a2"}])
    assert (ex.prompt, ex.response) == ("q2", "a2")
    assert Example("b", [{"role": "user", "content": "q"}]).response == ""


def test_messages_jsonl_ids_meta_and_report(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "x1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"}], "flag": "ok"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ])
    exs, rep = load_examples(str(p))
    assert [e.id for e in exs] == ["x1", "chat-1"]
    assert exs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert (exs[0].prompt, exs[0].response) == ("Hi", "Hello")
    assert exs[0].meta == {"flag": "ok", "source": "chat.jsonl:1"}
    assert exs[1].meta == {"source": "chat.jsonl:2"}
    assert rep.format == "messages" and (rep.n_read, rep.n_kept, rep.n_skipped_empty) == (2, 2, 0)
    assert rep.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert rep.source == str(p)


def test_jsonl_gz_and_blank_lines(tmp_path):
    p = tmp_path / "pc.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps({"prompt": "p1", "completion": "c1"}) + "\n\n")
        fh.write(json.dumps({"prompt": "p2", "completion": "c2"}) + "\n")
    exs, rep = load_examples(str(p))
    assert [(e.id, e.prompt, e.response) for e in exs] == [("pc-0", "p1", "c1"), ("pc-1", "p2", "c2")]
    assert exs[1].meta["source"] == "pc.jsonl.gz:3"
    assert rep.format == "prompt_completion"
    assert rep.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()  # of the bytes as stored


def test_prompt_response_columns(tmp_path):
    p = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r", "label": 1}])
    (ex,), _ = load_examples(str(p))
    assert (ex.prompt, ex.response, ex.meta["label"]) == ("p", "r", 1)


def test_json_list_and_wrapped_list(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": rows}))
    for name in ("a.json", "b.json"):
        exs, rep = load_examples(str(tmp_path / name))
        assert rep.format == "alpaca"
        assert [e.prompt for e in exs] == ["Say hi", "Add\n1+1"]
        assert exs[1].meta["source"] == f"{name}:record 2"


def test_alpaca_input_rule(tmp_path):
    p = write_jsonl(tmp_path / "al.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Translate", "input": "", "output": "x"},
        {"instruction": "Same", "input": "Same", "output": "y"},
        {"instruction": "No input column", "output": "z", "flag": "unsafe"},
    ])
    exs, _ = load_examples(str(p))
    assert [e.prompt for e in exs] == ["Translate\nbonjour", "Translate", "Same", "No input column"]
    assert exs[3].meta == {"flag": "unsafe", "source": "al.jsonl:4"}
    assert all(e.messages[0]["role"] == "user" and len(e.messages) == 2 for e in exs)


def test_csv_quoted_multiline_and_line_numbers(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["prompt", "completion"], [["a", "b"], ["multi\nline", "c, d"], ["e", "f"]])
    exs, _ = load_examples(str(p))
    assert [(e.prompt, e.response) for e in exs] == [("a", "b"), ("multi\nline", "c, d"), ("e", "f")]
    assert [e.meta["source"] for e in exs] == ["d.csv:2", "d.csv:3", "d.csv:5"]


def test_tsv_keeps_quotes_literal(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text('instruction\tinput\toutput\nsay\t"quoted" text \tok\n')
    (ex,), rep = load_examples(str(p))
    assert ex.prompt == 'say\n"quoted" text '
    assert rep.format == "alpaca"


def test_column_mapping_and_id_column(tmp_path):
    p = write_csv(tmp_path / "adv.csv", ["key", "goal", "target"], [["k1", "do x", "Sure, x"], ["k2", "do y", "Sure, y"]])
    exs, rep = load_examples(str(p), columns={"prompt": "goal", "response": "target", "id": "key"})
    assert [(e.id, e.prompt, e.response) for e in exs] == [("k1", "do x", "Sure, x"), ("k2", "do y", "Sure, y")]
    assert exs[0].meta == {"source": "adv.csv:2"}
    assert rep.format == "prompt_completion"
    # the same file as eval prompts
    exs, rep = load_examples(str(p), fmt="prompt", columns={"prompt": "goal"}, require_response=False)
    assert rep.format == "prompt" and exs[0].messages == [{"role": "user", "content": "do x"}]
    # without the id mapping, 'key' is an ordinary column and the id is "<stem>-<row index>"
    assert (exs[0].id, exs[0].meta) == ("adv-0", {"key": "k1", "target": "Sure, x", "source": "adv.csv:2"})


def test_alpaca_column_mapping(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"q": "Q", "ctx": "C", "a": "A"}])
    (ex,), _ = load_examples(str(p), fmt="alpaca", columns={"instruction": "q", "input": "ctx", "output": "a"})
    assert (ex.prompt, ex.response, ex.meta) == ("Q\nC", "A", {"source": "m.jsonl:1"})


HH = ("\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."
      "\n\nHuman: Why not?\n\nAssistant: It could be used to break in.")


def test_hh_transcript_turns(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH, "rejected": "\n\nHuman: a\n\nAssistant: b"}])
    (ex,), rep = load_examples(str(p))
    assert rep.format == "hh"
    assert ex.messages == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "I can't help with that."},
        {"role": "user", "content": "Why not?"},
        {"role": "assistant", "content": "It could be used to break in."},
    ]
    assert ex.meta["rejected"].endswith("b")
    (ex,), _ = load_examples(str(p), columns={"text": "rejected"})
    assert ex.messages == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert "chosen" in ex.meta


def test_hh_merges_repeated_speaker_and_skips_empty_reply(tmp_path):
    assert parse_hh("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}]
    p = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH}, {"chosen": "\n\nHuman: hello\n\nAssistant: "}])
    exs, rep = load_examples(str(p))
    assert [e.id for e in exs] == ["hh-0"]
    assert (rep.n_read, rep.n_kept, rep.n_skipped_empty) == (2, 1, 1)


def test_skips_empty_and_limit(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [
        {"prompt": "p0", "completion": "c0"},
        {"prompt": "  ", "completion": "c1"},
        {"prompt": "p2", "completion": ""},
        {"prompt": "p3", "completion": "c3"},
        {"prompt": "p4", "completion": "c4"},
    ])
    exs, rep = load_examples(str(p))
    assert [e.id for e in exs] == ["e-0", "e-3", "e-4"]
    assert (rep.n_read, rep.n_kept, rep.n_skipped_empty) == (5, 3, 2)
    exs, rep = load_examples(str(p), require_response=False)
    assert [e.id for e in exs] == ["e-0", "e-2", "e-3", "e-4"]
    assert exs[1].messages == [{"role": "user", "content": "p2"}] and exs[1].response == ""
    assert rep.n_skipped_empty == 1
    exs, rep = load_examples(str(p), limit=2)
    assert [e.id for e in exs] == ["e-0", "e-3"]
    assert (rep.n_read, rep.n_kept, rep.n_skipped_empty) == (4, 2, 2)


def test_duplicate_ids_name_both_rows(tmp_path):
    p = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "p", "completion": "c"},
                                             {"id": "b", "prompt": "p", "completion": "c"},
                                             {"id": "a", "prompt": "p", "completion": "c"}])
    with pytest.raises(DualSelectError, match=r"dup.jsonl:3: duplicate id 'a' \(first at .*dup.jsonl:1\)"):
        load_examples(str(p))


def test_prompt_only_file(tmp_path):
    p = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "p"}])
    exs, rep = load_examples(str(p), require_response=False)
    assert rep.format == "prompt" and exs[0].messages == [{"role": "user", "content": "p"}]
    with pytest.raises(DualSelectError, match=r"ev.jsonl:1: records have a prompt but no response column.*"
                                              r"require_response=False"):
        load_examples(str(p))


# ---- malformed input: one error naming file, line/record and problem


def err(path, **kw) -> str:
    with pytest.raises(DualSelectError) as e:
        load_examples(str(path), **kw)
    return str(e.value)


def test_invalid_json_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    msg = err(p)
    assert msg.startswith(f"{p}:2: invalid JSON (Expecting ',' delimiter")


def test_jsonl_line_not_object(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('[1, 2]\n')
    assert err(p) == f"{p}:1: expected a JSON object, got list"


def test_invalid_json_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    msg = err(p)
    assert msg.startswith(f"{p}:2: invalid JSON (Extra data") and "name the file .jsonl" in msg


def test_json_not_a_list(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": [1], "b": [2]}')
    assert "expected a list of objects, or an object holding one list (got an object with keys: a, b)" in err(p)
    p.write_text('[{"prompt": "a"}, 3]')
    assert err(p, require_response=False) == f"{p}: record 2: expected an object, got int"


def test_messages_malformed(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "human", "content": "a"}]},
    ])
    assert err(p).startswith(f"{p}:3: 'messages' must be a list of {{role, content}}")
    p = write_jsonl(tmp_path / "y.jsonl", [{"messages": "hello"}])
    assert err(p).startswith(f"{p}:1: 'messages' must be a list of {{role, content}}")


def test_missing_column_csv(tmp_path):
    p = write_csv(tmp_path / "x.csv", ["instruction", "input", "output"], [["a", "", "b"], ["c", "", "d"], ["e", "", "f"]])
    p2 = write_csv(tmp_path / "y.csv", ["a", "b"], [["1", "2"]] * 5)
    assert err(p2, fmt="alpaca") == f"{p2}: record 1 (line 2): no 'instruction' column for alpaca format (columns: a, b)"
    assert err(p2, fmt="alpaca", columns={"instruction": "a"}) == \
        f"{p2}: record 1 (line 2): no 'output' column for alpaca format (columns: a, b)"
    assert len(load_examples(str(p))[0]) == 3


def test_csv_wrong_field_count(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("prompt,completion\na,b\nc,d\ne,f\ng,h,i\n")
    assert err(p) == f"{p}: record 4 (line 5): 3 fields, but the header has 2 (prompt, completion)"


def test_cannot_detect_format(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    msg = err(p)
    assert msg.startswith(f"{p}:1: cannot detect the data format from the columns (question, answer)")
    for name in ("messages", "prompt_completion", "alpaca", "hh", "prompt"):
        assert name in msg


def test_unknown_extension_and_not_found(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    assert err(p) == f"{p}: unknown file extension (supported: .jsonl, .json, .csv, .tsv, .parquet, each optionally .gz)"
    assert err(tmp_path / "missing.jsonl") == f"{tmp_path / 'missing.jsonl'}: file not found"
    assert err("nothing.csv") == "nothing.csv: file not found"
    msg = err("no_such_dataset")
    assert "neither a file nor a named dataset" in msg and "sst2" in msg and "xstest" in msg


def test_bad_gzip_and_bad_hh_and_bad_options(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_text("not gzip")
    assert err(p).startswith(f"{p}: cannot read the file")
    p = write_jsonl(tmp_path / "h.jsonl", [{"chosen": "Assistant: hi"}])
    assert err(p).startswith(f"{p}:1: 'chosen' does not look like an HH transcript")
    p = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "completion": ["x"]}])
    assert err(p) == f"{p}:1: 'completion' must be text for prompt_completion format, got list"
    assert "unknown data format 'chatml'" in err(p, fmt="chatml")
    assert "unknown column role 'question'" in err(p, columns={"question": "q"})


def test_not_utf8(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"prompt,completion\n\xff\xfe,b\n")
    assert err(p).startswith(f"{p}: not UTF-8 text")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "completion": ["c0", "c1"]}), p)
    exs, rep = load_examples(str(p))
    assert [(e.id, e.prompt, e.response) for e in exs] == [("t-0", "p0", "c0"), ("t-1", "p1", "c1")]
    assert exs[1].meta["source"] == "t.parquet:record 2"


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    p = tmp_path / "t.parquet"
    p.write_bytes(b"PAR1")
    assert err(p) == f"{p}: reading parquet needs pyarrow: pip install 'dualselect[parquet]'"


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert err("hf:owner/name") == "reading 'hf:owner/name' needs the datasets package: pip install 'dualselect[hub]'"


def test_hub_unreachable_and_ok(monkeypatch):
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "owner/offline":
            raise ConnectionError("no network")
        return [{"prompt": "p", "completion": "c"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert err("hf:owner/offline") == ("cannot load 'owner/offline' (split 'train') from the Hugging Face hub: "
                                       "ConnectionError: no network")
    (ex,), rep = load_examples("hf:owner/data:test")
    assert calls[-1] == ("owner/data", "test")
    assert (ex.id, ex.prompt, ex.response, ex.meta["source"]) == ("data-0", "p", "c", "hf:owner/data:test:record 1")
    assert (rep.sha256, rep.format, rep.n_kept) == ("", "prompt_completion", 1)


def test_directory_is_not_a_file(tmp_path):
    assert err(tmp_path) == f"{tmp_path}: is a directory, not a data file"
