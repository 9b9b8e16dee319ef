"""moedec: plugin-based decoding strategies for Mixture-of-Experts LLMs on MLX.

Public API (see DESIGN.md): :func:`load`, :func:`generate`, :func:`stream_generate`, the hook
markers :data:`hookimpl` / :data:`hookspec`, and the records passed to and from hooks.
"""

from __future__ import annotations

from .api import generate, generate_batch, stream_generate
from .errors import MoedecError, PluginError
from .hookspecs import hookimpl, hookspec
from .models import load
from .options import in_range
from .records import Acceptance, Chunk, Draft, Generation, GenerationStats, Verification
from .sampling import SamplingParams
from .state import DecodeState

__version__ = "0.1.0"

__all__ = [
    "Acceptance", "Chunk", "DecodeState", "Draft", "Generation", "GenerationStats", "MoedecError",
    "PluginError", "SamplingParams", "Verification", "generate", "generate_batch", "hookimpl", "hookspec", "in_range",
    "load", "stream_generate",
]
