"""The inputs of a stage, bundled once: where its activations come from, the text and the
model (`Inputs`), with the held-out defaults of the measuring stages in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlsae.core.config import DataConfig, ModelConfig, SourceConfig, Split

HELD_OUT_SPLIT: Split = "test"
"""The split the measuring stages (evaluate, analyze, evolution, the explorer) read by default."""
HELD_OUT_TOKENS = 8192
"""Held-out tokens the measuring stages read from the model when there is no cache."""


@dataclass
class Inputs:
    """What a stage reads, bundled once: where the activations come from (`source`), the text
    (`data`) and the model (`model`). The CLI builds it from its options; the Python API from
    its arguments; every stage takes it whole."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """Where activations come from: a cache, or the model run on `data`."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text (unused when `source` is a cache: it names its own)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model, its dtype and device."""

    @staticmethod
    def held_out(
        source: SourceConfig | None = None,
        data: DataConfig | None = None,
        model: ModelConfig | None = None,
    ) -> Inputs:
        """The inputs of a measuring stage: what is given, else the defaults with the text's
        held-out split (`HELD_OUT_SPLIT`)."""
        return Inputs(
            source or SourceConfig(),
            data or DataConfig(split=HELD_OUT_SPLIT),
            model or ModelConfig(),
        )

    def parts(self) -> tuple[SourceConfig, DataConfig, ModelConfig]:
        """(source, data, model), for code that takes them apart."""
        return self.source, self.data, self.model
