"""`gpt2lab ablate`: variants trained on the same data and budget, their rows, the plot, and resuming."""

import json

import pytest

from gpt2lab import cli

SHARED = ["--model", "tiny", "--block-size", "32", "--batch-size", "8", "--max-steps", "12", "--lr", "3e-3",
          "--warmup-steps", "2", "--eval-every", "6", "--eval-batches", "2", "--log-every", "3",
          "--checkpoint-every", "6", "--no-tensorboard", "--device", "cpu", "--sample-tokens", "0"]


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_ablate_trains_compares_and_resumes(tiny_data, tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["ablate", "--data", tiny_data, "--out", out, *SHARED, "--variant", "base=",
            "--variant", "modern=--pos-embedding rope --norm rmsnorm --mlp relu2"]
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in rows] == ["base", "modern"]
    for r in rows:
        assert {"name", "flags", "params", "tokens_per_sec", "val_loss", "val_bpb"} <= set(r)
        assert r["steps"] == 12 and r["val_bpb"] > 0 and r["tokens_per_sec"] > 0
        assert (out / r["name"] / "model.safetensors").is_file()
    assert rows[0]["flags"] == "" and rows[1]["flags"] == "--pos-embedding rope --norm rmsnorm --mlp relu2"
    assert rows[0]["params"] != rows[1]["params"]  # no position table, no norm biases
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| modern |" in stdout and "bpb vs first" in stdout
    # the same val_bpb as `gpt2lab eval --task loss` on the data dir
    code, stdout, _ = run(["eval", out / "base", "--task", "loss", "--data", tiny_data, "--quiet"], capsys)
    assert code == 0 and f"{rows[0]['val_bpb']:.4f}" in stdout

    # run again: finished variants are kept; a new one is added; an interrupted one resumes
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    (out / "modern" / "model.safetensors").unlink()  # as if killed after its last checkpoint
    code, stdout, _ = run([*argv, "--variant", "gqa=--n-kv-head 1"], capsys)
    assert code == 0
    rows2 = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in rows2] == ["base", "modern", "gqa"]
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert rows2[0] == rows[0]
    assert rows2[1]["val_bpb"] == pytest.approx(rows[1]["val_bpb"], abs=1e-6)  # resumed from step 12: same model


@pytest.mark.parametrize("variants,message", [
    ([], "at least one --variant"),
    (["base"], "NAME=FLAGS"),
    (["a=", "a=--mlp relu2"], "two variants are called 'a'"),
    (["a=--no-such-flag"], "unrecognized arguments"),
    (["a=--data elsewhere"], "unrecognized arguments"),
    (["a=--mlp 'relu2"], "No closing quotation"),
])
def test_bad_variants_are_one_error_line(tiny_data, tmp_path, capsys, variants, message):
    argv = ["ablate", "--data", tiny_data, "--out", tmp_path / "a", *SHARED]
    for v in variants:
        argv += ["--variant", v]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "a").exists()
