"""One prompt through an SAE: its codes at every token and layer (`PromptCodes`), from which
the report's per-prompt heatmap (the layer distribution P(L | J) summed over the prompt's
tokens, SPEC 4, through `LayerStats`), one latent's token x layer map, and the top latents at
a token are read. The prompt is tokenized as the data is (BOS first when the sink is excluded,
position 0 then not counted)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.analysis.layers import LayerStats, LayerStatsResult, sae_encoder
from mlsae.core.config import ModelConfig, SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.model import LoadedModel
from mlsae.lens.tuned import TunedLens
from mlsae.sae.autoencoder import SparseAutoencoder


@dataclass
class PromptCodes:
    """An SAE's sparse codes on every token x layer of one prompt."""

    text: str
    ids: list[int]  # token ids, BOS included when the sink is excluded
    tokens: list[str]  # each token decoded alone
    layers: list[int]  # block index of each layer column
    used: Tensor  # bool[T]: False at special tokens (and the sink), as in the statistics
    top_acts: Tensor  # f32[T, L, k] >= 0 (zeros at tokens not used)
    top_indices: Tensor  # i64[T, L, k]
    d_sae: int

    def dense(self) -> Tensor:
        """Latent activations f32[T, L, d_sae] (tokens x layers x latents)."""
        T, L, _ = self.top_acts.shape
        out = torch.zeros(T, L, self.d_sae)
        return out.scatter_(2, self.top_indices, self.top_acts)

    def latent(self, j: int) -> Tensor:
        """Latent j's activation at every token x layer: f32[T, L]."""
        if not 0 <= j < self.d_sae:
            raise MlsaeError(f"latent must be 0..{self.d_sae - 1}")
        return (self.top_acts * (self.top_indices == j)).sum(-1)

    def stats(self) -> LayerStatsResult:
        """The layer distribution over the prompt's used tokens (SPEC 4): what the report draws
        as the prompt's heatmap (`p_layer_given_latent`, latents x layers)."""
        st = LayerStats(self.d_sae, self.layers)
        st.update(self.top_acts, self.top_indices, self.used)
        return st.result()

    def top(self, layer: int, position: int, n: int = 10) -> list[tuple[int, float]]:
        """The (latent, activation) pairs active at token `position` of block `layer`, largest
        first, at most n."""
        if layer not in self.layers:
            raise MlsaeError(f"layer must be one of the SAE's layers {self.layers}")
        if not -len(self.ids) <= position < len(self.ids):
            raise MlsaeError(f"position must be 0..{len(self.ids) - 1}")
        acts = self.top_acts[position, self.layers.index(layer)]
        idx = self.top_indices[position, self.layers.index(layer)]
        order = acts.argsort(descending=True)
        return [(int(idx[i]), float(acts[i])) for i in order[:n] if acts[i] > 0]


@torch.no_grad()
def encode_prompt(
    lm: LoadedModel,
    text: str,
    sae: SparseAutoencoder,
    layers: list[int],
    lens: TunedLens | None = None,
    exclude_sink: bool = True,
    chunk_vectors: int = 8192,
) -> PromptCodes:
    """Capture `layers` of `lm` on `text` and encode every used token's vectors with `sae`
    (through the tuned `lens` when the SAE was trained in its space)."""
    from mlsae.data.capture import capture, used_mask
    from mlsae.data.text import bos_id_of

    if lm.d_model != sae.cfg.d_in:
        raise MlsaeError(f"model {lm.name!r} has d_model {lm.d_model}, the SAE d_in {sae.cfg.d_in}")
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    bos = bos_id_of(lm.tokenizer) if exclude_sink else None
    if bos is not None:  # as the contexts of the data: BOS first, position 0 not counted
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)  # [1, T]
    if ids.shape[1] == 0:
        raise MlsaeError(f"prompt {text!r} has no tokens")
    layers = sorted(int(x) for x in layers)
    x = capture(lm.model, ids, layers)[0].float()  # [T, L, d]
    used = used_mask(ids, lm.special_ids, exclude_first=exclude_sink)[0]  # [T]
    T, L, d = x.shape
    k = sae.cfg.k
    top_acts, top_idx = torch.zeros(T, L, k), torch.zeros(T, L, k, dtype=torch.int64)
    encode = sae_encoder(sae, lens, layers)
    rows = used.nonzero().flatten()
    step = max(1, chunk_vectors // L)
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        acts, idx = encode(x[r].reshape(len(r) * L, d))
        top_acts[r], top_idx[r] = acts.reshape(len(r), L, k), idx.reshape(len(r), L, k)
    flat = ids[0].tolist()
    return PromptCodes(
        text,
        flat,
        [str(lm.tokenizer.decode([i])) for i in flat],
        layers,
        used,
        top_acts,
        top_idx,
        sae.cfg.d_sae,
    )


def analyze_prompts(
    prompts: list[str],
    model: ModelConfig,
    sae: SparseAutoencoder,
    cfg: SaeConfig,
    layers: list[int],
    chunk_vectors: int = 8192,
    lens: TunedLens | None = None,
    exclude_sink: bool = True,
) -> list[LayerStatsResult]:
    """Per prompt: capture every layer's vector of its tokens, encode, and accumulate (the
    layer distribution of `encode_prompt`)."""
    if not prompts:
        return []
    from mlsae.data.model import load_model

    lm = load_model(model)
    if lm.d_model != cfg.d_in:
        raise MlsaeError(f"model {model.name!r} has d_model {lm.d_model}, the SAE d_in {cfg.d_in}")
    return [
        encode_prompt(lm, text, sae, layers, lens, exclude_sink, chunk_vectors).stats()
        for text in prompts
    ]
