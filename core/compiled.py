"""The single-token decode step under ``mx.compile``, for the engine's pipelined fast path.

mlx-lm's ``KVCache`` writes at a Python-int offset, so a compiled step would be traced again every
token. Here each layer gets a fixed-capacity copy of its cache whose offset is an array shared by
all layers (RoPE, the cache write and the attention mask take it as an array), so one compiled
graph serves every step until the capacity is used up; then the buffers grow by :data:`CHUNK`
positions and the step is traced once more. Per token this removes the Python graph building of
the model code and lets MLX fuse the elementwise ops.

The copies are written back into the engine's cache when decoding ends, so the cache afterwards is
the one the uncompiled path leaves.

On CUDA the step's attention is moedec's decode-attention kernel, which reads the valid length
from the offset array (MLX's fused attention takes no mask there) and, with :data:`FUSED_CACHE_WRITE`,
writes the new position into the layer's cache in the same kernel, in place (the buffers are the
step's own: no copy of the cache per step); with :data:`FUSED_ROPE` a joined
q/k/v layer's RoPE runs in it too (:meth:`StaticKVCache.attend_qkv`). Elsewhere (and for any attention
call the kernel cannot take) the new position is written with a select rather than a dynamic-offset
update (which costs two extra kernels per cache array).

The step is traced under :func:`moedec.kernels.joined` (GLM-4.x attention and decoder layers in
fewer kernels). On by default with MLX's CUDA backend, where it measured 1.14-1.37x the plain fused
step on an H200; off elsewhere (``compile_step=True`` / ``--compile-step`` turns it on): on the CPU
it measured 1.69x mlx-lm on a tiny float32 model whose step is all Python overhead, level with the
plain step on the bundled model (1.01x) (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from functools import partial
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .errors import MoedecError

#: Architectures whose compiled step is tested equal to the uncompiled one (tests/test_compiled.py).
COMPILABLE = frozenset({"glm4_moe", "qwen3_moe", "mixtral"})

CHUNK = 256  # positions added when the fixed-capacity cache is full
TOKEN_DTYPE = mx.uint32  # the step's token ids (what argmax and categorical sampling give)
#: On CUDA, the decode-attention kernel also writes the new key and value into the cache (one kernel
#: per layer instead of the attention and two cache-wide selects).
FUSED_CACHE_WRITE = True
#: With it, a joined q/k/v layer's RoPE is applied in that kernel too (``StaticKVCache.attend_qkv``).
FUSED_ROPE = True


def why_not_compiled(model: Any, cache: list) -> Optional[str]:
    """``None`` if this model's single-token step can run compiled, else why not."""
    arch = getattr(getattr(model, "args", None), "model_type", None)
    if arch not in COMPILABLE:
        return f"architecture {arch!r} is not among the compilable ones ({', '.join(sorted(COMPILABLE))})"
    if not cache or any(type(c) is not KVCache or c.keys is None for c in cache):
        return "every layer needs a filled mlx-lm KVCache"
    return None


def offset_array(length: int) -> mx.array:
    """``pos["offset"]`` for ``length`` positions filled (see :class:`StaticKVCache`)."""
    from moedec.kernels.fused import SMALL

    return mx.full((SMALL,), length, dtype=mx.int32)


class StaticKVCache:
    """One layer's cache with mlx-lm's interface: ``keys``/``values`` ``[B, H, C, D]`` of fixed
    capacity ``C`` and an offset shared by every layer: ``pos["offset"]``, ``SMALL`` int32s whose
    element 0 is the number of positions filled (the attention kernels read it as it is: a 4-byte
    array would live in MLX's unified-memory pool of small arrays, which kernels reach across the
    bus, :data:`moedec.kernels.fused.SMALL`); :attr:`offset` is that element as a scalar."""

    def __init__(self, keys: mx.array, values: mx.array, pos: dict, shared: Optional[dict] = None):
        self.state = {"keys": keys, "values": values}
        self.pos = pos
        self.shared = {} if shared is None else shared  # per-step arrays every layer uses (not state)
        self.defer = False  # leave a one-token write to the attention call (set while tracing on CUDA)
        self.pending: Optional[tuple] = None  # (keys, values) [B, H, 1, D] of a deferred write

    @property
    def offset(self) -> mx.array:
        """The positions filled, a scalar int32 array (mlx-lm's RoPE and mask take it)."""
        return self.pos["offset"][0]

    @property
    def kernel_offset(self) -> mx.array:
        """The offset as the attention kernels read it: element 0 of the ``SMALL`` int32s, no op."""
        return self.pos["offset"]

    def _per_step(self, key: str, make) -> mx.array:
        """``make()``, once per step for every layer (``shared`` is cleared as each step is traced)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def update_and_fetch(self, keys, values):
        if keys.shape[2] == 1:
            if self.defer:  # the attention call writes it (see _decode_attention): hand back the cache as it is
                self.pending = (keys, values)
                return self.state["keys"], self.state["values"]
            self._select(keys, values)
        else:
            start = self.offset.reshape(1)
            self.state["keys"] = mx.slice_update(self.state["keys"], keys, start, axes=(2,))
            self.state["values"] = mx.slice_update(self.state["values"], values, start, axes=(2,))
        return self.state["keys"], self.state["values"]  # all C positions; the mask hides the rest

    def _select(self, keys, values) -> None:
        """Write one position with a select over the buffer (no dynamic-offset copy and offset kernels)."""
        at = self._per_step("at", lambda: (mx.arange(self.state["keys"].shape[2]) == self.offset)[:, None])  # [C, 1]
        self.state["keys"] = mx.where(at, keys, self.state["keys"])  # [B, H, C, D]
        self.state["values"] = mx.where(at, values, self.state["values"])

    def write_pending(self) -> None:
        """Write a deferred position now (an attention call that the kernel does not take)."""
        keys, values = self.pending
        self.pending = None
        self._select(keys, values)

    def attend_qkv(self, qkv: mx.array, heads: int, rope: Any, scale: float) -> Optional[mx.array]:
        """While a deferred write is possible (``defer``, CUDA): one token's attention from a joined
        projection's output ``qkv [B, 1, H + 2 Hkv, D]`` before ``rope`` (an ``mlx.nn.RoPE``), with
        the new position written, in one kernel: ``[B, 1, H * D]``; ``None`` if that kernel cannot take it
        (the caller then runs the RoPE and ``update_and_fetch`` as usual)."""
        if not (self.defer and FUSED_ROPE) or self.pending is not None:
            return None
        from moedec.kernels.ops import decode_attention_qkv, rope_spec, why_not_attention_qkv

        spec = rope_spec(rope)
        if why_not_attention_qkv(qkv, self.state["keys"], heads, spec) is not None:
            return None
        out, self.state["keys"], self.state["values"] = decode_attention_qkv(
            qkv, self.state["keys"], self.state["values"], self.kernel_offset, scale, heads, spec)
        return out

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise MoedecError("sliding-window attention cannot use the compiled step")
        rows = self.offset + mx.arange(n)[:, None]  # [N, 1]: each query's position
        return mx.arange(self.state["keys"].shape[2])[None] <= rows  # [N, C]


@contextlib.contextmanager
def _decode_attention(model: Any, layers: list):
    """While the step is traced on CUDA: the architecture's attention over a :class:`StaticKVCache`
    goes to moedec's decode-attention kernel, which reads the valid length from the offset array
    (MLX's fused attention takes no mask on CUDA; with the padding mask it falls back to several
    kernels per layer), and with :data:`FUSED_CACHE_WRITE` the layers' one-token cache writes are
    left to it (``layers``' ``defer``)."""
    from moedec import kernels

    module = importlib.import_module(f"mlx_lm.models.{model.args.model_type}")
    stock = getattr(module, "scaled_dot_product_attention", None)
    if kernels.device_backend() != "cuda" or stock is None:
        yield
        return
    from moedec.kernels.ops import decode_attention, decode_attention_write, why_not_decode_attention

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, StaticKVCache):
            fits = sinks is None and why_not_decode_attention(queries, keys) is None
            if cache.pending is not None:
                if fits:
                    (new_keys, new_values), cache.pending = cache.pending, None
                    out, cache.state["keys"], cache.state["values"] = decode_attention_write(
                        queries, keys, values, new_keys, new_values, cache.kernel_offset, scale)
                    return out
                cache.write_pending()
                keys, values = cache.state["keys"], cache.state["values"]
            if fits:
                return decode_attention(queries, keys, values, cache.kernel_offset, scale)
        return stock(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    module.scaled_dot_product_attention = attention
    for c in layers:
        c.defer = FUSED_CACHE_WRITE
    try:
        yield
    finally:
        module.scaled_dot_product_attention = stock
        for c in layers:
            c.defer = False


def _padded(a: mx.array, length: int, capacity: int) -> mx.array:
    a = a[..., :length, :]
    return mx.concatenate([a, mx.zeros((*a.shape[:2], capacity - length, a.shape[3]), a.dtype)], axis=2)


class _Trace:
    """One compiled step for one capacity: the :class:`StaticKVCache` layers whose state the
    compiled function reads and writes, and the function. It may serve several
    :class:`CompiledSteps` one after another (:func:`_acquire`): MLX replays a compiled function
    without tracing it again while its inputs keep their shapes and dtypes."""

    def __init__(self, model: Any, arrays: list, length: int):
        pos, shared = {"offset": offset_array(length)}, {}
        self.layers = [StaticKVCache(k, v, pos, shared) for k, v in arrays]
        self.pos = pos
        self.traces = 0  # times mx.compile traced the step (once, when all goes well)
        self.traced = False  # a call has traced (and compiled) the step
        state = [c.state for c in self.layers] + [pos]
        layers = self.layers

        @partial(mx.compile, inputs=state, outputs=state)
        def step(tokens):
            from moedec import kernels

            self.traces += 1
            shared.clear()
            # in the body, so every trace gets them: mx.compile traces again whenever an input's
            # shape or dtype changes, and a trace without them would be mlx-lm's layers over the cache
            with _decode_attention(model, layers), kernels.joined(model):
                logits = model(tokens, cache=layers)[:, -1, :]  # [1, V]
            if any(c.pending is not None for c in layers):
                raise MoedecError("a layer's deferred cache write was not taken by its attention call")
            pos["offset"] = pos["offset"] + tokens.shape[1]
            shared.clear()  # no traced arrays kept past the trace
            return logits

        self.step = step

    @property
    def capacity(self) -> int:
        return self.layers[0].state["keys"].shape[2]

    def load(self, arrays: list, length: int) -> None:
        """Point the state at another generation's buffers (of this trace's shapes and dtypes)."""
        for c, (k, v) in zip(self.layers, arrays):
            c.state["keys"], c.state["values"], c.pending = k, v, None
        self.pos["offset"] = offset_array(length)

    def unload(self) -> None:
        """Drop the buffers (the engine's cache holds them now): a kept trace holds no cache memory."""
        for c in self.layers:
            c.state["keys"] = c.state["values"] = None


#: Compiled steps kept between generations, per model: ``id(model) -> [(key, trace)]``. A trace is
#: taken again only by a model whose parameters (the very arrays), module classes and kernel
#: settings are those it was traced with (:func:`_key`), for buffers of the same shapes and dtypes.
_KEPT: dict[int, list] = {}
KEEP = 4  # traces kept per model (the most recently released)


def _key(model: Any, arrays: list) -> tuple:
    from mlx.utils import tree_flatten

    from moedec import kernels
    from moedec.kernels import layer

    leaves = tuple(a for _, a in tree_flatten(model.parameters()))
    classes = tuple((type(m), m.__dict__.get("moedec_backend")) for _, m in model.named_modules())
    shapes = tuple((k.shape, k.dtype, v.shape, v.dtype) for k, v in arrays)
    settings = (kernels.device_backend(), FUSED_CACHE_WRITE, FUSED_ROPE, layer.JOIN_ROUTER, layer.JOIN_INPUT_NORM)
    return shapes, classes, settings, leaves


def _same_model(a: tuple, b: tuple) -> bool:
    """Keys of the same model state: classes and settings equal, parameters the very same arrays."""
    return a[1:-1] == b[1:-1] and len(a[-1]) == len(b[-1]) and all(x is y for x, y in zip(a[-1], b[-1]))


def _acquire(model: Any, key: tuple) -> Optional[_Trace]:
    """A kept trace for ``key``, taken out of the pool; kept traces of a changed model are dropped."""
    kept = _KEPT.get(id(model))
    if not kept:
        return None
    kept[:] = [(k, t) for k, t in kept if _same_model(k, key)]
    found = next((i for i, (k, _) in enumerate(kept) if k[0] == key[0]), None)
    return None if found is None else kept.pop(found)[1]


def _release(model: Any, key: tuple, trace: _Trace) -> None:
    trace.unload()
    if id(model) not in _KEPT:
        _KEPT[id(model)] = []
        weakref.finalize(model, _KEPT.pop, id(model), None)
    kept = _KEPT[id(model)]
    kept.append((key, trace))
    del kept[:-KEEP]


def clear_traces() -> None:
    """Forget every kept compiled step (they are traced again on next use)."""
    _KEPT.clear()


class CompiledSteps:
    """``steps(tokens [1, 1]) -> logits [1, V]``: one decode step through fixed-capacity copies of
    ``cache`` (mlx-lm ``KVCache`` s), compiled once per capacity. :meth:`write_back` hands the
    positions decoded so far back to ``cache``.

    ``reuse``: take the compiled step from an earlier ``CompiledSteps`` of the same, unchanged
    model (the engine's choice: tracing and compiling the step cost each generation ~4 ms on an
    H100, the time of several tokens) and keep it for a later one when :meth:`close` is called."""

    def __init__(self, model: Any, cache: list, reuse: bool = False):
        self.model, self.cache, self.reuse = model, cache, reuse
        self.length = cache[0].offset  # positions filled (a Python int, mirrored by pos["offset"])
        self.traces = 0  # times mx.compile traced the step for this object (0 with a reused trace)
        self._trace: Optional[_Trace] = None
        self._key: Optional[tuple] = None
        self._grow()

    @property
    def layers(self) -> list[StaticKVCache]:
        return self._trace.layers

    def _grow(self) -> None:
        capacity = (self.length // CHUNK + 1) * CHUNK
        if self._trace is not None:
            src = [(c.state["keys"], c.state["values"]) for c in self._trace.layers]
        else:
            src = [(c.keys, c.values) for c in self.cache]
        arrays = [(_padded(k, self.length, capacity), _padded(v, self.length, capacity)) for k, v in src]
        old, old_key = self._trace, self._key
        self._key = _key(self.model, arrays) if self.reuse else None
        trace = _acquire(self.model, self._key) if self.reuse else None
        if trace is None:
            trace = _Trace(self.model, arrays, self.length)
        else:
            trace.load(arrays, self.length)
        self._trace = trace
        if old is not None:
            self._put_back(old, old_key)

    def _put_back(self, trace: _Trace, key: Optional[tuple]) -> None:
        if self.reuse and trace.traced:
            _release(self.model, key, trace)

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.length + tokens.shape[1] > self._trace.capacity:
            self._grow()
        if tokens.dtype != TOKEN_DTYPE:  # one dtype, one trace (argmax gives uint32, mx.array([[t]]) int32)
            tokens = tokens.astype(TOKEN_DTYPE)
        trace = self._trace
        before = trace.traces
        if trace.traced:
            logits = trace.step(tokens)
        else:  # this call traces: a failed trace leaves placeholders in the state, so keep the arrays
            saved = [dict(c.state) for c in trace.layers], trace.pos["offset"]
            try:
                logits = trace.step(tokens)
            except Exception:
                for c, state in zip(trace.layers, saved[0]):
                    c.state.update(state)
                    c.pending = None
                trace.pos["offset"] = saved[1]
                raise
            trace.traced = True
        self.traces += trace.traces - before
        self.length += tokens.shape[1]
        return logits

    def write_back(self) -> None:
        for c, s in zip(self.cache, self._trace.layers):
            c.keys, c.values, c.offset = s.state["keys"], s.state["values"], self.length

    def close(self) -> None:
        """:meth:`write_back`, then (``reuse``) keep the compiled step for a later generation; the
        object is not called again."""
        self.write_back()
        trace, self._trace = self._trace, None
        self._put_back(trace, self._key)
