"""`mlsae info` on a tokenizer with thousands of special tokens (as Gemma 3 has 6,000+): one short
line with their count, the named ones and ranges of the numbered ones."""

from __future__ import annotations

from pathlib import Path

from conftest import make_model, make_tokenizer
from typer.testing import CliRunner

from mlsae.cli.app import app
from mlsae.core.config import ModelConfig
from mlsae.data.info import summarize_special_tokens
from mlsae.data.model import load_model


def test_info_summarizes_thousands_of_special_tokens(tmp_path: Path):
    tok = make_tokenizer()
    unused = [f"<unused{i}>" for i in range(3000)]
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_image>", *unused]})
    make_model("gpt2", len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ids = load_model(ModelConfig(model=str(tmp_path / "m"))).special_ids
    res = CliRunner().invoke(app, ["info", "--model", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("special ids")]
    assert line.startswith(f"special ids  {len(ids)}: ") and len(ids) >= 3001
    first, last = tok.convert_tokens_to_ids(["<unused0>", "<unused2999>"])
    assert f"<unused0>..<unused2999> (ids {first}-{last})" in line
    assert "'<start_of_image>'" in line and len(line) < 300


def test_numbered_runs_break_at_gaps():
    toks = [
        (1, "<eos>"),
        (5, "<unused0>"),
        (6, "<unused1>"),
        (9, "<unused2>"),
        (10, "<unused3>"),
        (11, "<extra_id_0>"),
    ]
    assert summarize_special_tokens(toks) == (
        "6: 1='<eos>', <unused0>..<unused1> (ids 5-6), <unused2>..<unused3> (ids 9-10), "
        "11='<extra_id_0>'"
    )
    many = [(i, f"<tok_{chr(97 + i % 26)}{chr(97 + i // 26)}>") for i in range(40)]
    assert summarize_special_tokens(many, max_named=3).endswith("... 37 more named")
