"""One configuration that is the CLI: every option has help and is a dataclass field (or a
declared non-setting), choices come from Literals, the run configuration round-trips through
JSON with its types checked, and a run folder written before the nested configuration resumes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from mlsae.cli.app import app
from mlsae.core.config import (
    DataConfig,
    MemberSpec,
    ModelConfig,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.schema import from_dict

FIXTURE = Path(__file__).parent / "fixtures" / "v1"
NOT_SETTINGS = {
    "out",
    "seed_run",  # mlsae controls measures: a second-seed per-layer run (an input folder)
    "resume",
    "runs",
    "run",
    "src",
    "db",
    "cross",
    "lens",
    "prompt",
    "compare",
    "evolution",
    "help",
    "nproc",
    "truth",
}
"""Options that are not settings of a stage: paths of what to read or write, and mode flags."""


def _commands() -> dict[str, Any]:
    """Every command of the app by name ("lens train" for sub-commands); typer's own click."""
    root: Any = typer.main.get_command(app)
    out: dict[str, Any] = {}
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def _is_option(p: Any) -> bool:
    return type(p).__name__.endswith("Option")


def test_every_option_has_help_and_is_a_config_field_or_declared() -> None:
    cmds = _commands()
    assert {
        "cache",
        "train",
        "evaluate",
        "analyze",
        "evolution",
        "info",
        "lens train",
        "lens evaluate",
    } <= set(cmds)
    for name, cmd in cmds.items():
        for p in cmd.params:
            if p.name == "_mlsae_ctx":
                continue
            if _is_option(p):
                assert p.help and p.help.strip(), f"{name} {p.opts}: no help"
            assert p.name is not None
            if "__" in p.name:  # {config parameter}__{field}
                continue
            assert p.name in NOT_SETTINGS, f"`mlsae {name}` option {p.opts} is not a config field"


def _field_of(cmd: Any, field: str) -> Any:
    return next(p for p in cmd.params if p.name and p.name.endswith(f"__{field}"))


def test_choices_come_from_literals_and_help_from_docstrings() -> None:
    from typing import get_args

    cmds = _commands()
    split = _field_of(cmds["cache"], "split")
    assert get_args(split.type_descriptor.annotation) == ("train", "test")
    cd = _field_of(cmds["train"], "compute_dtype")
    assert set(get_args(cd.type_descriptor.annotation)) == {"auto", "float32", "bfloat16"}
    lr = _field_of(cmds["train"], "lr")
    assert _is_option(lr) and lr.help and lr.help.startswith("Adam learning rate")
    assert "-k" in _field_of(cmds["train"], "k").opts
    r = CliRunner().invoke(app, ["cache", "--help"], env={"COLUMNS": "200"})
    assert "train|test" in r.output and "bfloat16|float32" not in r.output.replace(
        "float32|bfloat16", ""
    )


def test_given_options_reach_the_command(tmp_path: Path) -> None:
    """`train --resume` refuses settings other than --max-steps / --epochs: the wrapper knows
    which options were typed (not just their values, which may equal the defaults)."""
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    for opt in (["--lr", "1e-4"], ["--dataset", "default"], ["-k", "32"]):
        r = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), *opt])
        assert isinstance(r.exception, MlsaeError), r.output
        assert opt[0] in str(r.exception) and "keeps its settings" in str(r.exception)


def test_data_commands_share_options_and_defaults() -> None:
    """Every command that reads data takes the same data / model options with the same
    defaults; only the split (test for evaluation) and the token count differ, by design."""
    cmds = _commands()
    readers = ["cache", "train", "evaluate", "analyze", "evolution", "lens train", "lens evaluate"]
    per_command = {"split", "tokens", "cache", "layers"}
    ref = {
        p.name.split("__")[1]: p.default
        for p in cmds["evaluate"].params
        if p.name and p.name.split("__")[0] in ("data", "model", "source")
    }
    assert {
        "dataset",
        "text_column",
        "hf_split",
        "context_length",
        "model",
        "dtype",
        "batch_size",
    } <= set(ref)
    for name in readers:
        got = {
            p.name.split("__")[1]: p.default
            for p in cmds[name].params
            if p.name and p.name.split("__")[0] in ("data", "model", "source")
        }
        for k, v in ref.items():
            if k in per_command or k not in got:
                continue
            assert got[k] == v, f"`mlsae {name}` --{k} defaults to {got[k]!r}, evaluate to {v!r}"
        assert {"text_column", "hf_split", "dtype", "batch_size", "context_length"} <= set(got), (
            name
        )
    assert _field_of(cmds["evaluate"], "split").default == "test"
    assert _field_of(cmds["train"], "split").default == "train"


def test_run_config_round_trips_through_json() -> None:
    rc = RunConfig(
        data=DataConfig(dataset="d.jsonl", split="test", context_length=64, test_fraction=0.2),
        model=ModelConfig(model="m", dtype="bfloat16"),
        source=SourceConfig(cache=Path("/c"), tokens=1000, layers="0-3", batch_size=3),
        sae=SaeGridConfig(expansion_factor=[2, 4], k=[8], normalize="none", per_layer=False),
        train=TrainConfig(lr=3e-4, betas=(0.8, 0.99), max_steps=7, compute_dtype="float32"),
        cache="/c",
        mode="mlsae",
        layers=[0, 1, 2, 3],
        d_in=16,
        members=[
            MemberSpec("sae_R2_k8", 2, 8, [0, 1, 2, 3], 0),
            MemberSpec("sae_R4_k8", 4, 8, [0, 1, 2, 3], 0),
        ],
        lens=None,
    )
    back = RunConfig.from_dict(json.loads(json.dumps(rc.to_dict())))
    assert back == rc
    assert isinstance(back.source.cache, Path) and back.train.betas == (0.8, 0.99)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda d: d["train"].update(lr="1e-3"), r"train: lr: expected a number"),
        (lambda d: d["sae"].update(k="16"), r"sae: k: expected a list of integers"),
        (lambda d: d["data"].update(split="dev"), r"data: split: expected one of 'train', 'test'"),
        (lambda d: d.pop("members"), r"missing field 'members'"),
        (lambda d: d["train"].update(lr=-1.0), r"--lr must be a finite number > 0"),
    ],
)
def test_schema_errors_name_the_file_and_field(patch, message) -> None:
    d = json.loads((FIXTURE / "run" / "train_cfg.json").read_text())
    d = RunConfig.from_dict(d).to_dict()  # this format
    patch(d)
    with pytest.raises(MlsaeError, match=message) as e:
        RunConfig.from_dict(d, "RUN/train_cfg.json")
    assert str(e.value).startswith("RUN/train_cfg.json")


def test_sae_config_is_type_checked() -> None:
    good = SaeConfig(d_in=8, expansion_factor=2, k=2, layers=[0]).to_dict()
    assert SaeConfig.from_dict(good) == SaeConfig(d_in=8, expansion_factor=2, k=2, layers=[0])
    with pytest.raises(MlsaeError, match="k: expected an integer"):
        SaeConfig.from_dict({**good, "k": "2"})
    with pytest.raises(MlsaeError, match="expected a JSON object"):
        SaeConfig.from_dict([good])
    with pytest.raises(MlsaeError, match="d_sae 17 is not a multiple"):
        SaeConfig.from_dict({**good, "d_sae": 17})
    assert from_dict(DataConfig, {"future_field": 1}, "x").dataset is None  # newer keys ignored


def test_a_run_from_before_the_nested_config_resumes(tmp_path: Path) -> None:
    """The fixture was written by the old code (6 of 10 steps); today's code resumes it to 10
    and lands on the weights the old code reached in one 10-step run."""
    from mlsae.train.loop import train_command

    shutil.copytree(FIXTURE / "cache", tmp_path / "cache")
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    cfg_path = tmp_path / "run" / "train_cfg.json"
    old = json.loads(cfg_path.read_text())
    assert "version" not in old and "normalize" in old  # the version-1 layout
    old["cache"] = str(tmp_path / "cache")
    cfg_path.write_text(json.dumps(old))
    train_command(tmp_path / "run", resume=True, train_given={"max_steps": 10})
    got = load_file(str(tmp_path / "run" / "sae" / "sae.safetensors"))
    want = load_file(str(FIXTURE / "ref10" / "sae.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    new = json.loads(cfg_path.read_text())
    assert new["version"] == 2 and new["train"]["max_steps"] == 10
    assert [
        json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == list(range(1, 11))


def test_config_fields_all_have_docstrings() -> None:
    from mlsae.cli.options import field_docs
    from mlsae.core import stage_config

    classes = [
        DataConfig,
        ModelConfig,
        SourceConfig,
        SaeGridConfig,
        TrainConfig,
        stage_config.EvalConfig,
        stage_config.LensTrainConfig,
        stage_config.EvolutionConfig,
    ]
    for cls in classes:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]
        assert missing == [], f"{cls.__name__}: fields without a docstring: {missing}"
