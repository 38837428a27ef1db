"""Blocked code layout and the per-block estimate for the RaBitQ scan (FastScan-style).

Why: scanning one row at a time, <b, q> costs 5 POPCNTs per 64 dimensions (the code, and its AND
with each of the query's 4 bit planes): ~15 ns per 384-d row, most of a query's time. Here the
codes of 32 rows of a list are interleaved by 4-dimension nibbles, and the 4-bit query becomes a
16-entry table per nibble (the sum of its quantized values over the dimensions the nibble sets,
at most 4 x 15 = 60: one byte). One SSSE3 PSHUFB looks up 16 rows at once, so a block of 32 rows
costs 2 lookups per nibble (~3.4 ns per 384-d row). The integer sums are the same as the
popcount path's, so both give identical estimates; the popcount path stays as the portable
fallback (non-x86 CPUs) and as the reference the tests compare with.

Layout (derived from the row-major codes; never stored on disk): each list's rows (its ranges in
order) are cut into blocks of 32 lanes, the last padded with lane row -1. Block b, nibble m:
16 bytes, byte t = nibble m of lane t (low 4 bits) | nibble m of lane t + 16 (high 4 bits).
Nibble m of a row covers dimensions 4m .. 4m + 3 (bit t = dimension 4m + t, as in the codes).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 32
X86 = platform.machine().lower() in ("x86_64", "amd64")
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def pack_blocks(
    codes: np.ndarray,
    fac: np.ndarray,
    range_ptr: np.ndarray,
    ranges: np.ndarray,
    spill: dict | None = None,
) -> dict:
    """The blocked layout of row-major codes u8[N, D/8] and factors f32[N, 4] for the lists'
    row ranges: blk_ptr i64[L + 1] (list -> its blocks), blk_rows i32[B * 32] (lane -> row,
    -1 = pad), blk_codes u8[B, D/4 * 16], blk_pc u16[B * 32] (set bits per lane's code),
    blk_fac f32[4, B * 32] (the factors by lane, one column per factor: the estimate of a
    whole block is then a few vector instructions).

    `spill` (spill.py): second copies {rows i64[S], lists i64[S], codes u8[S, D/8], fac f32[S, 4]}
    appended to their lists after the primary rows (same row number, their own codes)."""
    L = len(range_ptr) - 1
    nb = codes.shape[1]
    rows_per_list = [
        np.concatenate([np.arange(s, e) for s, e in ranges[range_ptr[li] : range_ptr[li + 1]]])
        if range_ptr[li + 1] > range_ptr[li]
        else np.zeros(0, np.int64)
        for li in range(L)
    ]
    src_per_list = list(rows_per_list)  # index into the concatenated codes / factors
    if spill is not None and len(spill["rows"]):
        n = len(codes)
        by = np.argsort(spill["lists"], kind="stable")
        cut = np.searchsorted(spill["lists"][by], np.arange(L + 1))
        for li in range(L):
            sel = by[cut[li] : cut[li + 1]]
            rows_per_list[li] = np.concatenate([rows_per_list[li], spill["rows"][sel]])
            src_per_list[li] = np.concatenate([src_per_list[li], n + sel])
        codes = np.concatenate([codes, spill["codes"]])
        fac = np.concatenate([fac, spill["fac"]])
    nblk = np.array([-(-len(r) // LANES) for r in rows_per_list], dtype=np.int64)
    blk_ptr = np.concatenate([[0], np.cumsum(nblk)]).astype(np.int64)
    B = int(blk_ptr[-1])
    blk_rows = np.full(B * LANES, -1, dtype=np.int32)
    src = np.full(B * LANES, -1, dtype=np.int64)
    for li, r in enumerate(rows_per_list):
        blk_rows[blk_ptr[li] * LANES : blk_ptr[li] * LANES + len(r)] = r
        src[blk_ptr[li] * LANES : blk_ptr[li] * LANES + len(r)] = src_per_list[li]
    valid = blk_rows >= 0
    lane_codes = np.zeros((B * LANES, nb), dtype=np.uint8)
    lane_codes[valid] = codes[src[valid]]
    blk_pc = _POP8[lane_codes].sum(axis=1).astype(np.uint16)
    blk_fac = np.zeros((fac.shape[1], B * LANES), dtype=np.float32)
    blk_fac[:, valid] = fac[src[valid]].T
    # nibbles [B, 32, D/4]: byte j's low nibble is nibble 2j, its high nibble 2j + 1
    nib = np.stack([lane_codes & 15, lane_codes >> 4], axis=2).reshape(B, LANES, 2 * nb)
    half = LANES // 2
    packed = nib[:, :half, :] | (nib[:, half:, :] << 4)  # [B, 16, M]
    blk_codes = np.ascontiguousarray(packed.transpose(0, 2, 1)).reshape(B, 2 * nb * half)
    return dict(
        blk_ptr=blk_ptr, blk_rows=blk_rows, blk_codes=blk_codes, blk_pc=blk_pc, blk_fac=blk_fac
    )


@njit(nogil=True, cache=True)
def query_lut(u, lut):
    """lut[m, v] = sum of the quantized query u over the dimensions 4m + t that nibble v sets."""
    for m in range(lut.shape[0]):
        a0, a1, a2, a3 = u[4 * m], u[4 * m + 1], u[4 * m + 2], u[4 * m + 3]
        lut[m, 0] = 0
        lut[m, 1] = a0
        lut[m, 2] = a1
        lut[m, 3] = a0 + a1
        for v in range(4):
            lut[m, 4 + v] = lut[m, v] + a2
        for v in range(8):
            lut[m, 8 + v] = lut[m, v] + a3


def _host_has_avx2() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx2"))
    except Exception:  # noqa: BLE001 - no feature list: the 16-byte form works on any x86-64
        return False


AVX2 = X86 and _host_has_avx2()


@intrinsic
def _pshufb_block(typingctx, codes, blk, lut, acc):
    """acc[lane] = sum over m of lut[m, nibble m of the lane] for the 32 lanes of block `blk`.
    With AVX2 one 32-byte load holds nibbles m and m + 1 (the layout keeps them adjacent) and one
    VPSHUFB looks both up (each 16-byte half with its own table); without, a 16-byte PSHUFB per
    nibble. Four steps are summed in bytes, then in 16-bit lanes (at most D/4 x 60 < 2^16).
    Needs D/4 * 16 to be a multiple of 4 steps: D is a multiple of 64."""
    if not (isinstance(codes, types.Array) and isinstance(lut, types.Array)):
        return None
    W = 32 if AVX2 else 16  # bytes per step: 2 nibbles (AVX2) or 1

    def codegen(context, builder, signature, args):
        cty, bty, lty, aty = signature.args
        ca = context.make_array(cty)(context, builder, args[0])
        la = context.make_array(lty)(context, builder, args[2])
        aa = context.make_array(aty)(context, builder, args[3])
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        vb = ir.VectorType(i8, W)
        v16w, v32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(i32, 16)
        M = builder.extract_value(la.shape, 0)
        b64 = context.cast(builder, args[1], bty, types.int64)
        start = builder.mul(b64, builder.mul(M, ir.Constant(i64, 16)))
        cptr = builder.gep(builder.bitcast(ca.data, i8.as_pointer()), [start])
        lptr = builder.bitcast(la.data, i8.as_pointer())
        H = W // 2
        vh = ir.VectorType(ir.IntType(16), H)
        # 16-bit sums of the even and odd byte positions, for the low and high nibbles' lanes
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vh, None)) for _ in range(4)]
        low4 = ir.Constant(vb, [15] * W)
        four = ir.Constant(vb, [4] * W)
        byte = ir.Constant(vh, [255] * H)
        eight = ir.Constant(vh, [8] * H)
        name = "llvm.x86.avx2.pshuf.b" if W == 32 else "llvm.x86.ssse3.pshuf.b.128"
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb, vb]), name)
        # GROUP steps summed in bytes (each lookup <= 60, so 4 fit in 255), then added into the
        # 16-bit sums with AND / shift (no byte-to-word shuffles on the hot path)
        GROUP = 4
        groups = builder.udiv(builder.mul(M, ir.Constant(i64, 16)), ir.Constant(i64, W * GROUP))
        with cgutils.for_range(builder, groups) as loop:
            g0 = builder.mul(loop.index, ir.Constant(i64, W * GROUP))
            s_lo = ir.Constant(vb, None)
            s_hi = ir.Constant(vb, None)
            for j in range(GROUP):
                off = builder.add(g0, ir.Constant(i64, W * j))
                cp = builder.bitcast(builder.gep(cptr, [off]), vb.as_pointer())
                tp = builder.bitcast(builder.gep(lptr, [off]), vb.as_pointer())
                c = builder.load(cp, align=1)
                t = builder.load(tp, align=1)
                s_lo = builder.add(s_lo, builder.call(pshufb, [t, builder.and_(c, low4)]))
                hi_idx = builder.and_(builder.lshr(c, four), low4)
                s_hi = builder.add(s_hi, builder.call(pshufb, [t, hi_idx]))
            for n, sv in enumerate((s_lo, s_hi)):
                w = builder.bitcast(sv, vh)
                for e, part in enumerate((builder.and_(w, byte), builder.lshr(w, eight))):
                    slot = accs[2 * n + e]
                    builder.store(builder.add(builder.load(slot), part), slot)

        def in_order(even, odd):  # <W x i16> sums by byte position
            mask = [x for p in range(H) for x in (p, H + p)]
            return builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(i32, W), mask))

        def halves(v):  # 16 lanes: an SSE accumulator as is; AVX2: its two nibble halves added
            if W == 16:
                return v
            first = builder.shuffle_vector(
                v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16)))
            )
            second = builder.shuffle_vector(
                v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16, 32)))
            )
            return builder.add(first, second)

        aptr = builder.bitcast(aa.data, v32.as_pointer())
        lo16 = halves(in_order(builder.load(accs[0]), builder.load(accs[1])))
        hi16 = halves(in_order(builder.load(accs[2]), builder.load(accs[3])))
        assert lo16.type == v16w
        builder.store(builder.zext(lo16, v32), aptr, align=4)
        builder.store(builder.zext(hi16, v32), builder.gep(aptr, [ir.Constant(i32, 1)]), align=4)
        return context.get_dummy_value()

    return types.void(codes, blk, lut, acc), codegen


@njit(nogil=True, cache=True)
def block_sums_pshufb(blk_codes, b, lut, acc):
    """acc[lane] = <code of the lane's row (0/1), u> for the 32 lanes of block b (x86)."""
    _pshufb_block(blk_codes, b, lut, acc)


@njit(nogil=True, cache=True)
def block_sums_scalar(blk_codes, b, lut, acc):
    """The same sums one lane and one nibble at a time (portable; the tests' reference)."""
    M = lut.shape[0]
    for t in range(LANES // 2):
        lo = 0
        hi = 0
        for m in range(M):
            c = blk_codes[b, m * 16 + t]
            lo += lut[m, c & 15]
            hi += lut[m, c >> 4]
        acc[t] = lo
        acc[t + LANES // 2] = hi


block_sums = block_sums_pshufb if X86 else block_sums_scalar
