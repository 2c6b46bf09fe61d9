"""The compute dtype: `auto`'s calibration on a CPU (decision logic on faked timings, the cache
file and its guards), and the SAE's numbers in bf16 and fp32 against a dense float64 reference
in plain torch, with tolerances for each dtype that hold on any matmul kernel."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mlsae.core import calibrate, compute
from mlsae.core.calibrate import BF16_MARGIN, BUDGET_S, Calibration, decide, measure
from mlsae.core.config import SaeConfig
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.train.member import step_probe

F32, BF16 = torch.float32, torch.bfloat16

# ----------------------------------------------------------------------------- decision logic


def test_decide_needs_every_ratio_above_the_margin() -> None:
    probe = [1.0, 1.0]
    assert decide(probe, None, None) == "float32"  # the quick probe alone never picks bf16
    assert decide(probe, [10.0, 10.0 / (BF16_MARGIN + 0.05)], None) == "bfloat16"
    assert decide(probe, [10.0, 10.0 / (BF16_MARGIN - 0.05)], None) == "float32"
    assert decide(probe, [10.0, 4.0], [10.0, 5.0]) == "bfloat16"
    assert decide(probe, [10.0, 4.0], [10.0, 9.0]) == "float32"  # the step is what counts
    assert decide(probe, [10.0, 40.0], [10.0, 5.0]) == "float32"


def fake_timer(ms: dict[tuple[str, torch.dtype], float], calls: list | None = None):
    """A timer returning ms[(what, dtype)] without running anything."""

    def timer(what: str, dtype: torch.dtype, fn) -> float:
        if calls is not None:
            calls.append((what, dtype))
        return ms[(what, dtype)] / 1e3

    return timer


def no_step(dtype: torch.dtype, rows: int):
    return lambda: None


@pytest.mark.parametrize(
    ("cpu", "ms", "probe", "want", "stage"),
    [  # ms per call: probe, matmul, step for fp32 / bf16
        ("AVX2 (bf16 100x slower)", (1, 100, 8, 800, 50, 5000), True, "float32", "probe"),
        ("Zen 4 (avx512_bf16)", (1, 0.5, 8, 3.4, 50, 31), True, "bfloat16", "steps"),
        ("AMX", (1, 0.2, 8, 1.3, 50, 12), True, "bfloat16", "steps"),
        ("fast matmul, slow step", (1, 0.5, 8, 3.4, 50, 45), True, "float32", "steps"),
        ("bf16 a little faster", (1, 0.9, 8, 7.0, 50, 44), True, "float32", "matmul"),
        ("no step probe", (1, 0.5, 8, 3.4, 50, 31), False, "bfloat16", "matmul"),
        ("over the time budget", (1, 0.5, 300, 200, 50, 31), True, "float32", "budget"),
    ],
)
def test_measure_on_faked_timings(cpu, ms, probe, want, stage) -> None:
    table = {
        ("probe", F32): ms[0],
        ("probe", BF16): ms[1],
        ("matmul", F32): ms[2],
        ("matmul", BF16): ms[3],
        ("step", F32): ms[4],
        ("step", BF16): ms[5],
    }
    calls: list = []
    cal = measure(64, 512, no_step if probe else None, timer=fake_timer(table, calls))
    assert (cal.choice, cal.stage) == (want, stage), cpu
    # time-boxed: what it ran adds up to at most the budget plus the call that crossed it
    spent = sum(table[c] for c in calls) / 1e3
    assert cal.seconds == pytest.approx(spent, abs=1e-3)
    assert spent <= BUDGET_S + max(table.values()) / 1e3
    if stage == "probe":  # bf16 100x slow: two probe calls each, nothing more
        assert len(calls) == 4
    if cal.matmul_ms is not None:
        assert cal.matmul_ms == [ms[2], ms[3]]


def test_measure_with_real_timings_and_the_training_step() -> None:
    """The real timer and step probe run (tiny shape): a valid calibration, whichever the
    verdict on this CPU."""
    cal = measure(16, 64, step_probe(16, 4, 4))
    assert cal.choice in ("float32", "bfloat16") and cal.shape == [16, 64]
    assert cal.stage in ("probe", "matmul", "steps", "budget") and cal.probe_ms[0] > 0


# ----------------------------------------------------------------------------- the cache file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh $MLSAE_CACHE and process memo; `calls` counts the measurements, each answering
    `verdict[0]`."""
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "_MEMO", {})
    calls: list = []
    verdict = ["float32", "steps"]

    def fake_measure(d, m, probe=None, timer=None) -> Calibration:
        calls.append(probe is not None)
        stage = verdict[1] if probe is not None else "matmul"
        return Calibration(
            calibrate.cpu_name(),
            torch.__version__,
            1,
            [d, m],
            verdict[0],
            stage,
            [1.0, 2.0],
            [8.0, 4.0],
            None,
        )

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    return calls, verdict


def test_calibration_is_cached_per_cpu_and_torch(cache, monkeypatch) -> None:
    calls, verdict = cache
    verdict[0] = "bfloat16"
    first = calibrate.cpu_calibration(64, 512, no_step)
    path = calibrate.cache_path()
    assert path.parent.parent == calibrate.cache_root() and path.exists()
    assert json.loads(path.read_text())["choice"] == "bfloat16"
    assert calibrate.cpu_calibration() is first and calls == [True]  # this process's memo
    monkeypatch.setattr(calibrate, "_MEMO", {})  # a new process reads the file
    assert calibrate.cpu_calibration(64, 512, no_step) == first and calls == [True]
    assert compute.resolve_compute_dtype("auto", verbose=False) == BF16
    # another torch version measures again
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert calibrate.cache_path() != path
    calibrate.cpu_calibration(64, 512, no_step)
    assert calls == [True, True]


def test_a_matmul_only_verdict_for_bf16_is_measured_again_with_steps(cache, monkeypatch) -> None:
    calls, verdict = cache
    verdict[0] = "bfloat16"
    assert calibrate.cpu_calibration(64, 512).stage == "matmul"  # e.g. `mlsae evaluate` first
    monkeypatch.setattr(calibrate, "_MEMO", {})
    assert calibrate.cpu_calibration(64, 512, no_step).stage == "steps"  # then training
    assert calls == [False, True]
    monkeypatch.setattr(calibrate, "_MEMO", {})
    calibrate.cpu_calibration(64, 512, no_step)
    assert calls == [False, True]


@pytest.mark.parametrize(
    "damage", ["{not json", '{"cpu": 3}', '["a list"]', None], ids=["torn", "type", "list", "dir"]
)
def test_a_damaged_cache_file_is_measured_again_and_replaced(cache, caplog, damage) -> None:
    calls, _ = cache
    path = calibrate.cache_path()
    path.parent.mkdir(parents=True)
    if damage is None:
        path.mkdir()  # unreadable: a folder where the file should be; not writable either
    else:
        path.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="mlsae.core.calibrate"):
        cal = calibrate.cpu_calibration(64, 512, no_step)
    assert cal.choice == "float32" and calls == [True]
    assert str(path.name) in caplog.text
    if damage is not None:  # replaced by a valid file
        assert json.loads(path.read_text())["stage"] == "steps"


def test_an_unwritable_cache_is_logged_not_fatal(cache, tmp_path, monkeypatch, caplog) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "file"))  # a file where a folder should be
    with caplog.at_level(logging.WARNING, logger="mlsae.core.calibrate"):
        assert calibrate.cpu_calibration(64, 512).choice == "float32"
    assert "could not cache" in caplog.text


def test_an_explicit_dtype_never_calibrates(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("calibrated")

    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "measure", boom)
    assert compute.resolve_compute_dtype("float32", verbose=False) == F32
    assert compute.resolve_compute_dtype("bfloat16", verbose=False) == BF16


# ----------------------------------------------------------------------------- the numbers

# |ours - reference| <= ATOL + RTOL * |reference| for values of order 1 (pre-activations, codes,
# reconstructions). fp32: a 64-term dot product in any kernel's summation order (AVX2, AVX-512,
# AMX) is within ~1e-6; bf16 rounds u and W_enc to 8 significant bits (2^-9 relative), so a
# pre-activation of order 1 moves by up to ~1e-2 (7e-3 measured here). A near-tie at the k-th
# value may then swap latents: bf16 keeps >= 90% of the reference's latents (99.5% here).
TOL = {F32: (1e-5, 1e-4), BF16: (1e-2, 1e-2)}
FVU_TOL = {F32: (1e-5, 1e-4), BF16: (2e-3, 1e-2)}


def _reference(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense float64 SAE in plain torch from the definition (SPEC 2)."""
    x = x.double()
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True) + 1e-5
    u = (x - mean) / std
    W_enc, b_enc, W_dec, b_dec = (
        p.detach().double()
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)  # noqa: N806
    )
    pre = (u - b_dec) @ W_enc + b_enc
    v, i = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    u_hat = z @ W_dec + b_dec
    fvu = (u - u_hat).pow(2).sum() / (u - u.mean(0)).pow(2).sum()
    return {
        "pre": pre,
        "z": z,
        "mean": mean,
        "std": std,
        "fvu": fvu,
        "W_dec": W_dec,
        "b_dec": b_dec,
    }


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_encoder_topk_decoder_and_fvu_match_a_dense_reference(dtype) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        SaeConfig(d_in=64, expansion_factor=8, k=16), seed=1, compute_dtype=dtype
    )
    x = torch.randn(400, 64) * (1 + torch.rand(64)) + torch.randn(64)
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    ref = _reference(sae, x)
    atol, rtol = TOL[dtype]
    with torch.no_grad():
        enc = sae.encode(x)
        x_hat = sae.decode(enc)
    acts, idx = enc.top_acts.double(), enc.top_indices
    # encoder: each selected value is the reference's pre-activation there (ReLU'd)
    want = ref["pre"].gather(1, idx).relu()
    assert ((acts - want).abs() <= atol + rtol * want.abs()).all()
    # top-k: the same latents wherever the k-th and (k+1)-th values are clearly apart; a
    # near-tie may swap, but never for a latent below the reference's k-th value by more
    top = ref["pre"].topk(sae.cfg.k + 1, dim=1).values
    kth, next_ = top[:, -2], top[:, -1]
    clear = (kth - next_) > 2 * (atol + rtol * kth.abs())
    same = (idx.sort(1).values == ref["pre"].topk(sae.cfg.k, dim=1).indices.sort(1).values).all(1)
    assert same[clear].all()
    ref_idx = ref["pre"].topk(sae.cfg.k, dim=1).indices
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, ref_idx, strict=True)]
    assert sum(shared) / idx.numel() >= (0.9 if dtype == BF16 else 1.0)
    floor = kth - 2 * (atol + rtol * kth.abs())
    assert (ref["pre"].gather(1, idx) >= floor.unsqueeze(1)).all()
    # decoder: our code, decoded by the reference, back in the raw space
    z = torch.zeros_like(ref["pre"]).scatter(1, idx, acts)
    want_x = (z @ ref["W_dec"] + ref["b_dec"]) * ref["std"] + ref["mean"]
    assert ((x_hat.double() - want_x).abs() <= atol + rtol * want_x.abs()).all()
    # FVU of the training step against the reference's
    fvu = sae.train_step_forward(x).fvu.item()
    f_atol, f_rtol = FVU_TOL[dtype]
    assert fvu == pytest.approx(ref["fvu"].item(), rel=f_rtol, abs=f_atol)


def test_default_learning_rate_falls_with_the_dictionary() -> None:
    from mlsae.core.config import TrainConfig

    cfg = TrainConfig()
    assert cfg.lr is None and cfg.resolved_lr(4608) == pytest.approx(1e-3)
    for d_sae in (1152, 18432, 32768):  # 1 / sqrt(d_sae): 4x the latents, half the rate
        assert cfg.resolved_lr(d_sae) == pytest.approx(1e-3 * (4608 / d_sae) ** 0.5)
    assert TrainConfig(lr=5e-4).resolved_lr(1152) == 5e-4  # --lr wins
