"""Seeds that depend on a place, never on a process: the same numbers in every run,
resumed run and split of the work (one batch, DDP shares, FSDP2 owners).

- :func:`sketch_seeds`: a randomized sketch's generator seeds (GaLore's randomized refresh,
  CoSO's Gaussian accumulator), numpy's ``SeedSequence`` words of (seed, place, matrix,
  count, stream), computed here without numpy;
- :func:`rounding_seed`: the seed of a stochastic rounding (of stored state, of weights);
- :func:`element_bits`: that rounding's random bits per element, a hash of the element's
  global index (a shard's: :class:`Span`) and the seed.
"""
import zlib
from typing import NamedTuple

import torch


def sketch_seeds(seed: int, group_index: int, place: int, count: int, matrices: range, *stream: int) -> torch.Tensor:
    """Seeds of a param's randomized sketches at one draw, for its ``matrices`` (indices into
    its (B, m, n) view, or its blocks): each a function of (``seed``, the param's group and
    place in it, the matrix, ``count`` — the refresh's, or the step's for a rule that draws
    every step) only,
    so every split of the refreshes (one batch, DDP shares, FSDP2 owners) and every resumed
    run draws the same numbers for a matrix. numpy's ``SeedSequence(seed, spawn_key=key)``'s
    first word (:func:`seed_sequence_word`), key = (group_index, place, j, count, *stream), so
    the streams are well separated; a rule drawing other random numbers than the refresh's
    names its own ``stream``."""
    return torch.tensor([seed_sequence_word(seed, (group_index, place, j, count, *stream)) for j in matrices],
                        dtype=torch.int64)


def bucket_seeds(bucket, which: list[int], counts: list[int], *, seed: int,
                 stream: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """:func:`sketch_seeds` of a bucket's entries ``which`` (a param, whose matrices are
    ``range(B)``, or block b of one, its own matrix b) at their ``counts``."""
    return [sketch_seeds(seed, bucket.group_index, bucket.places[i], count,
                         range(bucket.counts[i]) if bucket.blocks[i] is None else range(bucket.blocks[i], bucket.blocks[i] + 1),
                         *stream)
            for i, count in zip(which, counts)]


# numpy's SeedSequence (O'Neill's hash mixing; numpy/random/bit_generator.pyx), enough of it
# to give the first 32-bit word of SeedSequence(entropy, spawn_key).generate_state(1).
_MASK, _INIT_A, _MULT_A, _INIT_B, _MULT_B = 0xFFFFFFFF, 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def _words(value: int) -> list[int]:
    """A non-negative int as little-endian 32-bit words (at least one)."""
    words = [value & _MASK]
    value >>= 32
    while value:
        words.append(value & _MASK)
        value >>= 32
    return words


def seed_sequence_word(entropy: int, spawn_key: tuple[int, ...]) -> int:
    """``numpy.random.SeedSequence(entropy, spawn_key=spawn_key).generate_state(1)[0]``."""
    run = _words(entropy)
    if spawn_key and len(run) < _POOL:
        run += [0] * (_POOL - len(run))
    data = run + [w for key in spawn_key for w in _words(key)]
    hash_const = _INIT_A

    def hashmix(value):
        nonlocal hash_const
        value = (value ^ hash_const) & _MASK
        hash_const = (hash_const * _MULT_A) & _MASK
        value = (value * hash_const) & _MASK
        return value ^ (value >> 16)

    def mix(x, y):
        result = (_MIX_L * x - _MIX_R * y) & _MASK
        return result ^ (result >> 16)

    pool = [hashmix(data[i] if i < len(data) else 0) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(data)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(data[src]))
    value = (pool[0] ^ _INIT_B) & _MASK
    value = (value * ((_INIT_B * _MULT_B) & _MASK)) & _MASK
    return value ^ (value >> 16)


def rounding_seed(*place) -> int:
    """A 32-bit seed from the parts of a place (ints and strs), the same in every process."""
    return zlib.crc32("/".join(map(str, place)).encode())


def _int32(value: int) -> int:
    """The int32 with the low 32 bits of ``value``."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int32 tensors; products wrap
    mod 2³² and shifts are logical (masked), so it is the hash of the unsigned values."""
    for _ in range(2):
        x = (((x >> 16) & 0xFFFF) ^ x) * 0x45D9F3B
    return ((x >> 16) & 0xFFFF) ^ x


class Span(NamedTuple):
    """Where the entries of a piece of a tensor lie in the whole one, in the piece's order:
    ``first`` is the global index of its first entry; they come in rows of ``width``
    consecutive entries, ``stride`` apart (a piece of some columns of a matrix: width = its
    columns, stride = the matrix's); ``skip``: entries of the piece left out at its start (a
    chunk of it). A contiguous range (a piece of rows): width = stride."""
    first: int
    width: int = 1
    stride: int = 1
    skip: int = 0

    def after(self, k: int) -> "Span":
        """The entries of the piece from its ``k``-th on."""
        return self._replace(skip=self.skip + k)

    def index(self, n: int, device) -> torch.Tensor:
        """The global indices of the piece's next ``n`` entries, mod 2³², as int32."""
        if self.width == self.stride:
            offset = self.first + self.skip
            if offset + n <= 1 << 31:
                return torch.arange(offset, offset + n, dtype=torch.int32, device=device)
            index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
        else:
            k = torch.arange(self.skip, self.skip + n, dtype=torch.int64, device=device)
            index = self.first + k // self.width * self.stride + k % self.width
        index = index & 0xFFFFFFFF
        return torch.where(index >= 1 << 31, index - (1 << 32), index).to(torch.int32)


def element_bits(n: int, seed: int, offset: int | Span, device) -> torch.Tensor:
    """16 random bits (int32 in [0, 2¹⁶)) for each of ``n`` elements, entry i
    ``hash(hash(g_i) ^ seed)``: a function of the element's global index g_i (``offset``: the
    index of the first one in the whole tensor, for a shard or a chunk of consecutive entries,
    or a :class:`Span` for a piece of columns) and ``seed`` only, so every split of a tensor
    draws the bits the whole one draws."""
    span = offset if isinstance(offset, Span) else Span(offset)
    return _mix32(_mix32(span.index(n, device)) ^ _int32(seed)) & 0xFFFF
