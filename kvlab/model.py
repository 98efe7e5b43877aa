"""A tiny Qwen3-style decoder whose attention runs through kvlab's caches (stage 6, notebook 06).

The block is Qwen3's: packed QKV projection, per-head q/k RMSNorm, rotate-half RoPE, grouped-query
attention, SwiGLU MLP, pre-norm residuals, a final RMSNorm and an (optionally tied) ``lm_head``.
What happens to K and V is kvlab's: each layer's packed QKV rows go to the **fused write**
(``paged_write`` / ``contig_write`` / ``paged_write_batched``: split, q/k norm, RoPE, store K/V,
return Q), then to **decode attention** over the cache (``decode_attention`` /
``paged_decode_attention``). Those two ops run on the cache's backend (``numpy``, ``cuda``,
``torch``) and in its storage dtype (fp16, float32, int8, fp8_e4m3).

Everything else (embedding, projections, norms, MLP, ``lm_head``) is **host NumPy**, the same on
every backend: a matmul accumulates in float64 and rounds once to float32, so a token's numbers do
not depend on which other rows share the matmul (BLAS picks different kernels for 1 row and for
many). So on the numpy backend a request in a continuous batch gets the bit-identical logits of
running it alone (when it computes the same chunks: a prefix-cache hit shortens its prefill, and
attention over a different number of query rows may round differently, by float32 ulps).

Who does what::

    ModelConfig      the shapes (Hugging Face Qwen3 config names); from_dict refuses unknown keys
    Qwen3Model       the weights (HF names in, one packed QKV matrix per layer) and the forward
    SequenceCache    one sequence's KvLayers, one per model layer: contiguous or paged, any dtype
    CharTokenizer    the 96-character vocabulary of the tiny trained model in data/tiny_qwen3/

Generation (greedy/sampled, single sequence and continuous batching) is in :mod:`kvlab.generate`.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kvlab.backends import Backend
from kvlab.cache import KvLayer, as_backend
from kvlab.ref.rope import rope_tables

QK_MODE = 1  # per-head RMSNorm, then rotate-half RoPE (docs/ops.md, stage 4)


# --- configuration ------------------------------------------------------------------------------

# Hugging Face Qwen3 config keys kvlab reads nothing from, with the value (or test) it requires.
# Anything else not a ModelConfig field is an "unknown key" error.
_HF_IGNORED = {
    "architectures": None, "model_type": lambda v: v == "qwen3", "torch_dtype": None,
    "dtype": None, "transformers_version": None, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None, "use_cache": None, "initializer_range": None,
    "attention_bias": lambda v: v is False, "attention_dropout": lambda v: v == 0,
    "hidden_act": lambda v: v == "silu", "use_sliding_window": lambda v: v is False,
    "sliding_window": None, "max_window_layers": None,
    "layer_types": lambda v: all(t == "full_attention" for t in v),
    "rope_scaling": lambda v: v is None or v.get("rope_type", v.get("type")) == "default",
    "rope_parameters": None,  # checked in from_dict (rope_theta inside)
    "output_attentions": None, "output_hidden_states": None, "return_dict": None,
}


@dataclass(frozen=True)
class ModelConfig:
    """A Qwen3 decoder's shapes, under Hugging Face's ``Qwen3Config`` names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 256
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for f in fields(self)[:8]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"config {f.name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if not self.rope_theta > 1 or not self.rms_norm_eps > 0:
            raise ValueError("rope_theta must be > 1 and rms_norm_eps > 0")

    @property
    def qkv_width(self) -> int:
        """Columns of a packed QKV row: ``(Hq + 2 Hkv) * head_dim`` (Q heads, then K, then V)."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """From a Hugging Face Qwen3 ``config.json`` dict (or :meth:`to_dict`'s). Keys HF writes
        but kvlab does not use are accepted when they describe this architecture (``hidden_act``
        silu, no attention bias, no sliding window, default RoPE); any other key is a ValueError."""
        if not isinstance(d, Mapping):
            raise TypeError(f"config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _HF_IGNORED)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}: kvlab's Qwen3 model reads "
                             f"{sorted(names)}")
        for key, ok in _HF_IGNORED.items():
            if key in d and ok is not None and d[key] is not None and not ok(d[key]):
                raise ValueError(f"config {key}={d[key]!r} is not supported by kvlab's Qwen3 model")
        kwargs = {k: d[k] for k in names if k in d}
        params = d.get("rope_parameters")
        if params:
            if params.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters {params!r}: only default RoPE is supported")
            kwargs.setdefault("rope_theta", params.get("rope_theta", cls.rope_theta))
        missing = sorted(f.name for f in fields(cls)[:7] if f.name not in kwargs)
        if missing:
            raise ValueError(f"config is missing {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` both kvlab and transformers (``Qwen3Config``) read."""
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **asdict(self)}

    def to_hf(self, **overrides: Any):
        """The matching ``transformers.Qwen3Config`` (imports transformers)."""
        from transformers import Qwen3Config

        kw = asdict(self)
        kw.update(attention_bias=False, hidden_act="silu", use_sliding_window=False, **overrides)
        return Qwen3Config(**kw)


# --- the tiny model's vocabulary and text ------------------------------------------------------

class CharTokenizer:
    """96 tokens: id 0 is newline, ids 1..95 are printable ASCII 32..126 (space .. tilde)."""

    vocab_size = 96

    def encode(self, text: str) -> list[int]:
        ids = []
        for ch in text:
            code = ord(ch)
            if ch == "\n":
                ids.append(0)
            elif 32 <= code <= 126:
                ids.append(code - 31)
            else:
                raise ValueError(f"character {ch!r} is not in the 96-character vocabulary "
                                 f"(newline + printable ASCII)")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append("\n" if i == 0 else chr(i + 31))
        return "".join(out)


_NAMES = ["Tom", "Anna", "the old man", "my sister", "the little girl", "a farmer", "the teacher",
          "our neighbour", "the king", "a small boy"]
_ANIMALS = ["cat", "dog", "bird", "horse", "fox", "rabbit", "cow", "duck"]
_ADJ = ["little", "big", "red", "brown", "happy", "sleepy", "white", "quick", "old", "young"]
_VERBS_T = ["sees", "likes", "finds", "feeds", "follows", "watches", "loves", "calls"]
_VERBS_I = ["sleeps", "runs", "sings", "waits", "plays", "jumps", "smiles", "walks home"]
_THINGS = ["a red ball", "the green apple", "a big box", "the blue boat", "an old book",
           "the warm bread", "a yellow hat", "the wooden door"]
_PLACES = ["in the garden", "by the river", "near the house", "on the hill", "in the forest",
           "at the market", "under the tree", "in the kitchen"]
_TIMES = ["every morning", "at night", "after lunch", "in the rain", "on sunday", "today"]


def tiny_corpus(num_sentences: int = 12000, seed: int = 0) -> str:
    """The tiny model's training text: sentences from a small English grammar, generated with a
    fixed seed (so the text's provenance is this function; nothing is downloaded). About 480 kB
    for the default 12,000 sentences, five sentences a line."""
    rng = random.Random(seed)

    def subject() -> str:
        if rng.random() < 0.5:
            return rng.choice(_NAMES)
        adj = rng.choice(_ADJ) + " " if rng.random() < 0.6 else ""
        return f"the {adj}{rng.choice(_ANIMALS)}"

    def obj() -> str:
        if rng.random() < 0.5:
            return rng.choice(_THINGS)
        return f"the {rng.choice(_ADJ)} {rng.choice(_ANIMALS)}"

    def sentence() -> str:
        r = rng.random()
        if r < 0.45:
            s = f"{subject()} {rng.choice(_VERBS_T)} {obj()}"
        elif r < 0.8:
            s = f"{subject()} {rng.choice(_VERBS_I)}"
        else:
            s = f"{subject()} and {subject()} {rng.choice(_VERBS_I).replace('s ', ' ', 1).rstrip('s')}"
        if rng.random() < 0.6:
            s += " " + rng.choice(_PLACES)
        if rng.random() < 0.3:
            s += " " + rng.choice(_TIMES)
        return s[0].upper() + s[1:] + "."

    lines = []
    for _ in range(num_sentences // 5):
        lines.append(" ".join(sentence() for _ in range(5)))
    return "\n".join(lines) + "\n"


# --- one sequence's cache across layers ---------------------------------------------------------

class SequenceCache:
    """One sequence's K/V across every layer of a model: one :class:`~kvlab.cache.KvLayer` per
    layer, all contiguous or all paged, one dtype and backend.

    Build with :meth:`contiguous` or :meth:`paged`. ``len`` tokens are held; the model's forward
    appends through each layer's fused write (``contig_write`` / ``paged_write``)."""

    def __init__(self, layers: list[KvLayer]):
        self.layers = layers

    @classmethod
    def contiguous(cls, config: ModelConfig, capacity: int, dtype: str = "fp16",
                   backend: str | Backend = "numpy") -> SequenceCache:
        """``[capacity, Hkv, D]`` K and V per layer, reserved up front."""
        return cls([KvLayer.alloc_contig(capacity, config.num_key_value_heads, config.head_dim,
                                         dtype=dtype, backend=backend)
                    for _ in range(config.num_hidden_layers)])

    @classmethod
    def paged(cls, config: ModelConfig, capacity: int, block_size: int = 16,
              dtype: str = "fp16", backend: str | Backend = "numpy") -> SequenceCache:
        """Up to ``capacity`` tokens (rounded up to whole blocks) in blocks taken as needed."""
        max_blocks = -(-capacity // block_size)
        return cls([KvLayer.alloc_paged(max_blocks, block_size, config.num_key_value_heads,
                                        config.head_dim, dtype=dtype, backend=backend)
                    for _ in range(config.num_hidden_layers)])

    @property
    def len(self) -> int:
        return self.layers[0].len

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @property
    def backend(self) -> Backend:
        return self.layers[0].backend

    @property
    def qkv_dtype(self) -> str:
        """The dtype the fused write takes QKV rows in: the pool's (float16 / float32), or float32
        for a quantized cache (it quantizes K/V itself)."""
        layer = self.layers[0]
        return "float32" if layer.kv_dtype else layer.dtype

    @property
    def nbytes_reserved(self) -> int:
        """Bytes of K/V storage (scales included) this cache holds: the full capacity when
        contiguous, the blocks in use when paged."""
        total = 0
        for layer in self.layers:
            if layer.is_paged:
                per_block = layer.pool.nbytes // max(layer.pool.num_blocks, 1)
                total += len(layer.paged_block_indices) * per_block
            else:
                total += _contig_nbytes(layer)
        return total

    @property
    def nbytes_used(self) -> int:
        """Bytes holding the ``len`` tokens' K/V (scales included), across layers."""
        layer = self.layers[0]
        elem = np.dtype(layer.dtype).itemsize
        per_token = 2 * layer.num_kv_heads * (layer.head_dim * elem + (2 if layer.kv_dtype else 0))
        return per_token * self.len * len(self.layers)

    def release(self) -> None:
        for layer in self.layers:
            layer.release()

    def __repr__(self) -> str:
        return f"SequenceCache({len(self.layers)} x {self.layers[0]!r})"


def _contig_nbytes(layer: KvLayer) -> int:
    elem = np.dtype(layer.dtype).itemsize
    codes = layer.capacity * layer.num_kv_heads * layer.head_dim * elem
    return 2 * (codes + (layer.capacity * layer.num_kv_heads * 2 if layer.kv_dtype else 0))


# --- the model ----------------------------------------------------------------------------------

def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a Hugging Face Qwen3ForCausalLM state dict holds, with its shape
    (``lm_head.weight`` only when the embeddings are not tied)."""
    c, h, d = config, config.hidden_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (c.intermediate_size, h),
            p + "mlp.up_proj.weight": (c.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, c.intermediate_size),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype: widen first)
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x)


@dataclass
class _Layer:
    qkv: np.ndarray     # float64 [(Hq + 2 Hkv) D, hidden]: q_proj, k_proj, v_proj stacked
    o: np.ndarray       # float64 [hidden, Hq D]
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    in_norm: np.ndarray     # float32 [hidden]
    post_norm: np.ndarray
    q_norm: np.ndarray      # float32 [head_dim]
    k_norm: np.ndarray


class Qwen3Model:
    """A Qwen3 decoder: Hugging Face weights, kvlab caches.

    Build with :meth:`from_state_dict` (a Hugging Face Qwen3 state dict + config), :meth:`load`
    (a folder with ``config.json`` + ``model.safetensors``, e.g. ``data/tiny_qwen3``),
    :meth:`pretrained_tiny` (that folder) or :meth:`random`.

    The weights live on the host (float32 values, kept as float64 for the batch-invariant
    matmuls). ``backend`` only sets where the norm weights and RoPE tables of the fused write go;
    the caches passed to :meth:`forward` must be on the same backend.
    """

    def __init__(self, config: ModelConfig, state_dict: Mapping[str, Any],
                 backend: str | Backend = "numpy"):
        self.config = config
        self.backend = as_backend(backend)
        weights = self._checked(config, state_dict)
        self.state_dict = weights  # float32, HF names (lm_head included only when untied)
        c = config
        self.embed = weights["model.embed_tokens.weight"]
        head = weights.get("lm_head.weight", self.embed)
        self.lm_head = head.astype(np.float64)
        self.final_norm = weights["model.norm.weight"]
        self.layers = []
        for i in range(c.num_hidden_layers):
            w = {k[len(f"model.layers.{i}."):]: v for k, v in weights.items()
                 if k.startswith(f"model.layers.{i}.")}
            self.layers.append(_Layer(
                qkv=np.concatenate([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"],
                                    w["self_attn.v_proj.weight"]]).astype(np.float64),
                o=w["self_attn.o_proj.weight"].astype(np.float64),
                gate=w["mlp.gate_proj.weight"].astype(np.float64),
                up=w["mlp.up_proj.weight"].astype(np.float64),
                down=w["mlp.down_proj.weight"].astype(np.float64),
                in_norm=w["input_layernorm.weight"], post_norm=w["post_attention_layernorm.weight"],
                q_norm=w["self_attn.q_norm.weight"], k_norm=w["self_attn.k_norm.weight"]))
        be = self.backend
        self._norm_w = [(be.asarray(l.q_norm), be.asarray(l.k_norm)) for l in self.layers]
        # The tables are computed on the host and copied to this backend's device: a backend's
        # own rope_tables picks a default device (torch: mps first), which need not be this one.
        tables = rope_tables(c.max_position_embeddings, c.head_dim, float(c.rope_theta))
        self.cos, self.sin = (be.asarray(t) for t in tables)

    # --- building ------------------------------------------------------------------------------

    @staticmethod
    def _checked(config: ModelConfig, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
        want = hf_weight_shapes(config)
        have = dict(state_dict)
        if config.tie_word_embeddings and "lm_head.weight" in have:
            tied = _to_numpy(have.pop("lm_head.weight"))
            if not np.array_equal(tied, _to_numpy(have.get("model.embed_tokens.weight", tied))):
                raise ValueError("tie_word_embeddings is set but lm_head.weight differs from "
                                 "model.embed_tokens.weight")
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        if missing or unexpected:
            raise ValueError(f"state dict does not match the config: missing {missing[:6]}"
                             f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                             f"{'...' if len(unexpected) > 6 else ''}")
        out = {}
        for name, shape in want.items():
            array = _to_numpy(have[name])
            if tuple(array.shape) != shape:
                raise ValueError(f"weight {name} has shape {tuple(array.shape)}, the config "
                                 f"needs {shape}")
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"weight {name} must be floating point, got {array.dtype}")
            out[name] = np.ascontiguousarray(array, dtype=np.float32)
        return out

    @classmethod
    def from_state_dict(cls, config: ModelConfig | Mapping[str, Any],
                        state_dict: Mapping[str, Any], backend: str | Backend = "numpy"
                        ) -> Qwen3Model:
        """From a Hugging Face Qwen3 state dict (torch tensors or NumPy arrays) and its config
        (a :class:`ModelConfig` or a ``config.json`` dict)."""
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        return cls(config, state_dict, backend)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, backend: str | Backend = "numpy",
               std: float = 0.1) -> Qwen3Model:
        """Random weights (norm weights near 1), for tests."""
        rng = np.random.default_rng(seed)
        sd = {}
        for name, shape in hf_weight_shapes(config).items():
            if len(shape) == 1:
                sd[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            else:
                sd[name] = (std * rng.standard_normal(shape)).astype(np.float32)
        return cls(config, sd, backend)

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (HF names, float32) to ``folder``."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file(self.state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: Any, backend: str | Backend = "numpy") -> Qwen3Model:
        """Read ``config.json`` + ``model.safetensors`` from ``folder`` (a path or a
        ``importlib.resources`` traversable)."""
        from safetensors.numpy import load

        folder = Path(str(folder)) if not hasattr(folder, "joinpath") else folder
        config = ModelConfig.from_dict(json.loads(folder.joinpath("config.json").read_text()))
        state = load(folder.joinpath("model.safetensors").read_bytes())
        return cls(config, state, backend)

    @classmethod
    def pretrained_tiny(cls, backend: str | Backend = "numpy") -> Qwen3Model:
        """The tiny model trained by ``python -m kvlab.train_tiny`` (``data/tiny_qwen3/``)."""
        from kvlab.data import data_path

        return cls.load(data_path("tiny_qwen3"), backend)

    @property
    def num_parameters(self) -> int:
        return sum(int(v.size) for v in self.state_dict.values())

    # --- caches ---------------------------------------------------------------------------------

    def new_cache(self, kind: str = "paged", capacity: int | None = None, dtype: str = "fp16",
                  block_size: int = 16) -> SequenceCache:
        """A :class:`SequenceCache` on this model's backend: ``kind`` ``"contiguous"`` or
        ``"paged"``; ``capacity`` defaults to ``max_position_embeddings``."""
        capacity = self.config.max_position_embeddings if capacity is None else capacity
        if kind == "contiguous":
            return SequenceCache.contiguous(self.config, capacity, dtype, self.backend)
        if kind == "paged":
            return SequenceCache.paged(self.config, capacity, block_size, dtype, self.backend)
        raise ValueError(f"cache kind must be 'contiguous' or 'paged', got {kind!r}")

    # --- host math -------------------------------------------------------------------------------

    def _rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Hugging Face's Qwen3RMSNorm in float32: ``w * (x * rsqrt(mean(x^2) + eps))``."""
        var = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
        return w * (x / np.sqrt(var + self.config.rms_norm_eps)).astype(np.float32)

    @staticmethod
    def _linear(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
        """``x @ w.T``, accumulated in float64 and rounded once to float32 (batch-invariant)."""
        return (x.astype(np.float64) @ w64.T).astype(np.float32)

    def _check_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(token_ids))
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be a non-empty list of ints, got {token_ids!r}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"{ids.min()}..{ids.max()}")
        return ids

    def _mlp_and_residual(self, x: np.ndarray, attn: np.ndarray, layer: _Layer) -> np.ndarray:
        x = x + self._linear(attn, layer.o)
        h = self._rms_norm(x, layer.post_norm)
        g = self._linear(h, layer.gate)
        silu = g / (np.float32(1) + np.exp(-g))
        return x + self._linear(silu * self._linear(h, layer.up), layer.down)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self._linear(self._rms_norm(x, self.final_norm), self.lm_head)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, token_ids: Sequence[int], cache: SequenceCache) -> np.ndarray:
        """Run ``T`` new tokens of one sequence at positions ``cache.len ..``: each layer's packed
        QKV goes through the cache's fused write (K/V stored, Q normed and rotated), then decode
        attention over everything the cache holds. Returns float32 logits ``[T, vocab_size]``.

        A prompt is one call (prefill); each decode step is a call with one token.
        """
        ids = self._check_tokens(token_ids)
        c, be = self.config, cache.backend
        if be.name != self.backend.name:
            raise ValueError(f"the cache is on the {be.name} backend, the model on "
                             f"{self.backend.name}")
        if len(cache.layers) != c.num_hidden_layers:
            raise ValueError(f"the cache has {len(cache.layers)} layers, the model "
                             f"{c.num_hidden_layers}")
        start, num = cache.len, len(ids)
        if start + num > min(cache.capacity, c.max_position_embeddings):
            raise ValueError(f"cannot run {num} tokens after {start}: the cache holds "
                             f"{cache.capacity} tokens and RoPE reaches "
                             f"{c.max_position_embeddings} positions")
        qkv_dtype = cache.qkv_dtype
        x = self.embed[ids]
        for layer, kv, (qn, kn) in zip(self.layers, cache.layers, self._norm_w):
            qkv = be.asarray(np.ascontiguousarray(
                self._linear(self._rms_norm(x, layer.in_norm), layer.qkv).astype(qkv_dtype)))
            write = kv.paged_write if kv.is_paged else kv.contig_write
            q = write(qkv, qn, kn, self.cos, self.sin, start, c.rms_norm_eps, QK_MODE)
            attn = be.to_numpy(kv.decode_attention(q)).reshape(num, -1)
            x = self._mlp_and_residual(x, attn, layer)
        return self._logits(x)

    def forward_nocache(self, token_ids: Sequence[int], dtype: str = "fp16") -> np.ndarray:
        """Logits of the whole sequence, recomputed from scratch (no cache kept between calls):
        one prefill into a throwaway contiguous cache of exactly ``len(token_ids)`` tokens."""
        ids = self._check_tokens(token_ids)
        return self.forward(ids, self.new_cache("contiguous", len(ids), dtype))

    def forward_batch(self, pool: Any, block_tables: np.ndarray, pos_offsets: Sequence[int],
                      token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One step of many sequences over a shared :class:`~kvlab.cache.KvPool` (continuous
        batching): sequence s brings ``token_lists[s]`` (a prompt chunk or one decoded token) at
        positions ``pos_offsets[s] ..``; its blocks (``block_tables[s]``, int32, reaching every
        new position) must already be reserved. The step's index arrays are checked and uploaded
        once (``paging.plan_step``); then per layer one ``paged_write_batched`` and one
        ``paged_decode_attention`` call cover every sequence, reading no index array back (each
        layer's attention output still comes to the host for the MLP). Returns each
        sequence's float32 logits ``[T_s, vocab_size]``."""
        c, be = self.config, pool.backend
        if be.name != self.backend.name:
            raise ValueError(f"the pool is on the {be.name} backend, the model on "
                             f"{self.backend.name}")
        ids = [self._check_tokens(t) for t in token_lists]
        lens = np.array([len(t) for t in ids], np.int64)
        offsets = np.asarray(pos_offsets, np.int32)
        if np.any(offsets + lens > c.max_position_embeddings):
            raise ValueError(f"positions beyond max_position_embeddings "
                             f"{c.max_position_embeddings}")
        query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        context_lens = (offsets + lens).astype(np.int32)
        plan = be.paging.plan_step(pool.k_pools[0], np.ascontiguousarray(block_tables, np.int32),
                                   query_start, context_lens)
        tables, starts_b, offsets_b, lens_b = (plan.block_tables, plan.query_start,
                                               plan.pos_offsets, plan.context_lens)
        qkv_dtype = "float32" if pool.kv_dtype else pool.dtype
        total = int(query_start[-1])
        x = self.embed[np.concatenate(ids)]
        for i, (layer, (qn, kn)) in enumerate(zip(self.layers, self._norm_w)):
            qkv = be.asarray(np.ascontiguousarray(
                self._linear(self._rms_norm(x, layer.in_norm), layer.qkv).astype(qkv_dtype)))
            scales = ((pool.k_scales[i], pool.v_scales[i]) if pool.kv_dtype else (None, None))
            q = be.fused_write.paged_write_batched(
                qkv, qn, kn, self.cos, self.sin, pool.k_pools[i], pool.v_pools[i], tables,
                starts_b, offsets_b, c.num_attention_heads, c.num_key_value_heads,
                c.rms_norm_eps, QK_MODE, *scales, pool.kv_dtype, plan=plan)
            attn = be.attention.paged_decode_attention(
                q, pool.k_pools[i], pool.v_pools[i], tables, lens_b, starts_b,
                k_scales=scales[0], v_scales=scales[1], plan=plan)
            x = self._mlp_and_residual(x, be.to_numpy(attn).reshape(total, -1), layer)
        logits = self._logits(x)
        return [logits[query_start[s]:query_start[s + 1]] for s in range(len(ids))]

    def __repr__(self) -> str:
        c = self.config
        return (f"Qwen3Model({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads}/{c.num_key_value_heads} heads x {c.head_dim}, vocab "
                f"{c.vocab_size}, {self.num_parameters:,} params, cache ops on "
                f"{self.backend.name})")
