# pyright: strict
"""A training run as an object (`Run`: its folder, settings, SAE and model) and the per-prompt
helpers a notebook needs, each the code the report or the explorer runs:

- `layer_distribution(prompt)`: the SAE's codes at every token x layer of a prompt
  (`mlsae.analysis.prompt.PromptCodes`: `.dense()` tokens x layers x latents, `.latent(j)` one
  latent's token x layer map, `.stats()` the layer distribution the report's per-prompt
  heatmap draws);
- `top_latents(prompt, layer, position)`: the latents active at one token of one block;
- `steer(prompt, latent, factor)`: the next-token distribution with `factor` x the latent's
  decoder direction added at one block (the explorer's prompt page, `mlsae.explore.live`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae.core.errors import MlsaeError

if TYPE_CHECKING:
    from mlsae.analysis.prompt import PromptCodes
    from mlsae.core.config import RunConfig
    from mlsae.data.model import LoadedModel
    from mlsae.explore.live import Live
    from mlsae.sae.autoencoder import SparseAutoencoder
    from mlsae.sae.folders import RunFolder
    from mlsae.sae.metrics import MetricsResult


@dataclass
class TokenProb:
    """One next token and its probability."""

    id: int
    token: str
    p: float


@dataclass
class Steering:
    """The next-token distribution after a prompt, clean / with the SAE's reconstruction
    spliced in at `layer` / steered (`factor` x latent `latent`'s direction added there); the
    12 most likely tokens of each, and KL(clean || spliced), KL(clean || steered) in nats."""

    prompt: str
    latent: int
    layer: int
    factor: float
    clean: list[TokenProb]
    spliced: list[TokenProb]
    steered: list[TokenProb]
    kl_spliced: float
    kl_steered: float


class Run:
    """A training run folder (or a bare SAE folder) as `mlsae.train` leaves it.

    >>> run = mlsae.Run("runs/demo")  # doctest: +SKIP
    >>> codes = run.layer_distribution("The cat sat on the mat.")  # doctest: +SKIP
    >>> codes.dense().shape  # tokens x layers x latents  # doctest: +SKIP
    torch.Size([8, 30, 4608])
    """

    def __init__(self, path: str | Path, model: str | None = None) -> None:
        """`model`: the model to run prompts through (default: the one the SAE names)."""
        self.path = Path(path)
        self.model_name = model
        self._lm: LoadedModel | None = None
        self._live: Live | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @functools.cached_property
    def folder(self) -> RunFolder:
        """The run folder (MlsaeError if it does not exist)."""
        from mlsae.sae.folders import RunFolder

        return RunFolder(self.path)

    @functools.cached_property
    def config(self) -> RunConfig | None:
        """The run's settings (train_cfg.json); None for a bare SAE folder."""
        from mlsae.core.config import RunConfig
        from mlsae.core.io import read_json
        from mlsae.sae.folders import RUN_CFG

        path = self.path / RUN_CFG
        if not path.is_file():
            return None
        return RunConfig.from_dict(read_json(path, "run config"), str(path))

    @functools.cached_property
    def sae(self) -> SparseAutoencoder:
        """The run's SAE (MlsaeError naming them for a sweep or per-layer set: open one of their
        folders as a Run)."""
        return self.folder.load(self.folder.sae_dir())

    @property
    def final_fvu(self) -> dict[str, MetricsResult] | None:
        """final_fvu.json: each SAE's per-layer metrics on training tokens (`.per_layer["fvu"]`,
        `.mean["fvu"]`; None before the end)."""
        from mlsae.train.outputs import read_final_fvu

        path = self.path / "final_fvu.json"
        return read_final_fvu(path) if path.is_file() else None

    def model(self) -> LoadedModel:
        """The model the SAE reads (loaded once)."""
        if self._lm is None:
            from mlsae.core.config import ModelConfig
            from mlsae.data.model import load_model

            name = self.model_name or self.sae.cfg.model
            if not name:
                raise MlsaeError(f"{self.path}: the SAE names no model: Run(path, model=...)")
            self._lm = load_model(ModelConfig(model=name, device="cpu"))
        return self._lm

    def layer_distribution(self, prompt: str) -> PromptCodes:
        """The SAE's codes at every token x layer of `prompt`: `.dense()` [tokens, layers,
        latents], `.latent(j)` [tokens, layers], `.stats().p_layer_given_latent` (the report's
        per-prompt heatmap), `.tokens`, `.used`."""
        from mlsae.analysis.prompt import encode_prompt
        from mlsae.lens.tuned import resolve_space

        sae = self.sae
        space = resolve_space(sae.cfg.lens, None, sae_dir=self.folder.sae_dir())
        return encode_prompt(
            self.model(),
            prompt,
            sae,
            list(sae.cfg.layers),
            space.lens,
            exclude_sink=bool(sae.cfg.exclude_sink),
        )

    def top_latents(
        self, prompt: str, layer: int, position: int = -1, n: int = 10
    ) -> list[tuple[int, float]]:
        """The (latent, activation) pairs active at token `position` (default the last) of block
        `layer` on `prompt`, largest first, at most `n`."""
        return self.layer_distribution(prompt).top(layer, position, n)

    def steer(self, prompt: str, latent: int, factor: float, layer: int | None = None) -> Steering:
        """The next-token distribution after `prompt` with `factor` x latent `latent`'s decoder
        direction added to the residual stream at block `layer` (default: the SAE's last)."""
        from mlsae.explore.live import SteerRequest

        live = self._explorer()
        # raw units: factor x the decoder row; no generated continuation
        request = SteerRequest(latent, float(factor), "raw", [], max_act=1.0, n_gen=0)
        got = live.prompt(prompt, 0, latent, layer, None, request)
        nxt: dict[str, Any] = got["next"]
        if nxt.get("pos") is None:
            raise MlsaeError("the prompt's last token is not a predicted position")

        def dist(key: str) -> list[TokenProb]:
            return [TokenProb(int(t["id"]), str(t["token"]), float(t["p"])) for t in nxt[key]]

        return Steering(
            prompt,
            latent,
            int(got["layer"]),
            float(factor),
            dist("clean"),
            dist("spliced"),
            dist("steered"),
            float(nxt["kl_spliced"]),
            float(nxt["kl_steered"]),
        )

    def _explorer(self) -> Live:
        """The explorer's prompt engine on this run, sharing this Run's model."""
        if self._live is None:
            from mlsae.explore.live import Live

            lm = self.model()
            self._live = Live(self.path, lm.name, max_tokens=1 << 30)
            self._live.lm = lm
        return self._live


def open_run(path: str | Path, model: str | None = None) -> Run:
    """A run folder (or SAE folder) as a `Run`; `model` overrides the model the SAE names."""
    return Run(path, model)


def layer_distribution(run: Run | str | Path, prompt: str) -> PromptCodes:
    """`Run.layer_distribution` of a run or its folder."""
    return (run if isinstance(run, Run) else Run(run)).layer_distribution(prompt)


def top_latents(
    run: Run | str | Path, prompt: str, layer: int, position: int = -1, n: int = 10
) -> list[tuple[int, float]]:
    """`Run.top_latents` of a run or its folder."""
    return (run if isinstance(run, Run) else Run(run)).top_latents(prompt, layer, position, n)


def steer(
    run: Run | str | Path, prompt: str, latent: int, factor: float, layer: int | None = None
) -> Steering:
    """`Run.steer` of a run or its folder."""
    return (run if isinstance(run, Run) else Run(run)).steer(prompt, latent, factor, layer)
