"""`mlsae info`: what the pipeline will see of a model on this machine, with its special
tokens summarised on one line."""

from __future__ import annotations

import re

import torch

from mlsae.core.config import ModelConfig
from mlsae.data.model import load_model


def model_info(cfg: ModelConfig) -> str:
    """`mlsae info`: what the pipeline will see of this model on this machine."""
    from mlsae.core.compute import cpu_capability, describe_device, resolve_compute_dtype

    lm = load_model(cfg)
    tok = lm.tokenizer
    specials = summarize_special_tokens(
        [(i, str(tok.convert_ids_to_tokens(i))) for i in lm.special_ids]
    )
    return "\n".join(
        [
            f"model        {lm.name} ({type(lm.model).__name__}, {cfg.dtype})",
            f"blocks       {lm.n_layers}",
            f"d_model      {lm.d_model}",
            f"vocab        {len(tok)}",
            f"special ids  {specials}",
            f"CPU          {cpu_capability()}, {torch.get_num_threads()} torch threads",
            f"device       {describe_device(lm.device)} (--device {cfg.device})",
            f"SAE compute  {resolve_compute_dtype('auto', verbose=False, device=lm.device)} (auto)",
        ]
    )


NUMBERED = re.compile(r"^(<\|?[A-Za-z_]*?)(\d+)(\|?>)$")
"""A numbered special token such as <unused17> or <extra_id_3>: (prefix, number, suffix)."""


def summarize_special_tokens(tokens: list[tuple[int, str]], max_named: int = 24) -> str:
    """`mlsae info`'s special ids on one line: their count, the named ones (`id='token'`, the
    first `max_named`), and each run of numbered ones (`<unusedN>`, ...) with consecutive ids
    and numbers as one range: `<unused0>..<unused98> (ids 7-105)`."""
    named: list[str] = []
    runs: list[list[tuple[int, str, int, str]]] = []  # [(id, prefix + suffix, number, token)]
    for i, t in sorted(tokens):
        m = NUMBERED.match(t)
        if m is None:
            named.append(f"{i}={t!r}")
            continue
        key, n = m.group(1) + m.group(3), int(m.group(2))
        last = runs[-1][-1] if runs else None
        if last is not None and last[1] == key and last[0] == i - 1 and last[2] == n - 1:
            runs[-1].append((i, key, n, t))
        else:
            runs.append([(i, key, n, t)])
    parts = named[:max_named]
    if len(named) > max_named:
        parts.append(f"... {len(named) - max_named} more named")
    for run in runs:
        (i0, _, _, t0), (i1, _, _, t1) = run[0], run[-1]
        parts.append(f"{i0}={t0!r}" if len(run) == 1 else f"{t0}..{t1} (ids {i0}-{i1})")
    return f"{len(tokens)}: " + ", ".join(parts)
