"""Seeds that depend on a place, never on a process: the same numbers in every run,
resumed run and split of the work (one batch, DDP shares, FSDP2 owners).

- :func:`sketch_seeds`: a randomized sketch's generator seeds (GaLore's randomized refresh,
  CoSO's Gaussian accumulator), numpy's ``SeedSequence`` words of (seed, place, matrix,
  count, stream), computed here without numpy;
- :func:`rounding_seed`: the seed of a stochastic rounding (of stored state, of weights);
- :func:`element_bits`: that rounding's random bits per element, a hash of the element's
  global index and the seed.
"""
import zlib

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


def element_bits(n: int, seed: int, offset: int, device) -> torch.Tensor:
    """16 random bits (int32 in [0, 2¹⁶)) for each of ``n`` consecutive elements, entry i
    ``hash(hash(offset + i) ^ seed)``: a function of the element's global index (``offset``:
    the index of the first one in the whole tensor, for a shard or a chunk) and ``seed``
    only, so every split of a tensor draws the bits the whole one draws."""
    if offset + n <= 1 << 31:
        index = torch.arange(offset, offset + n, dtype=torch.int32, device=device)
    else:   # the global index mod 2³², as int32
        index = torch.arange(offset, offset + n, dtype=torch.int64, device=device) & 0xFFFFFFFF
        index = torch.where(index >= 1 << 31, index - (1 << 32), index).to(torch.int32)
    return _mix32(_mix32(index) ^ _int32(seed)) & 0xFFFF
