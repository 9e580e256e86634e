"""Batch statistics: local moments and the count-weighted cross-device merge.

Local statistics are kept as ``(count, mean, M2)`` per feature, where ``M2`` is
the sum of squared deviations from the mean. Devices are merged with Chan et
al.'s pairwise formula, which is exact for unequal counts and never subtracts
two large sums::

    N    = sum_d n_d
    mean = sum_d n_d * mean_d / N
    M2   = sum_d M2_d + sum_d n_d * |mean_d - mean|^2
    var  = M2 / N

The merge needs every device's triple, gathered with a single ``psum`` (each
device writes its triple into its own slot of a zero buffer). That is one
collective per call whatever the axis names or groups, and it works under
``pmap``, ``vmap`` (nested, tuple names), ``shard_map`` alike.

Where ``|mean| >> std`` the term ``mean_d - mean`` is the difference of two
nearly equal numbers, and a mean rounded to its dtype (an error of up to
``ulp(|mean|) / 2``) would spoil it. Each device therefore sends its mean as
two parts, the shift ``c_d`` its sums were centered on and the small
correction ``mean_d - c_d``, and the merge takes the differences relative to
one device's shift: ``c_d - c_ref`` is exact in floating point when the two
are within a factor 2 of each other (Sterbenz), which they are when
``|mean| >> std``.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks


class Moments(NamedTuple):
    """Per-feature batch statistics.

    Attributes:
      mean: the batch mean, one value per feature.
      var: the biased batch variance ``M2 / count`` (real, even for complex input).
      count: the number of (unmasked) elements reduced per feature, after any
        cross-device merge; float, at least float32 (half precision cannot count
        past 65504, nor exactly past 2048 or, for bfloat16, 256).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def inverse_count(n: jax.Array) -> jax.Array:
    """``1 / n``, and 0 where nothing was counted (an empty or masked-out batch)."""
    return jnp.where(n > 0, 1 / jnp.maximum(n, 1), 0).astype(n.dtype)


def count_dtype(dtype: Any) -> Any:
    """The dtype counts are kept in for statistics of ``dtype``: its real dtype, at least float32."""
    rdtype = _checks.real_dtype(dtype)
    return rdtype if rdtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def per_count(v: jax.Array, n: jax.Array) -> jax.Array:
    """``v / n`` (0 where n is 0) in ``v``'s dtype, computed in at least ``n``'s precision.

    Counts are at least float32 (:func:`count_dtype`); ``1 / n`` in float16 is
    subnormal, and so loses bits, beyond 16384 elements.
    """
    wide = _checks.result_dtype(v, n)
    return (v.astype(wide) * inverse_count(n).astype(wide)).astype(v.dtype)


def abs_sq(x: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


#: Inputs with at most this many features (as the trailing axes) are reduced
#: as a wider matrix (see :class:`View`).
NARROW = 16

#: Rows of that matrix are made at least this many elements wide.
MIN_ROW_WIDTH = 64

#: Rows summed per block by :func:`paired_sums` on CPU (XLA:CPU's own reductions
#: split rows into blocks of this size too; 8 is the smallest block used).
ROW_BLOCK = 32

#: Rows summed per block at most, where a block that size tiles the W runs, when
#: the operands are cast on the fly (half precision summed in float32; see
#: :func:`_row_block`): XLA:CPU emits the backward's blocked reduce of
#: ``dy`` and ``dy * x``, both cast from bfloat16, as scalar code for blocks of
#: 25 to 32 rows (float16: 30 to 32), and that of ``dy`` and ``dy * (x - mean)``
#: from 23 rows. bfloat16 fwd+bwd of (128, 28, 28, 32) took 2.45 ms in blocks
#: of 28, 1.53 ms in blocks of 14; blocks of at most 16 measured as fast as
#: blocks of up to 24 on the benchmark's shapes.
CAST_ROW_BLOCK = 16

#: Rows of at least this many elements (the kept dimensions) are summed in
#: blocks of at most :data:`WIDE_ROW_BLOCK` rows where such a block tiles: the
#: fwd+bwd of a float32 (512, 1024) took 0.82-0.90x the time of blocks of 32,
#: (256, 2048) 0.84-0.88x, (4096, 512) 0.93-0.96x, (32, 128, 512) and
#: (64, 7, 7, 512) 0.95-0.98x (two runs); rows of 256 or fewer elements gained
#: nothing ((64, 8, 8, 16), seen as rows of 64, took 1.10x).
WIDE_ROW = 512
WIDE_ROW_BLOCK = 16

#: Blocks of masked sums, ``(top, largest)`` rows (see :func:`_row_block`'s
#: ``limit``): blocks that tile W of at most ``largest`` rows, preferring those
#: of at most ``top``. A mask's select (and in the backward the finiteness test
#: of x) make XLA:CPU compile smaller blocks to scalar code than without one (a
#: sweep of 232 shapes x 3 dtypes): the masked statistics (3 sums) from 23 rows
#: in bfloat16, 25 in float16, 31 in float32; the backward's masked sums from
#: 17-19 rows in half precision (16 for the centered sums of a bfloat16 (64, 24,
#: 24, 6) or (4096, 512)), and in float32 from 21 rows, from 19 with the
#: exponent-bit finiteness test. Masked sums take no larger block at any size
#: (their plain sums, above :data:`PAIRED_MAX_SIZE` too, read materialized
#: selects): blocks that cross W instead, else the plain sums. fwd+bwd of a
#: masked bfloat16 (32, 17, 17, 64): 0.68 ms in scalar-code blocks of 17,
#: 0.44-0.48 ms in blocks of 16 or 8 that cross W; float32 (64, 31, 31, 64),
#: above 2M elements, 1.09x flax's time in blocks of 31, 0.73x in blocks that
#: cross W; float32 (8, 31, 31, 16), whose rows have no other divisor in [8,
#: 32], 33-42% faster with the plain sums than in blocks of 31.
MASKED_BLOCKS = (16, 16)
#: The backward's masked sums of half-precision operands (cast on the fly).
MASKED_CAST_BLOCKS = (12, 14)

#: The largest block of operands cast on the fly that XLA:CPU still compiles to
#: vector code in every pair of sums (see :data:`CAST_ROW_BLOCK`); larger ones
#: are taken only above :data:`PAIRED_MAX_SIZE`, where the alternative, the plain
#: sums, reads float32 copies of the input.
CAST_VECTOR_BLOCK = 22


class View(NamedTuple):
    """How the reductions see an array: a reshape (free) that makes narrow features cheap.

    When there are at most :data:`NARROW` features and they are the trailing
    axes (channels-last), an input of shape ``(*batch, *features)`` is reduced
    as a matrix ``(rows, k * C)`` with ``C`` features: each row holds ``k``
    consecutive positions of every feature, so a feature is spread over ``k``
    columns and rows are at least :data:`MIN_ROW_WIDTH` wide. XLA:CPU reduces a
    minor dimension of 3 to 12 elements 1.5-2x slower than a wide one (the
    whole fwd+bwd on (64, 24, 24, C), C = 3..12, measured 1.47-1.96x faster
    with the view). The columns' sums are folded per feature before the
    statistics are formed, all columns of a feature centered on one value, so
    nothing is lost (no per-column mean is rounded). Only reductions use the view:
    elementwise work stays in the input's own layout (computing y in the view
    cost the LeNet step about 0.1 ms).

    Every other input keeps its own shape here (``k == 1``; on CPU,
    :func:`paired_sums` still reduces it in row blocks, a free reshape of
    the leading axes). From 16 features on, native reductions are as fast
    (C = 16) or faster (C = 24, 32: by 11-16%), and a reshape has a cost in
    networks: when BN's input is produced by an elementwise op (BN -> relu ->
    BN, a residual sum), the reshape lets XLA fuse that producer into every
    consumer on both sides of it, and in a chain of BN -> relu layers each
    layer recomputed all the layers before it (4 layers of (128, 28, 28, 32)
    took 50 ms against flax's 15 ms). Narrow inputs paid that in such chains
    (4 layers of (64, 24, 24, 6): 1.2-1.4x flax's time) until their
    statistics became one blocked reduce per pair of sums
    (:func:`paired_sums`): 0.84-0.94x then, 0.89-1.13x in the full runs of
    2026-11-29 and 2026-12-03, where XLA still recomputes the earlier layers
    inside the reductions' kernels (BENCHMARKS.md).
    With a convolution or a dense layer between BNs, as in LeNet and ResNets,
    there is no such chain. Explicitly sharded arrays keep their shape too.

    Attributes:
      shape: the shape of the view.
      red: its reduction axes.
      k: columns per feature (1 when not viewed as a matrix).
      fshape: the feature shape.
      run: with ``k > 1``, the input's reduced dimensions (``(N, H, W)`` of
        ``(N, H, W, C)``), whose runs the row blocks of :func:`paired_sums`
        must tile (see :func:`_row_block`); None otherwise.
    """

    shape: tuple[int, ...]
    red: tuple[int, ...]
    k: int
    fshape: tuple[int, ...]
    run: tuple[int, ...] | None = None

    @property
    def column_size(self) -> int:
        """Elements reduced per column."""
        return math.prod(self.shape[i] for i in self.red)

    @property
    def count(self) -> int:
        """Elements reduced per feature (all its columns)."""
        return self.column_size * self.k

    @property
    def runs(self) -> tuple[tuple[int, ...], int] | None:
        """``(run, k)`` for :func:`paired_sums` (None when the rows are the input's own)."""
        return None if self.run is None else (self.run, self.k)

    def of(self, x: jax.Array) -> jax.Array:
        """``x`` (input shape) seen through the view."""
        return x.reshape(self.shape)

    def bcast(self, v: jax.Array) -> jax.Array:
        """A per-feature vector, broadcastable against the view."""
        if self.k > 1:
            return jnp.tile(v.reshape(-1), self.k)[None, :]
        return jnp.expand_dims(v, self.red)

    def columns(self, c: jax.Array) -> jax.Array:
        """Per-column values (view shape without ``red``) as ``(k, *fshape)``."""
        return c.reshape((self.k,) + self.fshape)

    def fold_sum(self, c: jax.Array) -> jax.Array:
        """Per-column sums to per-feature sums."""
        c = self.columns(c)
        return c[0] if self.k == 1 else jnp.sum(c, axis=0)


def _row_multiple(rows: int, width: int, dims: tuple[int, ...] | None = None, top: int = ROW_BLOCK) -> int:
    """k >= 1 dividing ``rows`` so that ``k * width`` reaches MIN_ROW_WIDTH, if one is near (1 unless width <= NARROW).

    ``dims``: the reduced dimensions (``(N, H, W)``). Among the k near the
    target, one whose rows and row blocks tile the W runs is preferred (see
    :func:`_row_block`): a float32 (64, 14, 14, 16) seen as rows of 4
    positions (W = 14) had its statistics compiled to scalar code, 0.41 ms
    against 0.08 ms with rows of 7, and the whole fwd+bwd took 1.9-2.4x
    flax's time. ``top``: the preferred largest block (see :func:`_row_block`).
    """
    if width > NARROW or rows <= 1:
        return 1
    target = -(-MIN_ROW_WIDTH // width)
    near = [k for k in range(target, min(4 * target, rows) + 1) if rows % k == 0]
    near += [k for k in range(min(target, rows), 1, -1) if rows % k == 0 and k not in near]
    if not near:
        return 1
    if dims is None or len(dims) < 2:
        return near[0]

    def rank(k):
        """0-3: blocks that tile every run, then blocks that tile W, of at most ``top`` rows first; 4: none."""
        every, first = _tiling_blocks(rows // k, dims, k, top)
        kinds = ((every, True), (first, True), (every, False), (first, False))
        return next((i for i, (blocks, capped) in enumerate(kinds) if blocks and (blocks[0] <= top or not capped)), 4)

    return min(near, key=rank)  # the first of the best


def static_shape(shape: tuple[Any, ...]) -> bool:
    """True when every dimension is a plain int (not a jax.export symbolic dimension)."""
    return all(isinstance(d, numbers.Integral) for d in shape)


def _sharded(x: Any, axes: tuple[int, ...] | None = None) -> bool:
    """True when one of ``axes`` (default: any axis) of x is explicitly sharded (jax's sharding-in-types)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError):
        return False
    axes = range(len(spec)) if axes is None else axes
    return any(i < len(spec) and spec[i] is not None for i in axes)


def view(x: Any, red: tuple[int, ...]) -> View:
    """The :class:`View` of ``x`` (an array, or just its shape) reduced over ``red``.

    Arrays with an explicit sharding keep their shape (k == 1, no reshape):
    merging a sharded axis with others is not a free reshape. An array summed
    in a wider dtype (half precision) prefers blocks of at most
    :data:`CAST_ROW_BLOCK` rows.
    """
    shape = tuple(x) if isinstance(x, tuple) else tuple(x.shape)
    cast = not isinstance(x, tuple) and _checks.stats_dtype(x.dtype) != x.dtype
    nred = len(red)
    fshape = tuple(d for i, d in enumerate(shape) if i not in red)
    plain = (isinstance(x, tuple) or not _sharded(x)) and static_shape(shape)
    if plain and nred and nred < len(shape) and tuple(red) == tuple(range(nred)) and math.prod(shape):
        m, c = math.prod(shape[:nred]), math.prod(fshape)
        k = _row_multiple(m, c, shape[:nred], CAST_ROW_BLOCK if cast else ROW_BLOCK)
        if k > 1:
            return View((m // k, k * c), (0,), k, fshape, shape[:nred])
    return View(shape, tuple(red), 1, fshape)


def _first_row(xv: jax.Array, red: tuple[int, ...]) -> jax.Array:
    """xv at index 0 of every reduction axis (keepdims): a cheap shift close to the mean."""
    idx = tuple(slice(0, 1) if i in red else slice(None) for i in range(xv.ndim))
    return xv[idx]


#: The one-pass sums are used as they are while ``|mean|^2 <= WELL_CONDITIONED * var``
#: for every column: their variance then carries at most ``1 + WELL_CONDITIONED``
#: times the rounding error of a sum of squared deviations, which is what the
#: shifted formula carries when its shift lies 3 standard deviations from the mean.
WELL_CONDITIONED = 8.0


#: :func:`paired_sums` reduces operands of at most this many elements in blocks.
PAIRED_MAX_SIZE = 2**21


def _row_block(
    shape: tuple[int, ...],
    nred: int,
    run: tuple[tuple[int, ...], int] | None = None,
    *,
    strict: bool = False,
    top: int = ROW_BLOCK,
    cast: bool = False,
    limit: tuple[int, int] | None = None,
) -> int | None:
    """Rows per block for an input of ``shape`` reduced over its ``nred`` leading axes.

    The largest ``b`` in [8, ROW_BLOCK] dividing the row count such that the
    blocks tile the runs of the last reduced axis (W of ``(N, H, W, C)``):
    ``b`` divides W or is a multiple of it; only when there is none (and not
    ``strict``), the largest divisor of the row count. XLA:CPU emits the
    blocked reduce with a division per element and no vector code when blocks
    cross the ends of W runs at offsets it cannot simplify: blocks of 32 rows
    over (8, 56, 56, 64) took 1.50 ms against 0.43 ms with blocks of 28, and
    21 of 119 conv shapes up to 2M elements (N 8-128, H = W 7-56, C 32-256)
    compiled that way with the largest divisor of the row count; none of 235
    conv and sequence shapes (W or L from 4 to 500) does with this rule
    (``tests/test_ops.py::test_paired_sums_compile_to_vector_code``).

    ``run = (dims, k)`` gives the input's reduced dimensions for a
    :class:`View` whose rows hold ``k`` positions each: a block of ``b``
    rows then spans ``b * k`` positions, which must divide W or be a
    multiple of it (the fwd+bwd of a float32 (8, 112, 112, 8) took 1.86-2.28
    ms in blocks of 32 rows, 256 positions, against 0.34-0.41 ms in blocks
    of 28; the statistics of a bfloat16 (8, 224, 224, 8), cast on the fly,
    1.3-1.5 ms against 0.26-0.27 ms). Blocks that tile every run, H * W too,
    are preferred: blocks of 224 positions crossed the 784 of each image of
    a float32 (16, 28, 28, 8), whose fwd+bwd took 1.72x flax's time, 0.75x
    in blocks of 112; (64, 24, 24, 4) 1.54x, 0.53x in blocks of 288 positions
    instead of 384. ``strict`` (the blocked sums of inputs above
    :data:`PAIRED_MAX_SIZE`, which have the plain sums to fall back on)
    takes only those, and gives None where there is none (a bfloat16 (512,
    28, 28, 8) in blocks of 224 positions: fwd+bwd 6.2 ms, 1.3 ms in blocks
    of 112). ``top``: the preferred largest block (:data:`CAST_ROW_BLOCK` for
    operands cast on the fly); larger blocks that tile are taken only where
    none of at most ``top`` rows does (a bfloat16 (128, 17, 17, 64) in blocks
    of 17: fwd+bwd 1.2-1.6 ms, 2.1-2.7 ms with the plain sums), and for
    operands cast on the fly (``cast``) only up to :data:`CAST_VECTOR_BLOCK`
    rows unless ``strict``
    (bfloat16 (32, 31, 31, 32) in scalar-code blocks of 31: 0.70 ms, in
    vector-code blocks of 16 that cross W: 0.46 ms; (128, 31, 31, 32), above
    2M elements, 3.7 ms in blocks of 31, 4.1 ms with the plain sums).
    ``limit = (top, largest)``: a hard limit instead, at any size (masked sums,
    see :data:`MASKED_BLOCKS`): blocks that tile of at most ``largest`` rows,
    else blocks of at most ``top`` that cross W, else None.
    """
    rows = math.prod(shape[:nred])
    dims, k = run if run is not None else (shape[:nred], 1)
    if limit is not None:
        top, largest = limit
    every, first = _tiling_blocks(rows, dims, k, top)
    if limit is not None:
        return next((b for b in every + first + _divisors(rows, top) if b <= (largest if b in first else top)), None)
    if strict:
        return next(iter(every), None)
    if cast:
        every, first = ([b for b in blocks if b <= CAST_VECTOR_BLOCK] for blocks in (every, first))
    return next(iter(every + first + _divisors(rows, top)), None)


def _tiling_blocks(rows: int, dims: tuple[int, ...], k: int, top: int = ROW_BLOCK) -> tuple[list[int], list[int]]:
    """Blocks (rows in [8, ROW_BLOCK] dividing ``rows``) for rows of ``k`` positions of ``dims``.

    Returns those whose blocks tile every run of the reduced dimensions (W,
    H * W, ...), and those whose blocks tile the W runs, each in order of
    preference (:func:`_divisors`). Both are empty when a row itself
    crosses the ends of W runs (k neither divides W nor is a multiple of
    it): XLA:CPU then compiled every block size to scalar code (3,187
    float32 (N, H, W, C) cases, C <= 16: none of the 1,491 whose rows and
    blocks tile W had a division per element; 654 of the others did).
    """
    # The runs of the last reduced axis, of the last two, ... (W, H * W, ...).
    runs = [math.prod(dims[i:]) for i in range(len(dims) - 1, 0, -1)] or [rows * k]
    if not _tiles(k, runs[0]):
        return [], []
    divisors = _divisors(rows, top)
    every = [b for b in divisors if all(_tiles(b * k, r) for r in runs)]
    return every, [b for b in divisors if _tiles(b * k, runs[0])]


def _divisors(rows: int, top: int) -> list[int]:
    """Blocks in [8, ROW_BLOCK] dividing ``rows`` in order of preference: at most ``top`` rows, largest
    first, then larger ones, smallest first."""
    blocks = [b for b in range(8, ROW_BLOCK + 1) if rows % b == 0]
    return [b for b in reversed(blocks) if b <= top] + [b for b in blocks if b > top]


def _tiles(a: int, r: int) -> bool:
    """``a`` consecutive positions tile runs of ``r``: one divides the other."""
    return a % r == 0 or r % a == 0


def _sums(ops, red):
    return tuple(jnp.sum(t, axis=red) for t in ops)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _blocked_sums(ops, red, cast=False, any_size=False, run=None, limit=None):
    """:func:`blocked_sums` as one variadic reduce over blocks of rows, then the sums of the block totals."""
    p = ops[0]
    nred = len(red)
    leading = 0 < nred < p.ndim and tuple(red) == tuple(range(nred))
    if not (leading and static_shape(p.shape)) or p.size == 0 or any(t.shape != p.shape or t.dtype != p.dtype or _sharded(t) for t in ops):
        return _sums(ops, red)
    large = p.size > PAIRED_MAX_SIZE
    kept = p.shape[nred:]
    top = CAST_ROW_BLOCK if cast else WIDE_ROW_BLOCK if math.prod(kept) >= WIDE_ROW else ROW_BLOCK
    if limit is not None:
        b = _row_block(p.shape, nred, run, limit=limit)
    elif large and not (any_size or cast):
        b = None
    else:
        b = _row_block(p.shape, nred, run, strict=large, top=top, cast=cast)
    if b is None:
        return _sums(ops, red)
    rows = math.prod(p.shape[:nred])
    shape = (rows // b, b) + kept
    blocks = lax.reduce(
        tuple(t.reshape(shape) for t in ops),
        tuple(jnp.zeros((), t.dtype) for t in ops),
        lambda u, v: tuple(a + b for a, b in zip(u, v)),
        (1,),
    )
    return tuple(jnp.sum(t, axis=0) for t in blocks)


@_blocked_sums.defjvp
def _blocked_sums_jvp(red, cast, any_size, run, limit, primals, tangents):
    """The sums are linear: their tangents are the plain sums of the operands' tangents.

    (JAX's JVP of a variadic ``lax.reduce`` fails on a symbolic-zero tangent,
    such as that of a constant dy in a forward-over-reverse second derivative.)
    """
    return _blocked_sums(*primals, red, cast, any_size, run, limit), _sums(*tangents, red)


def blocked_sums(
    ops: tuple[jax.Array, ...],
    red: tuple[int, ...],
    *,
    cast: bool = False,
    any_size: bool = False,
    run: tuple[tuple[int, ...], int] | None = None,
    limit: tuple[int, int] | None = None,
) -> tuple[jax.Array, ...]:
    """The sums over ``red`` of every operand of ``ops`` (of one shape), in one read of their inputs on CPU.

    See :func:`paired_sums`, which this generalizes to any number of sums.
    ``limit``: ``(preferred, largest)`` rows per block, a hard limit at any size
    (masked sums, see :data:`MASKED_BLOCKS`).
    """
    return lax.platform_dependent(
        *ops, cpu=lambda *ops: _blocked_sums(ops, red, cast, any_size, run, limit), default=lambda *ops: _sums(ops, red))


def paired_sums(
    p: jax.Array,
    q: jax.Array,
    red: tuple[int, ...],
    *,
    cast: bool = False,
    any_size: bool = False,
    run: tuple[tuple[int, ...], int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sum(p), sum(q))`` over ``red``, reading the operands of ``p`` and ``q`` once.

    XLA:CPU gives every reduction its own kernel and, without its YNNPACK
    fusions, does not fuse an elementwise operand such as ``x * x`` into it:
    ``sum(x)`` and ``sum(x * x)`` read x twice and write and read ``x * x``.
    On CPU the two sums are one variadic ``lax.reduce`` over blocks of 8 to
    :data:`ROW_BLOCK` rows (:func:`_row_block`; a multi-output reduction that
    computes both operands on the fly, partitioned over the blocks), followed
    by the sums of the block totals, which are as accurate as XLA's own
    blocked reductions. Measured on (3072, 72) float32 (LeNet's first BN): 133
    against 224 us without YNNPACK, 105 against 151 us with it. Above
    :data:`PAIRED_MAX_SIZE` elements, the statistics of uncast inputs keep
    YNNPACK's two reductions (XLA's default), whose kernels take no producer: the blocked
    sums of x made a single BN's fwd+bwd 2-6% faster there, but 4 layers of
    BN -> relu in a row 1.3-1.5x slower, as XLA fused each layer's output
    into the next layer's blocked reduce and stopped writing it, recomputing
    it in every consumer (BENCHMARKS.md). ``any_size=True`` takes the blocked
    sums above it too, where blocks of at most :data:`ROW_BLOCK` rows tile
    every run of the input (:func:`_row_block`'s ``strict``; otherwise the
    plain sums): the backward's sums of dy and dy * x, whose operands are
    written anyway (dy for dx, x for the next layer), read dy once instead of
    twice, and the fwd+bwd makes 9 passes instead of 10 (0.90-0.98x the time
    on 8 shapes of 3-8M elements, 4 layers of BN -> relu 0.95-1.00x, session
    22; BENCHMARKS.md, "The backward's sums above 2M elements in one
    kernel"). ``cast=True``, for operands computed from a
    cast (half precision summed in float32), implies it and prefers smaller
    blocks (:data:`CAST_ROW_BLOCK`): the blocked reduce reads the narrow
    input and casts on the fly, while YNNPACK's reductions read a
    materialized float32 copy (bfloat16 (32, 56, 56, 64), whole fwd+bwd:
    5.49 against 7.56 ms; (128, 28, 28, 32): 2.29 against 3.36 ms).
    ``run``: ``(View.run, View.k)`` of a viewed input (:attr:`View.runs`).
    Other platforms, reductions that are not over the leading axes, row counts
    without a divisor in [8, 32] and explicitly sharded arrays (whose reshape is not
    free) use two plain sums.
    """
    return blocked_sums((p, q), red, cast=cast, any_size=any_size, run=run)


def _plain_sums(xv, v: View, cast: bool = False, valid=None):
    """One read of x for both sums, per feature: ``(mean, E[x^2] - E[x]^2 scaled to M2, sum(|x|^2), count)``.

    ``cast``: xv is a cast of the input (see :func:`paired_sums`).
    ``valid``: the mask, seen through ``v``: only those elements are summed
    (masked-out ones may be NaN or inf padding), and counted in the same reduce,
    in blocks of :data:`MASKED_BLOCKS` whether cast or not.
    """
    if valid is None:
        s1, s2 = paired_sums(xv, abs_sq(xv), v.red, cast=cast, run=v.runs)
        s1, s2 = v.fold_sum(s1), v.fold_sum(s2)
        n = v.count
        mean = s1 / n
        return mean, jnp.maximum(s2 - n * abs_sq(mean), 0), s2, n
    xs = jnp.where(valid, xv, 0)
    ops = (xs, abs_sq(xs), valid.astype(count_dtype(xv.dtype)))
    s1, s2, n = map(v.fold_sum, blocked_sums(ops, v.red, run=v.runs, limit=MASKED_BLOCKS))
    mean = per_count(s1, n)
    return mean, jnp.maximum(s2 - n.astype(s2.dtype) * abs_sq(mean), 0), s2, n


def _centered_sums(xv, v: View, c, cast: bool = False, cb=None, valid=None, n=None):
    """Per-feature ``(c, mean - c, M2)`` from the sums of ``x - c``, ``c`` one value per feature.

    The mean is returned in two parts (the shift and the small correction), so
    that a cross-device merge can difference means without their rounding (see
    the module docstring).

    Every column of a feature is centered on the same ``c`` and the sums are
    folded before the statistics are formed, so nothing is rounded to a
    per-column mean (whose rounding, ``ulp(|mean|)``, would enter the merged
    variance where ``|mean| >> std``). The two sums must not share a full-size
    intermediate (not even the broadcast ``c``): a shared one is materialized,
    costing a write and two reads. Hence ``x - c`` in one and ``x + (-c)``
    (equal bit for bit) in the other.

    ``cb``: ``v.bcast(c)`` computed by the caller (see :func:`_checked_moments`).
    ``valid``, ``n``: the mask and the count per feature (see :func:`_plain_sums`).
    """
    cb = v.bcast(c) if cb is None else cb
    if valid is None:
        r, q = paired_sums(xv - cb, abs_sq(xv + (-cb)), v.red, cast=cast, run=v.runs)
    else:  # selected before squaring: a masked-out NaN must not reach a derivative (2 * NaN * 0)
        r, q = jnp.where(valid, xv - cb, 0), abs_sq(jnp.where(valid, xv + (-cb), 0))
        r, q = blocked_sums((r, q), v.red, run=v.runs, limit=MASKED_BLOCKS)
    r, q = v.fold_sum(r), v.fold_sum(q)
    if valid is None:
        n = v.count
        return c, r / n, jnp.maximum(q - abs_sq(r) / n, 0)
    return c, per_count(r, n), jnp.maximum(q - per_count(abs_sq(r), n), 0)


def _shifted_moments(x, *, v: View, dtype: Any = None):
    """``(K, mean - K, M2)`` from data shifted by a first element K of each feature.

    ``sum(x-K)`` and ``sum(|x-K|^2)`` each need one read of x and the
    cancellation error is ``eps * |K-mean|^2 / var`` instead of
    ``eps * mean^2 / var``. ``x`` is seen through ``v``; the sums are taken in
    ``dtype`` (default: at least float32).
    """
    xv = x.astype(_checks.stats_dtype(x.dtype) if dtype is None else dtype)
    first = _first_row(xv, v.red)
    k = first.reshape(-1)[: math.prod(v.fshape)].reshape(v.fshape) if v.k > 1 else jnp.squeeze(first, v.red)
    return _centered_sums(xv, v, k, cast=xv.dtype != x.dtype)


def mask_view(mask, shape: tuple[int, ...], v: View) -> jax.Array:
    """A mask (broadcastable to ``shape``, nonzero = kept) as booleans of the input's shape, seen through ``v``."""
    return v.of(jnp.broadcast_to(jnp.asarray(mask, bool), shape))


def _checked_moments(x, mask=None, *, v: View, dtype: Any = None, shape: tuple[int, ...] | None = None):
    """``(mean, 0, M2)`` from the plain sums, redone in two passes only where they would lose accuracy.

    XLA:CPU reduces ``x`` at full memory speed but ``x - K`` (any broadcast
    operand) at half of it, so on CPU the shifted sums cost twice the plain
    ones. The plain sums are exact enough when every feature has
    ``|mean|^2 <= WELL_CONDITIONED * var`` (``sum|x|^2`` then exceeds ``M2``
    at most ``1 + WELL_CONDITIONED`` times); otherwise (a large offset, constant
    data, a NaN) a ``lax.cond`` computes ``sum(x - mean)`` and
    ``sum(|x - mean|^2)`` from the one-pass mean, which is exact to the
    rounding of the data (returned as ``(c, mean - c, M2)``, ``c`` the one-pass
    mean). The branch not taken costs nothing at run time.

    ``x`` (seen through ``v``) is cast to ``dtype`` (default: at least
    float32) inside each branch, never before: an operand of a ``lax.cond`` is
    materialized, so a cast one would be a full-size float32 copy of a
    half-precision input, written on every call. With a ``mask`` (the user's,
    broadcastable to the input's ``shape``) only its elements are summed, and
    counted (``(n, c, mean - c, M2)`` is returned); it too enters the branches
    as it is, and is broadcast inside.
    """
    dtype = _checks.stats_dtype(x.dtype) if dtype is None else dtype
    cast = x.dtype != dtype

    def valid():  # the mask, of the input's shape (the view's without one)
        return None if mask is None else mask_view(mask, v.shape if shape is None else shape, v)

    mean, m2, s2, n = _plain_sums(x.astype(dtype), v, cast, valid())
    ok = jnp.all(s2 <= (1 + WELL_CONDITIONED) * m2)
    # The shift enters the branch already broadcast to the view's columns (a cond's
    # operand is materialized): tiled inside it, the centered sums of a View were
    # scalar code (an index modulo C per element).
    moments = lax.cond(ok, lambda mean, m2, cb: (mean, jnp.zeros_like(mean), m2),
                       lambda mean, m2, cb: _centered_sums(x.astype(dtype), v, mean, cast, cb, valid(), n),
                       mean, m2, v.bcast(mean))
    return moments if mask is None else (n, *moments)


def _masked_moments(x, mask, *, v: View, dtype: Any, shape: tuple[int, ...]):
    """``(n, c, mean - c, M2)`` of the masked elements in two passes, the mean first (other platforms):
    no masked-out value can act as a shift."""
    valid = mask_view(mask, shape, v)
    xv = x.astype(dtype)
    n = v.fold_sum(jnp.sum(valid, axis=v.red, dtype=count_dtype(dtype)))
    mean = per_count(v.fold_sum(jnp.sum(jnp.where(valid, xv, 0), axis=v.red)), n)
    return (n, *_centered_sums(xv, v, mean, x.dtype != dtype, None, valid, n))


def local_moments(
    x: jax.Array,
    red: tuple[int, ...],
    *,
    mask: jax.Array | None,
    fast_variance: bool,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Returns this device's ``(count, c, mean - c, M2)``, reduced over ``red``.

    They are accumulated, and returned, in at least float32 whatever ``dtype``
    (as ``jnp.sum`` accumulates half precision: a float16 sum overflows past
    65504; and ``c`` rounded to float16 would no longer match ``mean - c``);
    :func:`compute_moments` casts the mean and variance to ``dtype`` at the end.

    The mean comes in two parts: ``c``, the value the sums were centered on
    (the mean itself where they were not), and the small correction
    ``mean - c``, unrounded to ``c``'s magnitude (see :func:`merge_moments`);
    the mean is ``c + (mean - c)``.

    The default reads x once per sum and stays exact whatever the offset of
    the data: on CPU the plain sums, checked and redone centered where they
    would cancel (:func:`_checked_moments`; with a mask, the sums and the
    count of the kept elements in one reduce); elsewhere sums of data shifted
    by a value near the mean (:func:`_shifted_moments`), or with a mask the
    mean first (two passes, :func:`_masked_moments`) so that no masked-out
    value can act as a shift; the sums of the :class:`View`'s columns are
    folded per feature. Without a mask, the mean is taken first too when a
    reduction axis is explicitly sharded (jax's explicit meshes cannot slice it).
    ``fast_variance=True`` is the plain one-pass ``E[x^2] - E[x]^2``.
    """
    dtype = _checks.stats_dtype(dtype)
    rdtype = _checks.real_dtype(dtype)
    cdtype = count_dtype(dtype)
    fshape = tuple(d for i, d in enumerate(x.shape) if i not in red)
    if static_shape(x.shape) and math.prod(x.shape[i] for i in red) == 0:
        zeros = jnp.zeros(fshape, dtype)
        return jnp.zeros(fshape, cdtype), zeros, zeros, jnp.zeros(fshape, rdtype)
    v = view(x, red)
    xv = v.of(x).astype(dtype)
    size = v.column_size

    if mask is None and not fast_variance and _sharded(x, red):
        # jax 0.10 explicit meshes cannot slice a sharded axis (no shift): two
        # passes (such arrays keep their shape: one column per feature).
        # Their reductions are global (jit), so there is no merge to feed a correction.
        mean = jnp.sum(xv, axis=v.red) / size
        m2 = jnp.sum(abs_sq(xv - jnp.expand_dims(mean, v.red)), axis=v.red)
        return jnp.full(fshape, size, cdtype), mean, jnp.zeros_like(mean), m2

    if mask is None:
        n = jnp.full(fshape, v.count, cdtype)
        if fast_variance:
            mean, m2, *_ = _plain_sums(xv, v, xv.dtype != x.dtype)
            return n, mean, jnp.zeros_like(mean), m2
        kernels = {"cpu": partial(_checked_moments, v=v, dtype=dtype), "default": partial(_shifted_moments, v=v, dtype=dtype)}
        c, d, m2 = lax.platform_dependent(v.of(x), **kernels)
        return n, c, d, m2

    # The count with the sums of the kept elements, checked as without a mask on
    # CPU; elsewhere the mean first, so that no masked-out value can act as a shift.
    if fast_variance:
        mean, m2, _, n = _plain_sums(xv, v, xv.dtype != x.dtype, mask_view(mask, x.shape, v))
        return n, mean, jnp.zeros_like(mean), m2
    kernels = {
        "cpu": partial(_checked_moments, v=v, dtype=dtype, shape=x.shape),
        "default": partial(_masked_moments, v=v, dtype=dtype, shape=x.shape),
    }
    return lax.platform_dependent(v.of(x), jnp.asarray(mask), **kernels)


def bound_axis_size(axis_name: Any) -> int:
    """The size of the mapped axis ``axis_name``; a NameError that names it where it is not bound."""
    try:
        return lax.axis_size(axis_name)
    except NameError as e:
        raise NameError(
            f"`axis_name`={axis_name!r} is not bound here ({e}): call inside jax.pmap, jax.vmap or "
            "shard_map over that axis, or pass axis_name=None (under jit with sharded inputs none is needed)."
        ) from e


def merge_moments(
    n: jax.Array,
    c: jax.Array,
    d: jax.Array,
    m2: jax.Array,
    axis_name: Any,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pools per-device ``(count, c + d, M2)`` over ``axis_name`` in one ``psum``; returns ``(count, mean, M2)``.

    Each device's mean arrives as ``c + d`` (:func:`local_moments`). The
    devices' means are differenced relative to a reference shift ``c_ref``
    (that of the device with the largest count): ``e_d = (c_d - c_ref) + d_d``,
    where ``c_d - c_ref`` is exact when the shifts are within a factor 2 of
    each other, as they are where ``|mean| >> std``. Then, with ``N = sum n_d``
    and ``e = sum n_d e_d / N``: ``mean = c_ref + e`` and
    ``M2 = sum M2_d + sum n_d |e_d - e|^2``.
    """
    complex_mean = jnp.iscomplexobj(c) or jnp.iscomplexobj(d)
    mean_dtype, m2_dtype = _checks.result_dtype(c, d), m2.dtype
    if complex_mean:
        c, d = c.astype(mean_dtype), d.astype(mean_dtype)
        parts = [n, lax.real(c), lax.imag(c), lax.real(d), lax.imag(d), m2]
    else:
        parts = [n, c, d, m2]
    # One buffer in the widest dtype (counts are at least float32, see count_dtype).
    wide = _checks.result_dtype(*parts)
    pack = jnp.stack([p.astype(wide) for p in parts])
    size = bound_axis_size(axis_name)
    _checks.check_groups(axis_index_groups, size)
    slots = jnp.zeros((size,) + pack.shape, pack.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, pack, lax.axis_index(axis_name), 0)
    try:
        allp = lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)
    except NotImplementedError as e:
        if axis_index_groups is None or str(e):
            raise
        raise NotImplementedError(
            "`axis_index_groups` is not supported by JAX's collectives here (shard_map has none; "
            "pmap does): give each group its own mesh axis and pool over that axis name instead."
        ) from e
    ns = allp[:, 0]
    if complex_mean:
        cs, ds = lax.complex(allp[:, 1], allp[:, 2]), lax.complex(allp[:, 3], allp[:, 4])
    else:
        cs, ds = allp[:, 1], allp[:, 2]
    m2s = allp[:, -1]
    # Under axis_index_groups every slot outside this device's group is zero
    # (count 0); the reference is a device of the group with the largest count.
    ref = jnp.take_along_axis(cs, jnp.argmax(ns, axis=0)[None], axis=0)[0]
    es = (cs - ref) + ds
    total = jnp.sum(ns, axis=0)
    e = per_count(jnp.sum(ns.astype(es.dtype) * es, axis=0), total)
    pooled_m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * abs_sq(es - e), axis=0)
    return total.astype(n.dtype), (ref + e).astype(mean_dtype), pooled_m2.astype(m2_dtype)


def compute_moments(
    x: jax.Array,
    red: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Moments:
    """Kernel behind :func:`moments` (arguments already validated)."""
    dtype = _checks.stats_dtype(x.dtype) if dtype is None else dtype
    n, c, d, m2 = local_moments(x, red, mask=mask, fast_variance=fast_variance, dtype=dtype)
    if axis_name is None:
        mean = c + d
    else:
        n, mean, m2 = merge_moments(n, c, d, m2, axis_name, axis_index_groups)
    return Moments(mean.astype(dtype), per_count(m2, n).astype(_checks.real_dtype(dtype)), n)


def moments(
    x: jax.Array,
    axis: _checks.Axes = -1,
    *,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
) -> Moments:
    """Per-feature mean, biased variance and element count of a batch.

    Statistics reduce over every axis of ``x`` except the feature axis or axes
    ``axis``; for conv activations ``(N, H, W, C)`` and ``axis=-1`` each channel
    reduces over ``N*H*W`` elements. Half-precision input accumulates in float32.

    The variance is accurate when ``|mean| >> std``: it is computed from data
    shifted by a value close to the mean (see :func:`local_moments`), not from
    ``E[x^2] - E[x]^2``, unless ``fast_variance=True`` asks for that.

    With ``axis_name`` (one name or a tuple of names; optional
    ``axis_index_groups``), every device's ``(count, mean, M2)`` is merged
    weighted by count in a single collective, so unequal per-device batches and
    masks give exactly the statistics of the pooled global batch.

    Args:
      x: floating-point (or complex) input.
      axis: the feature axis or axes (int or tuple; negative allowed).
      axis_name: mapped axis name(s) to pool statistics over.
      axis_index_groups: groups of device indices pooled separately (``pmap``).
      mask: boolean (or integer) array broadcastable to ``x``; True (nonzero) marks elements to use.
      fast_variance: use the one-pass ``E[x^2] - E[x]^2`` formula.

    Returns:
      ``Moments(mean, var, count)``, each of the feature shape.
    """
    _checks.check_input(x)
    features = _checks.feature_axes(x.ndim, axis)
    _checks.check_mask(mask, x.shape)
    red = _checks.reduction_axes(x.ndim, features)
    return compute_moments(
        x,
        red,
        mask=mask,
        fast_variance=fast_variance,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
