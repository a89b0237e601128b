"""Prompt and pair sources users have: JSONL, JSON, parquet files and folders, save_to_disk folders, hub datasets
(offline-aware) — with one-line errors naming the file and line or row, and prompt lengths checked."""

from __future__ import annotations

import json

import pytest

from gprl.config import DataSpec
from gprl.data import load_prompts
from gprl.gpm.data import DataError, load_pairs

ROWS = [{"prompt": "first line\n  indented second"}, {"prompt": [{"role": "user", "content": "hi\nthere"}]}]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_jsonl_json_parquet_and_folders_give_the_same_prompts_text_untouched(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # Dataset.to_json's layout
    text_rows = [{"prompt": "first line\n  indented second"}, {"prompt": "x\ty"}]
    _parquet(tmp_path / "p.parquet", text_rows)
    (tmp_path / "folder").mkdir()
    _parquet(tmp_path / "folder" / "a.parquet", text_rows[:1])
    (tmp_path / "folder" / "b.jsonl").write_text(json.dumps(text_rows[1]) + "\n")
    want = ["first line\n  indented second", "user: hi\nthere"]  # no chat template here: plain rendering
    for name in ("p.jsonl", "p.json", "lines.json"):
        assert load_prompts(DataSpec(prompts=str(tmp_path / name))) == want, name
    assert load_prompts(DataSpec(prompts=str(tmp_path / "p.parquet"))) == ["first line\n  indented second", "x\ty"]
    assert load_prompts(DataSpec(prompts=str(tmp_path / "folder"))) == ["first line\n  indented second", "x\ty"]


def test_conversational_prompts_go_through_the_chat_template(tmp_path):
    from benchmarks.gpu.real_model import build_hub_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_hub_model(tmp_path / "hub", "o/m", "0" * 40, "tiny"))
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    got = load_prompts(DataSpec(prompts=str(tmp_path / "p.json")), tok)
    assert got == ["<|user|>\nfirst line\n  indented second<|end|>\n<|assistant|>\n",
                   "<|user|>\nhi\nthere<|end|>\n<|assistant|>\n"]


def test_errors_name_the_file_and_line_or_row(tmp_path):
    (tmp_path / "bad.json").write_text('[{"prompt": "ok"}, {"text": "no prompt"}]')
    with pytest.raises(DataError, match=r"bad.json\[1\]: needs a non-empty string field `prompt`"):
        load_prompts(DataSpec(prompts=str(tmp_path / "bad.json")))
    _parquet(tmp_path / "bad.parquet", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"bad.parquet row 1: needs"):
        load_prompts(DataSpec(prompts=str(tmp_path / "bad.parquet")))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        load_prompts(DataSpec(prompts=str(tmp_path / "broken.parquet")))
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "a"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"binary.jsonl:2: not UTF-8 text"):
        load_prompts(DataSpec(prompts=str(tmp_path / "binary.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no .jsonl/.json/.parquet files"):
        load_prompts(DataSpec(prompts=str(tmp_path / "empty")))


def test_an_offline_hub_dataset_is_one_clear_line_and_exit_2(tiny_assets, monkeypatch, capsys):
    from gprl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:nosuch-org/nosuch-ds: cannot load the dataset .*offline mode is on"):
        load_pairs("hf:nosuch-org/nosuch-ds")
    code = main(["gpm", "train", "--data", "hf:nosuch-org/nosuch-ds", "--backbone", str(tiny_assets / "policy"),
                 "--out", "never"])
    err = capsys.readouterr().err
    assert code == 2 and "offline mode is on (HF_HUB_OFFLINE=1)" in err and "Traceback" not in err


def test_prompt_plus_generation_must_fit_the_context(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets / "policy")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "rock"}) + "\n" + json.dumps({"prompt": "paper " * 40}) + "\n")
    spec = DataSpec(prompts=str(tmp_path / "p.jsonl"))
    assert len(load_prompts(spec, tok, max_new_tokens=20, context=64)) == 2  # 40 + 20 fits 64
    with pytest.raises(DataError, match=r"p.jsonl:2: this prompt \(40 tokens.* \+ rollout.maxNewTokens \(30\) = 70 "
                                        r"exceeds the policy's context of 64"):
        load_prompts(spec, tok, max_new_tokens=30, context=64)
    warnings = []
    load_prompts(DataSpec(prompts=str(tmp_path / "p.jsonl"), max_prompt_tokens=10), tok, log=warnings.append)
    assert "1 of 2 prompts are longer than data.maxPromptTokens (10)" in warnings[0]
    with pytest.raises(DataError, match=r"p.jsonl:2: the prompt is 240 characters, far past"):
        load_prompts(DataSpec(prompts=str(tmp_path / "p.jsonl"), max_prompt_tokens=3), tok)
