"""Rotary position embedding (RoPE) with optional frequency scaling (linear, Llama 3).

References:
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
  Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
  Interpolation" (linear scaling).
  Meta 2024, "The Llama 3 Herd of Models" (``rope_type='llama3'`` scaling).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_ROPE_KINDS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rescaling of the rotary frequencies for context extension (hashable).

  Attributes:
    kind: ``'linear'`` (position interpolation: every frequency divided by ``factor``;
      Chen et al. 2023) or ``'llama3'`` (wavelengths longer than
      ``original_max_len / low_freq_factor`` divided by ``factor``, shorter than
      ``original_max_len / high_freq_factor`` kept, smooth interpolation in between; as in
      Hugging Face ``rope_type='llama3'``).
    factor: the scale factor (> 0).
    low_freq_factor: ``'llama3'`` only.
    high_freq_factor: ``'llama3'`` only; must exceed ``low_freq_factor``.
    original_max_len: ``'llama3'`` only: the pre-training context length.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  def __post_init__(self):
    if self.kind not in _ROPE_KINDS:
      raise ValueError(f"rope_scaling.kind must be one of {_ROPE_KINDS}, got {self.kind!r}")
    if not self.factor > 0:
      raise ValueError(f"rope_scaling.factor must be positive, got {self.factor}")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(
        "rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
        f"{self.high_freq_factor} and {self.low_freq_factor}"
      )


def rope_frequencies(
  head_dim: int, *, base: float, scaling: RopeScaling | None = None
) -> np.ndarray:
  """Rotary inverse frequencies ``[head_dim // 2]`` (float64), with optional scaling.

  ``inv_freq[i] = base ** (-2 i / head_dim)``; ``scaling`` rescales them as described in
  :class:`RopeScaling`.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (np.arange(half, dtype=np.float64) / half))
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  # llama3: long wavelengths slowed by `factor`, short ones kept, smooth ramp between.
  low_wavelen = scaling.original_max_len / scaling.low_freq_factor
  high_wavelen = scaling.original_max_len / scaling.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  ramp = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return np.where(middle, ramp, out)


def rotary_tables(max_position: int, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(cos, sin)``, each ``[max_position, head_dim // 2]`` float32: the rotary angles
  ``position * inv_freq`` formed in float32 (as Hugging Face does), their cosine and sine
  evaluated in float64 and rounded."""
  angles = np.arange(max_position, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)
  angles = angles.astype(np.float64)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(
  x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *, max_position: int
) -> jax.Array:
  """Rotary position embedding of ``x [batch, t, heads, head_dim]`` at ``positions [batch, t]``,
  each in ``[0, max_position)``.

  Half-split (``rotate_half``) convention of GPT-NeoX and Hugging Face Llama. The cosines and
  sines are looked up in :func:`rotary_tables` (constants of the program) rather than
  evaluated where they are used: XLA fused that evaluation into every query and key element
  of every head and layer, forward and backward, about 13% of the HH reward-model step
  (BUILD_NOTES, session 35).
  """
  half = x.shape[-1] // 2
  cos, sin = (
    jnp.asarray(t)[positions][:, :, None, :] for t in rotary_tables(max_position, inv_freq)
  )
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
