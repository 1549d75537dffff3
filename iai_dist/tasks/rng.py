"""Counter-based random numbers: every value is a pure function of (seed, episode index, stream, position).

This is what makes an episode reproducible from (seed, index) alone, whatever batch it is drawn in and on
whatever device, without a Python loop over tasks: the bits come from integer hashing, which is exact on
CPU and GPU alike. (A stateful torch.Generator would tie an episode to the batch it was drawn with.)
"""

from __future__ import annotations

import math
import zlib

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2**32).

    Products may wrap around 2**64; only their low 32 bits are kept, which wrapping does not change.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """32-bit integers -> floats in the open interval (0, 1), on a 2**-24 grid (exact in float32)."""
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24


class EpisodeRNG:
    """Random draws for a batch of episodes; `normal("w", (d,))` returns a [tasks, d] tensor.

    Each named stream is independent; within a stream, the value at a position never depends on the
    shape asked for beyond it, so drawing more context points leaves the first ones unchanged.

    An episode's key is 64 bits: two 32-bit lanes, each a different hash chain over all 64 bits of the seed
    and of the index. With one 32-bit key, 10^9 training episodes would repeat themselves and about a fifth
    of 1,024 held-out episodes would equal training episodes (birthday collisions).
    """

    def __init__(self, seed: int, indices: torch.Tensor, device: torch.device | str = "cpu"):
        idx = indices.to(device=device, dtype=torch.int64)
        seed_lo, seed_hi = torch.full_like(idx, seed & _M32), torch.full_like(idx, (seed >> 32) & _M32)
        idx_lo, idx_hi = idx & _M32, (idx >> 32) & _M32
        a, b = _mix32(seed_lo ^ 0x5BD1E995), _mix32(idx_hi ^ 0x27D4EB2F)
        for word in (seed_hi, idx_lo, idx_hi):
            a = _mix32(a ^ word)
        for word in (idx_lo, seed_hi, seed_lo):
            b = _mix32(b ^ word)
        self.key = torch.stack([a, b], 1)  # [T, 2]
        self.device = idx.device

    def bits(self, stream: str, count: int) -> torch.Tensor:
        """[T, count] uniformly distributed 32-bit integers (as int64)."""
        salt = zlib.crc32(stream.encode())
        pos = torch.arange(count, device=self.device, dtype=torch.int64)
        position = _mix32((pos * 0x9E3779B9 + salt) & _M32)[None, :]
        return _mix32(((self.key[:, :1] ^ position) + self.key[:, 1:]) & _M32)

    def uniform(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        """[T, *shape] floats in the open interval (0, 1)."""
        return _unit(self.bits(stream, math.prod(shape))).view(-1, *shape)

    def normal(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        """[T, *shape] standard normals (Box-Muller on two uniforms per value)."""
        u = _unit(self.bits(stream, 2 * math.prod(shape)))
        u1, u2 = u[:, 0::2], u[:, 1::2]
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.view(-1, *shape)

    def gumbel(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        return -torch.log(-torch.log(self.uniform(stream, shape)))


def permute(i: torch.Tensor, key: torch.Tensor, size: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """A keyed pseudo-random bijection of range(size), elementwise (all three broadcast): distinct i < size
    give distinct values < size. This draws without replacement from a pool (images of one class) with no
    per-task shuffle of the pool and no loop over tasks.

    A balanced Feistel network on the smallest even number of bits covering `size`, cycle-walked back into
    range (at most a 4x larger domain, so a handful of passes; each pass is exact integer arithmetic).
    """
    i, key, size = torch.broadcast_tensors(i, key, size)
    if bool((i >= size).any()):
        raise ValueError("permute: every i must be below its size")  # its cycle might never come back in range
    half = ((torch.log2(size.clamp_min(2).double()).ceil().long() + 1) // 2).clamp_min(1)
    mask = (1 << half) - 1
    keys = [_mix32((key + r * 0x9E3779B9) & _M32) for r in range(rounds)]

    def feistel(x: torch.Tensor) -> torch.Tensor:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix32(right ^ k) & mask)
        return (left << half) | right

    out = feistel(i)
    while bool((bad := out >= size).any()):
        out = torch.where(bad, feistel(out), out)
    return out
