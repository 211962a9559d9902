"""The compact engine's numba kernels and the packed layout they read (`pack`).

Thresholds here are measured (bench/inference.py): a DNN layer runs as CSR (batches) or CSC (one sample) below
its density threshold; below SMALL_BATCH rows each sample runs the one-sample kernel; batches run in tiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Density thresholds below which a layer runs sparse, measured with `python bench/inference.py --sweep-density`
# (39 fields, DNN 400x3 at a given density, one thread; bench/out/inference_density.md): for batches, CSR
# (axpy over a sample tile) matches BLAS sgemm at ~0.4 density (0.32x the time at 0.10, 0.77x at 0.30, 1.2x at
# 0.50); for one sample, CSC skipping zero inputs matches a vectorised dense matvec at ~0.2 (0.44x at 0.10).
CSR_MAX_DENSITY = 0.4
CSC_MAX_DENSITY = 0.2
SMALL_BATCH = 8  # below this many rows, the one-sample kernel per row beats the tiled batch kernel (measured)
TILE = 256  # samples per tile: the gathered inputs (kept dims x TILE float32) stay in L2 for the first GEMM
PREFETCH = 8  # samples ahead whose rows are prefetched while gathering (hides DRAM latency of random rows)

# ---------------------------------------------------------------------------------------------------------------
# Packing for the numba kernels. A numba call costs ~0.2 us per array argument, so the kernels take just
# (ids, table, fb, ib[, out]): fb holds every float parameter but the table, ib every integer (int64 header and
# sections, then CSR/CSC indices as int32 read through ib.view(int32)).

# ib header slots
_F, _P, _PDIM, _NL, _NX, _MAXH, _FIELDS, _PAIRS, _LAYERS = range(9)
_HEADER = 9
_LSTRIDE = 12  # per layer: n_out, n_in, w_off, b_off, csr?, csr_ptr, csr_idx, csr_dat, csc?, csc_ptr, csc_idx, csc_dat


def pack(cm: Any) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(fb, ib, per-layer (batch format, one-sample format)); formats follow the thresholds at build time."""
    F, P, L = cm.n_fields, len(cm.pair_w), len(cm.layers)
    floats: list[np.ndarray] = [np.array([cm.bias], np.float32), cm.pair_w]
    fpos = 1 + P
    ints32: list[np.ndarray] = []
    i32pos = 0
    layer_desc = []
    formats: list[tuple[str, str]] = []

    def add_f(a: np.ndarray) -> int:
        nonlocal fpos
        floats.append(np.ascontiguousarray(a, np.float32).reshape(-1))
        fpos += a.size
        return fpos - a.size

    def add_i(a: np.ndarray) -> int:
        nonlocal i32pos
        ints32.append(np.ascontiguousarray(a, np.int32).reshape(-1))
        i32pos += a.size
        return i32pos - a.size

    for layer in cm.layers:
        W = layer.weight
        d = [W.shape[0], W.shape[1], add_f(W), add_f(layer.bias), 0, 0, 0, 0, 0, 0, 0, 0]
        dens = layer.density
        if dens <= CSR_MAX_DENSITY:
            r, c = np.nonzero(W)
            d[4:8] = [1, add_i(np.searchsorted(r, np.arange(W.shape[0] + 1))), add_i(c), add_f(W[r, c])]
        if dens <= CSC_MAX_DENSITY:
            c, r = np.nonzero(W.T)
            d[8:12] = [1, add_i(np.searchsorted(c, np.arange(W.shape[1] + 1))), add_i(r), add_f(W[r, c])]
        layer_desc.append(d)
        formats.append(("csr" if d[4] else "dense", "csc" if d[8] else "dense"))
    sizes = np.asarray(cm.field_sizes, np.int64)
    xa = cm.x_off[cm.pair_i] if P else np.zeros(0, np.int64)
    xb = cm.x_off[cm.pair_j] if P else np.zeros(0, np.int64)
    off_fields = _HEADER
    off_pairs = off_fields + 4 * F
    off_layers = off_pairs + 2 * P
    n64 = off_layers + _LSTRIDE * L
    max_h = max([layer.weight.shape[0] for layer in cm.layers] + [1])
    header = [F, P, cm.pair_dim, L, cm.n_x, max_h, off_fields, off_pairs, off_layers]
    i64 = np.concatenate([np.array(header, np.int64), cm.field_base, cm.field_width, sizes, cm.x_off, xa, xb,
                          np.array(layer_desc, np.int64).reshape(-1)]).astype(np.int64)
    assert i64.size == n64
    i32 = np.concatenate([np.zeros(0, np.int32), *ints32])
    if i32.size % 2:
        i32 = np.concatenate([i32, np.zeros(1, np.int32)])
    # int32 offsets in the descriptors are relative to the int32 region, which starts at int64 slot n64
    ib = np.concatenate([i64, i32.view(np.int64)])
    desc = ib[off_layers:n64].reshape(L, _LSTRIDE) if L else None
    if desc is not None:
        for col in (5, 6, 9, 10):
            desc[:, col] += 2 * n64
    fb = np.concatenate(floats).astype(np.float32) if floats else np.zeros(1, np.float32)
    return fb, ib, formats


# ---------------------------------------------------------------------------------------------------------------
# numba kernels

try:
    import numba
    from numba.core import cgutils, types
    from numba.extending import intrinsic
    from llvmlite import ir

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a pinned dependency; the numpy path still works
    HAVE_NUMBA = False

if HAVE_NUMBA:
    @intrinsic
    def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
        """Hint the CPU to start loading arr[idx] (llvm.prefetch: read, keep in all cache levels). Never faults,
        so it may be given an out-of-range index."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [i8p, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    # "contract" lets LLVM fuse a*b+c into FMA (one rounding fewer). The one-sample kernel also allows
    # "reassoc" so dot products vectorise; both change results only by float rounding (~1e-7 relative), and
    # neither assumes finite values (no nnan/ninf), so NaN still flags a bad id.
    # Inner loops index slices with the loop variable: a computed index (a[off + i]) makes numba emit
    # negative-index handling that blocks vectorisation (10x slower matvec). Sparse indices are read as
    # uint32 for the same reason.
    _FM = {"contract"}
    _FM_RED = {"contract", "reassoc"}

    @numba.njit(cache=True, nogil=True, fastmath=_FM)
    def score_batch_kernel(ids, table, fb, ib, out):  # type: ignore[no-untyped-def]
        """Logits of a batch into `out`; returns -1, or row * F + field of an out-of-range id.

        Tiles of TILE samples, feature-major (one row per kept dim, one column per sample) so that the pair
        and bias/ReLU loops vectorise over samples and dense layers are one sgemm each."""
        B = ids.shape[0]
        F, P, D, L, NX, MH = ib[_F], ib[_P], ib[_PDIM], ib[_NL], ib[_NX], ib[_MAXH]
        fo, po, lo = ib[_FIELDS], ib[_PAIRS], ib[_LAYERS]
        base, width = ib[fo:fo + F], ib[fo + F:fo + 2 * F]
        size, xoff = ib[fo + 2 * F:fo + 3 * F], ib[fo + 3 * F:fo + 4 * F]
        xa, xb, pw = ib[po:po + P], ib[po + P:po + 2 * P], fb[1:1 + P]
        iu = ib.view(np.uint32)
        tile = min(B, TILE)
        xbuf = np.empty(max(NX, 1) * tile, np.float32)
        hbuf = np.empty(2 * MH * tile, np.float32)
        accbuf = np.empty(tile, np.float32)
        for t0 in range(0, B, tile):
            T = min(tile, B - t0)
            X = xbuf[:NX * T].reshape((NX, T))
            acc = accbuf[:T]
            acc[:] = fb[0]
            # Gather: field by field, so each field's rows stream into its few rows of X.
            for f in range(F):
                w, s, bo = width[f], size[f], base[f]
                col = ids[t0:t0 + T, f]
                if w == 0:  # not looked up, but still validated
                    for t in range(T):
                        if col[t] < 0 or col[t] >= s:
                            return (t0 + t) * F + f
                    continue
                Xf = X[xoff[f]:xoff[f] + w - 1]
                for t in range(min(PREFETCH, T)):
                    _prefetch(table, bo + col[t] * w)  # prefetch never faults, even for a bad id
                for t in range(T):
                    if t + PREFETCH < T:
                        _prefetch(table, bo + col[t + PREFETCH] * w)
                    i = col[t]
                    if i < 0 or i >= s:
                        return (t0 + t) * F + f
                    o = bo + i * w
                    row = table[o:o + w]
                    acc[t] += row[0]
                    for d in range(w - 1):
                        Xf[d, t] = row[d + 1]
            # Kept pairs: acc += w_p * <x_a, x_b>, vectorised over the tile's samples, two dims per pass.
            for p in range(P):
                A, Bm, wp = X[xa[p]:xa[p] + D], X[xb[p]:xb[p] + D], pw[p]
                for d in range(0, D - 1, 2):
                    a0, b0, a1, b1 = A[d], Bm[d], A[d + 1], Bm[d + 1]
                    for t in range(T):
                        acc[t] += wp * (a0[t] * b0[t] + a1[t] * b1[t])
                if D % 2:
                    a0, b0 = A[D - 1], Bm[D - 1]
                    for t in range(T):
                        acc[t] += wp * (a0[t] * b0[t])
            # DNN, feature-major throughout: dense layers are one sgemm each (W @ X); sparse ones run as CSR,
            # y[r] += w * x[c] over the tile's samples, 4 nnz per pass. (Sample-major output for narrow dense
            # layers via sgemm(X.T, W.T) measured 1.1x slower for the structured model, so it is not used.)
            cur = X
            for k in range(L):
                q = lo + k * _LSTRIDE
                n_out, n_in, bias = ib[q], ib[q + 1], fb[ib[q + 3]:ib[q + 3] + ib[q]]
                y = hbuf[(k % 2) * MH * tile:(k % 2) * MH * tile + n_out * T].reshape((n_out, T))
                if ib[q + 4]:
                    ptr = iu[ib[q + 5]:ib[q + 5] + n_out + 1]
                    idx = iu[ib[q + 6]:ib[q + 6] + ptr[n_out]]
                    dat = fb[ib[q + 7]:ib[q + 7] + ptr[n_out]]
                    for r in range(n_out):
                        yr = y[r]
                        yr[:] = bias[r]
                        e, end = ptr[r], ptr[r + 1]
                        while e + 4 <= end:
                            w0, w1, w2, w3 = dat[e], dat[e + 1], dat[e + 2], dat[e + 3]
                            x0, x1, x2, x3 = cur[idx[e]], cur[idx[e + 1]], cur[idx[e + 2]], cur[idx[e + 3]]
                            for t in range(T):
                                yr[t] += (w0 * x0[t] + w1 * x1[t]) + (w2 * x2[t] + w3 * x3[t])
                            e += 4
                        while e < end:
                            w0, x0 = dat[e], cur[idx[e]]
                            for t in range(T):
                                yr[t] += w0 * x0[t]
                            e += 1
                else:
                    W = fb[ib[q + 2]:ib[q + 2] + n_out * n_in].reshape((n_out, n_in))
                    np.dot(W, cur, y)
                    for r in range(n_out):
                        yr, br = y[r], bias[r]
                        for t in range(T):
                            yr[t] += br
                if k < L - 1:
                    for r in range(n_out):
                        yr = y[r]
                        for t in range(T):
                            yr[t] = max(yr[t], np.float32(0.0))
                cur = y
            if L:
                acc += cur[0]
            out[t0:t0 + T] = acc
        return -1

    @numba.njit(cache=True, nogil=True, fastmath=_FM_RED)
    def score_one_kernel(ids, table, fb, ib):  # type: ignore[no-untyped-def]
        """Logit of one sample (ids (F,)); NaN if an id is out of range."""
        F, P, D, L, NX, MH = ib[_F], ib[_P], ib[_PDIM], ib[_NL], ib[_NX], ib[_MAXH]
        fo, po, lo = ib[_FIELDS], ib[_PAIRS], ib[_LAYERS]
        base, width = ib[fo:fo + F], ib[fo + F:fo + 2 * F]
        size, xoff = ib[fo + 2 * F:fo + 3 * F], ib[fo + 3 * F:fo + 4 * F]
        xa, xb, pw = ib[po:po + P], ib[po + P:po + 2 * P], fb[1:1 + P]
        iu = ib.view(np.uint32)
        # Start every row fetch before using any, so their cache misses overlap.
        for f in range(F):
            i, w = ids[f], width[f]
            if i < 0 or i >= size[f]:
                return np.float32(np.nan)
            if w:
                _prefetch(table, base[f] + i * w)
                _prefetch(table, base[f] + i * w + w - 1)
        buf = np.empty(NX + 2 * MH, np.float32)
        total = fb[0]
        for f in range(F):
            w = width[f]
            if w:
                o = base[f] + ids[f] * w
                row, xf = table[o:o + w], buf[xoff[f]:xoff[f] + w - 1]
                total += row[0]
                for d in range(w - 1):
                    xf[d] = row[d + 1]
        for p in range(P):
            a, b = buf[xa[p]:xa[p] + D], buf[xb[p]:xb[p] + D]
            s = np.float32(0.0)
            for d in range(D):
                s += a[d] * b[d]
            total += pw[p] * s
        x = buf[:NX]
        for k in range(L):
            q = lo + k * _LSTRIDE
            n_out, n_in, bias = ib[q], ib[q + 1], fb[ib[q + 3]:ib[q + 3] + ib[q]]
            y = buf[NX + (k % 2) * MH:NX + (k % 2) * MH + n_out]
            if ib[q + 8]:  # CSC: columns of zero inputs (ReLU zeros, pruned embedding entries) are skipped
                ptr = iu[ib[q + 9]:ib[q + 9] + n_in + 1]
                idx = iu[ib[q + 10]:ib[q + 10] + ptr[n_in]]
                dat = fb[ib[q + 11]:ib[q + 11] + ptr[n_in]]
                y[:] = bias
                for c in range(n_in):
                    xc = x[c]
                    if xc != 0.0:
                        for e in range(ptr[c], ptr[c + 1]):
                            y[idx[e]] += dat[e] * xc
            else:
                W = fb[ib[q + 2]:ib[q + 2] + n_out * n_in]
                for r in range(n_out):
                    wr = W[r * n_in:(r + 1) * n_in]
                    s = np.float32(0.0)
                    for c in range(n_in):
                        s += wr[c] * x[c]
                    y[r] = s + bias[r]
            if k < L - 1:
                for r in range(n_out):
                    y[r] = max(y[r], np.float32(0.0))
            x = y
        if L:
            total += x[0]
        return total

    @numba.njit(cache=True, nogil=True)
    def score_rows_kernel(ids, table, fb, ib, out):  # type: ignore[no-untyped-def]
        """The one-sample kernel on each row (small batches); returns -1 or the first row scored NaN."""
        first = -1
        for b in range(ids.shape[0]):
            out[b] = score_one_kernel(ids[b], table, fb, ib)
            if out[b] != out[b] and first < 0:
                first = b
        return first
