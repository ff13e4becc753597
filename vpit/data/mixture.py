"""A seeded, resumable, shardable sampler over a weighted mixture of data sources.

A training run mixes sources (visual understanding, image generation, image editing, ...) with relative weights and
optional caps. `MixtureSampler` turns that into one infinite global stream of `(source_index, record_index)` draws;
rank r of w takes global positions r, r + w, r + 2w, ..., so the ranks are disjoint and together are the
single-process stream.

How the stream is derived (everything is counter-based, so any position can be reached without replaying steps):

- Source choices. Global positions are cut into blocks of `BLOCK_SIZE` steps. Block b uses its own generator
  `default_rng([seed, 0, b, 0])`: it first draws the block's per-source counts, `multinomial(BLOCK_SIZE, p)` over the
  positive-weight sources, then shuffles `repeat(sources, counts)` into the block's order. A multinomial count in a
  uniformly random order is exactly a sequence of i.i.d. categorical draws, so this is ordinary weighted sampling;
  the point is that a block's counts cost one small multinomial, without its choices.
- Per-source cursors. The record a draw takes is fixed by how many times its source was drawn before it (its
  cursor). At global position P the cursors are the counts over [0, P): the multinomial counts of the whole blocks
  before P plus a `bincount` of the partial block. Restoring at position 10 million reads about 600 blocks' counts
  (milliseconds); nothing loops per step.
- Records. Source s with n usable records (its cap, else its size) serves cursor k from epoch k // n at offset k % n.
  Epoch e is the permutation `default_rng([seed, 2, s, e]).permutation(n)` of those records, so every epoch is a
  fresh, deterministic shuffle. A cap keeps the first `cap` entries of `default_rng([seed, 1, s, 0]).permutation(size)`
  (sorted), which depends only on (seed, s, size): for one seed the cap-100 subset is contained in the cap-300 subset,
  whatever the other sources are. A streaming source (size None) serves its cursor itself, 0, 1, 2, ... (the caller
  shuffles streams with a buffer), modulo the cap when it has one.

The state is the global position of this rank's next draw plus the configuration it belongs to:

    {"scheme": "vpit.mixture/v1", "position": 24690, "rank": 0, "world_size": 2,
     "seed": 0, "sizes": [50000, None], "weights": [0.7, 0.3], "caps": [None, 100000]}

`load_state_dict` refuses a state from another scheme, seed, mixture (sizes, weights, caps) or rank layout.

Example:

    sampler = MixtureSampler([665_000, None], [0.7, 0.3], names=["understanding", "generation"], rank=r, world_size=w)
    for source, record in sampler:  # infinite
        example = datasets[source][record]
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

BLOCK_SIZE = 16384
"""Global steps per counter-based block of source choices. Part of the stream's definition (see `SCHEME`)."""

SCHEME = "vpit.mixture/v1"
"""Name of the derivation above, stored in every state; a state from another scheme is refused."""

# Second entry of every seed key, so the three kinds of generator never share a seed.
_CHOICES, _SUBSET, _EPOCH = 0, 1, 2


class MixtureSampler(Iterator[tuple[int, int]]):
    """Infinite seeded stream of `(source_index, record_index)` for one rank of a weighted mixture.

    Args:
        sizes: records per source; None for a streaming source of unknown length.
        weights: relative sampling probabilities, >= 0 and not all zero; a zero-weight source is never drawn.
        caps: per source, at most this many distinct records are used (a fixed seeded subset, nested across caps
            for one seed); for a streaming source, the first `cap` records of the stream. None: no cap.
        seed: non-negative integer; the same seed gives the same stream.
        rank: this process's rank in [0, world_size); it takes global positions rank, rank + world_size, ...
        world_size: number of ranks sharing the stream.
        names: labels for error messages and `peek_counts` keys; default "0", "1", ...
    """

    def __init__(
        self,
        sizes: Sequence[int | None],
        weights: Sequence[float],
        caps: Sequence[int | None] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: Sequence[str] | None = None,
    ) -> None:
        num = len(sizes)
        if num == 0:
            raise ValueError("sizes must list at least one source, got []")
        for field, values in (("weights", weights), ("caps", caps), ("names", names)):
            if values is not None and len(values) != num:
                raise ValueError(f"{field} has {len(values)} entries but sizes has {num}; give one per source")
        if names is not None:
            for i, name in enumerate(names):
                if not isinstance(name, str) or not name:
                    raise ValueError(f"names[{i}] must be a non-empty string, got {name!r}")
            if len(set(names)) != num:
                raise ValueError(f"names must be unique, got {list(names)}")

        def label(field: str, i: int) -> str:
            return f"{field}[{i}] ({names[i]})" if names is not None else f"{field}[{i}]"

        caps = [None] * num if caps is None else caps
        for i in range(num):
            size, weight, cap = sizes[i], weights[i], caps[i]
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{label('weights', i)} must be a finite number >= 0, got {weight}")
            if size is not None and operator.index(size) < 0:
                raise ValueError(f"{label('sizes', i)} must be >= 0 or None (streaming), got {size}")
            if cap is not None and operator.index(cap) < 1:
                raise ValueError(f"{label('caps', i)} must be >= 1 or None (no cap), got {cap}")
            if size == 0 and weight > 0:
                raise ValueError(
                    f"{label('sizes', i)} is 0 but its weight is {weight}: an empty source cannot be sampled; "
                    "give it weight 0 or leave it out"
                )
            if size is not None and cap is not None and cap > size:
                raise ValueError(
                    f"{label('caps', i)} is {cap} but the source has only {size} records; lower the cap or pass None"
                )
        if sum(weights) <= 0:
            raise ValueError(f"weights must not all be zero, got {list(weights)}")
        if operator.index(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if operator.index(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= operator.index(rank) < world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")

        self.sizes: tuple[int | None, ...] = tuple(None if s is None else int(s) for s in sizes)
        self.weights: tuple[float, ...] = tuple(float(w) for w in weights)
        self.caps: tuple[int | None, ...] = tuple(None if c is None else int(c) for c in caps)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.names: tuple[str, ...] = tuple(names) if names is not None else tuple(str(i) for i in range(num))

        w = np.asarray(self.weights, dtype=np.float64)
        self._active = np.flatnonzero(w > 0)  # sources that can be drawn
        self._active_p = w[self._active] / w[self._active].sum()
        # Usable records per source: the cap, else the size; None for an uncapped stream (never wraps).
        self._usable: tuple[int | None, ...] = tuple(
            c if c is not None else s for s, c in zip(self.sizes, self.caps, strict=True)
        )
        self._subsets: dict[int, npt.NDArray[np.int64]] = {
            i: self._capped_subset(i) for i in range(num) if self.sizes[i] is not None and self.caps[i] is not None
        }

        self._block_index = -1
        self._block = np.empty(0, dtype=np.int64)
        self._epoch_perms: dict[int, tuple[int, npt.NDArray[np.int64]]] = {}  # source -> (epoch, record order)
        self._position: int = self.rank
        self._consumed: npt.NDArray[np.int64] = self._counts_between(0, self.rank)  # draws per source before it

    # ------------------------------------------------------------------------------------------------ public

    @property
    def position(self) -> int:
        """Global stream position of this rank's next draw (rank + world_size * draws taken)."""
        return self._position

    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> tuple[int, int]:
        p = self._position
        source = int(self._block_choices(p // BLOCK_SIZE)[p % BLOCK_SIZE])
        record = self._record(source, int(self._consumed[source]))
        if self.world_size == 1:
            self._consumed[source] += 1
        else:
            self._consumed += self._counts_between(p, p + self.world_size)
        self._position = p + self.world_size
        return source, record

    def epoch_of(self, source: int) -> int:
        """Completed passes over `source`'s usable records before this rank's next draw (0 for an uncapped stream)."""
        usable = self._usable[source]
        return int(self._consumed[source]) // usable if usable else 0

    def peek_counts(self, num_draws: int) -> dict[str, int]:
        """How many of this rank's next `num_draws` draws come from each source, keyed by name; does not advance."""
        if num_draws < 0:
            raise ValueError(f"num_draws must be >= 0, got {num_draws}")
        start, step = self._position, self.world_size
        stop = start + step * num_draws  # exclusive bound on the positions taken
        if step == 1 or num_draws == 0:
            counts = self._counts_between(start, stop)
        else:
            counts = np.zeros(len(self.sizes), dtype=np.int64)
            for b in range(start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1):
                lo = max(start, b * BLOCK_SIZE)
                lo += (start - lo) % step  # first position of this rank in the block
                hi = min(stop, (b + 1) * BLOCK_SIZE)
                if lo < hi:
                    taken = self._block_choices(b)[lo - b * BLOCK_SIZE : hi - b * BLOCK_SIZE : step]
                    counts += np.bincount(taken, minlength=len(self.sizes))
        return {name: int(c) for name, c in zip(self.names, counts, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: scheme, this rank's global position, rank layout and the mixture it belongs to."""
        return {
            "scheme": SCHEME,
            "position": self._position,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "weights": list(self.weights),
            "caps": list(self.caps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; raises ValueError if it belongs to another stream or rank."""
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; expected a dict from MixtureSampler.state_dict()")
        if state["scheme"] != SCHEME:
            raise ValueError(f"state uses scheme {state['scheme']!r} but this sampler implements {SCHEME!r}")
        mine = self.state_dict()
        for key in ("seed", "sizes", "weights", "caps"):
            saved = list(state[key]) if isinstance(mine[key], list) else state[key]
            if saved != mine[key]:
                raise ValueError(
                    f"state was saved with {key}={state[key]} but this sampler has {key}={mine[key]}; "
                    "a state only resumes the stream it was saved from"
                )
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"state was saved by rank {state['rank']} of world_size {state['world_size']} but this sampler is "
                f"rank {self.rank} of {self.world_size}; load each rank's own state"
            )
        position = state["position"]
        if not isinstance(position, int) or position < self.rank or (position - self.rank) % self.world_size:
            raise ValueError(
                f"state position {position!r} is not a position of rank {self.rank} of {self.world_size} "
                f"(expected rank + k * world_size, k >= 0)"
            )
        self._position = position
        self._consumed = self._counts_between(0, position)

    # ------------------------------------------------------------------------------------------------ internals

    def _rng(self, kind: int, a: int, b: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, kind, a, b])

    def _draw_block_counts(self, rng: np.random.Generator) -> npt.NDArray[np.int64]:
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        counts[self._active] = rng.multinomial(BLOCK_SIZE, self._active_p)
        return counts

    def _block_choices(self, block: int) -> npt.NDArray[np.int64]:
        """Source of each of the block's BLOCK_SIZE global positions, (BLOCK_SIZE,); the last block is cached."""
        if block != self._block_index:
            rng = self._rng(_CHOICES, block)
            counts = self._draw_block_counts(rng)
            choices = np.repeat(np.arange(len(self.sizes), dtype=np.int64), counts)
            rng.shuffle(choices)
            self._block_index, self._block = block, choices
        return self._block

    def _counts_between(self, start: int, stop: int) -> npt.NDArray[np.int64]:
        """Draws per source among global positions [start, stop): whole blocks by their counts alone."""
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        if stop <= start:
            return counts
        for b in range(start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1):
            lo = max(start, b * BLOCK_SIZE) - b * BLOCK_SIZE
            hi = min(stop, (b + 1) * BLOCK_SIZE) - b * BLOCK_SIZE
            if lo == 0 and hi == BLOCK_SIZE:
                counts += self._draw_block_counts(self._rng(_CHOICES, b))
            else:
                counts += np.bincount(self._block_choices(b)[lo:hi], minlength=len(self.sizes))
        return counts

    def _capped_subset(self, source: int) -> npt.NDArray[np.int64]:
        """Sorted record indices a capped finite source may use: a prefix of a permutation seeded by (seed, source)."""
        size, cap = self.sizes[source], self.caps[source]
        assert size is not None and cap is not None
        return np.sort(self._rng(_SUBSET, source).permutation(size)[:cap])

    def _record(self, source: int, cursor: int) -> int:
        """Record index served by `source`'s `cursor`-th draw overall."""
        usable = self._usable[source]
        if self.sizes[source] is None:
            return cursor if usable is None else cursor % usable
        assert usable is not None
        epoch, offset = divmod(cursor, usable)
        cached = self._epoch_perms.get(source)
        if cached is None or cached[0] != epoch:
            order = self._rng(_EPOCH, source, epoch).permutation(usable)
            subset = self._subsets.get(source)
            cached = (epoch, order if subset is None else subset[order])
            self._epoch_perms[source] = cached
        return int(cached[1][offset])


__all__ = ["BLOCK_SIZE", "SCHEME", "MixtureSampler"]
