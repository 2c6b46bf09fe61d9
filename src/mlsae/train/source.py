"""The activations a training run reads: an activation cache (`--cache`), or the model run live
on the training split (no `--cache`): the live stream is read through the same shuffle buffer
as a cache of the same settings (`mlsae.activations.source.ActivationSource.shuffled`), so the
run writes nothing but its own folder, and training on the stream equals training on
`mlsae cache --shard-tokens S` of the same tokens (same seed). The stream's settings are saved
in the RunConfig (`source`, `data`, `model`, `stream`), so `--resume` reopens the identical
stream and skips to the checkpoint's batch without running the model on the batches before.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from mlsae.activations.source import ActivationSource
from mlsae.core.config import (
    ExtractConfig,
    RunConfig,
    SaeGridConfig,
    TrainConfig,
)
from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import write_json
from mlsae.core.lock import folder_lock
from mlsae.core.outputs import check_output, check_writable
from mlsae.sae.folders import RUN_CFG
from mlsae.train.memory import check_training_memory, training_disk
from mlsae.train.parallel import plan_shares
from mlsae.train.run import check_new_run, plan_run, read_run

DEFAULT_TOKENS = 50_000
"""Training tokens read from the model when --tokens is not given."""


def open_stream(
    inputs: Inputs, stream: ExtractConfig, layers: list[int] | str | None
) -> ActivationSource:
    """The live training stream: the model on `source.tokens` tokens of the train split of
    `inputs.data`, blocks of `stream.shard_tokens` tokens stored in `stream.storage_dtype`."""
    from mlsae.activations.open import open_live

    source, data, model = inputs.parts()
    fixed = [int(x) for x in layers] if isinstance(layers, list) else None
    spec = layers if isinstance(layers, str) else None
    return open_live(
        Inputs(replace(source, cache=None, layers=spec), replace(data, split="train"), model),
        default_tokens=source.tokens or DEFAULT_TOKENS,
        layers=fixed,
        storage_dtype=stream.storage_dtype,
        block_tokens=stream.shard_tokens,
    )


def open_run_source(run: RunConfig) -> ActivationSource:
    """The activations of an existing run: its cache, or its live stream reopened."""
    if run.cache is not None:
        from mlsae.activations.cache import ActivationCache

        return ActivationCache(run.cache)
    if run.stream is None:
        raise MlsaeError(f"{RUN_CFG} names no activation cache nor live stream: cannot resume")
    return open_stream(Inputs(run.source, run.data, run.model), run.stream, list(run.layers))


def prepare_run(
    out: Path,
    lock: ExitStack,
    *,
    inputs: Inputs | None = None,
    sae: SaeGridConfig | None = None,
    train: TrainConfig | None = None,
    stream: ExtractConfig | None = None,
    resume: bool = False,
    train_given: dict[str, object] | None = None,
    device: str | None = None,
) -> tuple[RunConfig, ActivationSource]:
    """The RunConfig and activations of a new run (RUN/train_cfg.json written), or of the run in
    `out` (resume: `train_given` max_steps / epochs may be raised, `device` may move it; saved
    once its checkpoint loads). Every option, the output location, the batch and the memory
    needed are checked before the folder is made; the folder's lock is entered on `lock`."""
    if resume:
        if not out.is_dir():
            raise MlsaeError(f"--resume {out}: no such run folder")
        lock.enter_context(folder_lock(out, "training run"))
        run = read_run(out, train_given, save=False)  # saved once the checkpoint loads
        if device is not None and device != run.model.device:
            run.model = replace(run.model, device=device)
        src = open_run_source(run)
        if run.cache is None and run.fingerprint is not None:
            have = stream_fingerprint(run)
            if have != run.fingerprint:
                raise MlsaeError(
                    f"--resume {out}: the model or the corpus changed since the run "
                    f"started (stream fingerprint {have[:12]}, the run's "
                    f"{run.fingerprint[:12]}): the run cannot continue on other "
                    "data; train a new run with --out instead"
                )
        check_training_memory(run, src)
        return run, src
    source, data, model = (inputs or Inputs()).parts()
    sae = sae or SaeGridConfig()
    train, stream = train or TrainConfig(), stream or ExtractConfig()
    check_new_run(out)
    check_output(out, "run", inputs=[source.cache, sae.lens])
    if sae.lens is not None:  # a bad lens fails before any work
        from mlsae.lens.tuned import load_lens

        load_lens(sae.lens)
    if source.cache is not None:
        from mlsae.activations.cache import ActivationCache

        src: ActivationSource = ActivationCache(source.cache)
        run = plan_run(src, Inputs(source, data, model), sae, train)
    else:
        source = replace(source, tokens=source.tokens or DEFAULT_TOKENS)
        layers = str(sae.single_layer) if sae.single_layer is not None else source.layers
        src = open_stream(Inputs(source, data, model), stream, layers)
        run = plan_run(src, Inputs(source, replace(data, split="train"), model), sae, train)
        run.stream = stream
        run.fingerprint = stream_fingerprint(run)
    per_read = len(run.layers) if run.mode == "per_layer" else 1
    plan_shares(src, run.layers, run.train.batch_tokens * per_read, Comm())  # one batch at least
    check_training_memory(run, src)
    check_writable(out, f"--out {out}", training_disk(run))
    out.mkdir(parents=True, exist_ok=True)
    lock.enter_context(folder_lock(out, "training run"))
    check_new_run(out)
    write_json(out / RUN_CFG, run.to_dict())
    return run, src


SAMPLE_BYTES = 16 << 20
"""Files up to 4 x this are hashed whole; larger ones by size, head and tail (a weight file
of several GB is not read at every resume)."""


def file_digest(path: Path) -> str:
    """sha256 of a file's size and contents (head and tail only for a large file)."""
    import hashlib

    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            if size <= 4 * SAMPLE_BYTES:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f.read(SAMPLE_BYTES))
                f.seek(size - SAMPLE_BYTES)
                h.update(f.read(SAMPLE_BYTES))
    except OSError as e:
        raise MlsaeError(f"{path}: unreadable ({e.strerror})") from None
    return h.hexdigest()


def _inputs_digest(name: str | None) -> list[tuple[str, str]]:
    """(file, digest) of every file of a local model or corpus folder / file; the name alone
    for a hub id (its files are pinned by the hub's revision, not checked here)."""
    if not name:
        return []
    path = Path(name).expanduser()
    if path.is_file():
        return [(path.name, file_digest(path))]
    if path.is_dir():
        files = sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith("."))
        return [(str(q.relative_to(path)), file_digest(q)) for q in files]
    return [(name, "hub")]


def stream_fingerprint(run: RunConfig) -> str:
    """Digest of what the live stream is made of: the model's files, the corpus's files and
    the stream's settings. `--resume` refuses a run whose stream would differ."""
    import hashlib
    import json

    from mlsae.core.config import DEFAULT_MODEL
    from mlsae.core.schema import to_dict

    model = run.model.model
    if model in (None, "", DEFAULT_MODEL):
        from mlsae.data.model import default_gguf_path

        model = str(default_gguf_path())
    facts = {
        "model": _inputs_digest(model),
        "dataset": _inputs_digest(run.data.dataset),
        "data": to_dict(run.data),
        "source": to_dict(replace(run.source, cache=None)),
        "stream": to_dict(run.stream),
        "layers": list(run.layers),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
