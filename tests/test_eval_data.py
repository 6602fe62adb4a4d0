"""gpt2lab.evals.data: reading the evaluation files; every malformed record is one UserError naming
file:line."""

import gzip
import json
from pathlib import Path

import pytest

from gpt2lab.errors import UserError
from gpt2lab.evals import data as ed

HELLASWAG = {"activity_label": "Sailing", "ctx_a": "A boat sails on the lake.", "ctx_b": "the wind",
             "endings": ["blows hard.", "is a fish.", "sings.", "stops."], "label": 0, "split": "val"}


def write_jsonl(path: Path, records, bom: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


@pytest.mark.parametrize("change, words", [
    ({"label": 7}, "label 7 is not the index of one of the 4 choices (0..3)"),
    ({"label": "7"}, "label 7 is not the index of one of the 4 choices"),
    ({"label": -1}, "label -1 is not the index of one of the 4 choices"),
    ({"label": "-1"}, "label '-1' is not the index"),
    ({"label": True}, "label True is not the index"),
    ({"label": 1.0}, "label 1.0 is not the index"),
    ({"label": None}, "label None is not the index"),
    ({"endings": []}, "the choices must be a non-empty list of strings"),
    ({"endings": ["a", 2, "c", "d"]}, "the choices must be a non-empty list of strings"),
    ({"endings": "a b c d"}, "field 'endings' is str, expected list"),
    ({"ctx_a": None}, "field 'ctx_a' is NoneType, expected str"),
])
def test_hellaswag_bad_record_names_file_and_line(tmp_path, change, words):
    path = write_jsonl(tmp_path / "hs.jsonl", [HELLASWAG, {**HELLASWAG, **change}, HELLASWAG])
    with pytest.raises(UserError) as exc:
        ed.load_hellaswag(path)
    assert str(exc.value).startswith(f"{path}:2") and words in str(exc.value), str(exc.value)
    assert len(str(exc.value).splitlines()) == 1
    # --limit stops before the bad record
    assert len(ed.load_hellaswag(path, limit=1)) == 1


def test_hellaswag_missing_fields(tmp_path):
    no_label = {k: v for k, v in HELLASWAG.items() if k != "label"}
    path = write_jsonl(tmp_path / "hs.jsonl", [no_label])
    with pytest.raises(UserError, match=f"{path}:1 has no label; use the validation file"):
        ed.load_hellaswag(path)
    path = write_jsonl(tmp_path / "hs.jsonl", [{"context": "a", "choices": ["x"], "label": 0}])
    with pytest.raises(UserError, match=f"{path}:1 has no field 'activity_label'.*not have this task's format"):
        ed.load_hellaswag(path)


def test_hellaswag_label_as_text_and_bom(tmp_path):
    path = tmp_path / "hs.jsonl.gz"
    path.write_bytes(gzip.compress(("\ufeff" + json.dumps({**HELLASWAG, "label": "3"}) + "\n").encode()))
    (ex,) = ed.load_hellaswag(path)
    assert ex.label == 3 and ex.context == "Sailing: A boat sails on the lake. The wind"


@pytest.mark.parametrize("text", ["", "alone", " ", "two words "])
def test_lambada_needs_words_before_the_last(tmp_path, text):
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": "the cat sat on the mat"}, {"text": text}])
    with pytest.raises(UserError, match=f"^{path}:2: a LAMBADA passage needs words before its last one"):
        ed.load_lambada(path)
    assert ed.load_lambada(path, limit=1) == [("the cat sat on the", " mat")]


def test_lambada_field_errors(tmp_path):
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": "a b"}, {"passage": "a b"}])
    with pytest.raises(UserError, match=f"{path}:2 has no field 'text'"):
        ed.load_lambada(path)
    path = write_jsonl(tmp_path / "lam.jsonl", [{"text": ["a", "b"]}])
    with pytest.raises(UserError, match=f"{path}:1: field 'text' is list, expected str"):
        ed.load_lambada(path)


def test_mc_file_with_a_byte_order_mark_reads(tmp_path):
    records = [{"context": "Ünïcode is", "choices": ["fine", "bad"], "label": 0},
               {"context": "", "choices": ["x"], "label": 0}]
    path = write_jsonl(tmp_path / "mc.jsonl", records, bom=True)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert ed.load_mc(path) == [ed.MCExample("Ünïcode is", ["fine", "bad"], 0), ed.MCExample("", ["x"], 0)]
    gz = tmp_path / "mc.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert ed.load_mc(gz) == ed.load_mc(path)


@pytest.mark.parametrize("record, words", [
    ({"context": "a", "choices": ["x", "y"], "label": 2}, "label 2 is not the index of one of the 2 choices"),
    ({"context": "a", "choices": ["x", "y"], "label": -1}, "label -1 is not the index"),
    ({"context": "a", "choices": ["x", "y"], "label": "1"}, "field 'label' is str, expected int"),
    ({"context": "a", "choices": ["x", "y"], "label": True}, "field 'label' is bool, expected int"),
    ({"context": "a", "choices": [], "label": 0}, "the choices must be a non-empty list of strings"),
    ({"context": 3, "choices": ["x"], "label": 0}, "field 'context' is int, expected str"),
    ({"context": "a", "choices": ["x"]}, "has no field 'label'"),
])
def test_mc_bad_record_names_file_and_line(tmp_path, record, words):
    good = {"context": "a", "choices": ["x", "y"], "label": 1}
    path = write_jsonl(tmp_path / "mc.jsonl", [good, good, record])
    with pytest.raises(UserError) as exc:
        ed.load_mc(path)
    assert str(exc.value).startswith(f"{path}:3") and words in str(exc.value), str(exc.value)


@pytest.mark.parametrize("load", [ed.load_mc, ed.load_hellaswag, ed.load_lambada])
def test_unreadable_files_are_one_error(tmp_path, load):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80")
    with pytest.raises(UserError, match=f"{binary} is not UTF-8 text"):
        load(binary)
    not_json = tmp_path / "notes.jsonl"
    not_json.write_text("some text\n")
    with pytest.raises(UserError, match=f"{not_json}:1 is not valid JSON"):
        load(not_json)
    not_object = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(UserError, match=f"{not_object}:1 is a JSON list, not an object"):
        load(not_object)
    with pytest.raises(UserError, match="does not exist; check the path given with --data"):
        load(tmp_path / "missing.jsonl")


def test_resolve_data(tmp_path):
    f = write_jsonl(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["x"], "label": 0}])
    assert ed.resolve_data("mc", str(f)) == str(f)
    with pytest.raises(UserError, match="for task mc does not exist"):
        ed.resolve_data("mc", str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="for task hellaswag is a directory; pass the task's .jsonl file"):
        ed.resolve_data("hellaswag", str(tmp_path))
    with pytest.raises(UserError, match="task mc needs --data FILE.jsonl"):
        ed.resolve_data("mc", None)
    with pytest.raises(UserError, match="task loss needs --data"):
        ed.resolve_data("loss", None, {"data": {"path": str(tmp_path / "gone")}})
    with pytest.raises(UserError, match="matches no file"):
        ed.resolve_data("loss", str(tmp_path / "*.nothing"))
