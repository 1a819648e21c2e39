"""The fragment bookkeeping of csrc/cuda/tree_attention_sm90.cu, replayed on the CPU.

The kernel's ldmatrix row addresses, its assignment of ldmatrix registers to mma operands and its repacking of
the S accumulators into the A operand of P V are written out here the way the kernel computes them, on top of
the PTX ISA's definitions of ldmatrix (.x4, .trans) and mma.m16n8k16 fragments. One warp's S = Q K^T and
O = S V over a 64-key tile must come out as the plain matrix products. This checks the index arithmetic only (a
transcription of it), not the compiled kernel; that runs in the GPU check.
"""
import numpy as np
import pytest

KEYS = 64  # keys per shared-memory tile (hass::kTreeKeyTile)


def ldmatrix_x4(smem, lane_rows, trans=False):
    """PTX ldmatrix.sync.aligned.m8n8.x4(.trans).b16: lane i gives the (row, col) where row i % 8 of matrix
    i // 8 starts; returns regs[lane][j] = the lane's two elements of matrix j."""
    mats = [np.stack([smem[r, c:c + 8] for r, c in lane_rows[8 * j:8 * j + 8]]) for j in range(4)]
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if trans:
            regs.append([(m[2 * t, g], m[2 * t + 1, g]) for m in mats])
        else:
            regs.append([(m[g, 2 * t], m[g, 2 * t + 1]) for m in mats])
    return regs


def mma_16816(c, a, b0, b1):
    """PTX mma.m16n8k16.row.col: c[lane] (4 floats) += A (16x16) B (16x8) from the lanes' fragments."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0[lane], b1[lane]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane] += np.array([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])


def frag_to_matrix(frags, rows, cols):
    """Accumulator tiles frags[mt][nt][lane] (4 floats each) -> the rows x cols matrix they hold."""
    out = np.zeros((rows, cols))
    for mt in range(rows // 16):
        for nt in range(cols // 8):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                c = frags[mt][nt][lane]
                out[mt * 16 + g, nt * 8 + 2 * t:nt * 8 + 2 * t + 2] = c[0:2]
                out[mt * 16 + g + 8, nt * 8 + 2 * t:nt * 8 + 2 * t + 2] = c[2:4]
    return out


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("warp", [0, 5])
def test_one_warp_tile_products(D, warp):
    rng = np.random.default_rng(D + warp)
    sub_keys = 16 if D == 128 else 32  # the kernel's kSub
    ld = D + 8                         # Layout::kLd (elements)
    s_q = np.zeros((256, ld))
    s_k, s_v = np.zeros((KEYS, ld)), np.zeros((KEYS, ld))
    s_q[:, :D], s_k[:, :D], s_v[:, :D] = (rng.integers(-4, 5, size=(n, D)) for n in (256, KEYS, KEYS))

    # Lane row addresses, as the kernel computes them in bytes, here in (row, element) pairs.
    def q_lane(lane, mt, kk):
        return warp * 32 + (lane & 15) + mt * 16, (lane >> 4) * 8 + kk * 16

    def k_lane(lane, sub, np_, kk):
        return (lane >> 4) * 8 + (lane & 7) + sub * sub_keys + np_ * 16, ((lane >> 3) & 1) * 8 + kk * 16

    def v_lane(lane, sub, kk, dp):
        return ((lane >> 3) & 1) * 8 + (lane & 7) + sub * sub_keys + kk * 16, (lane >> 4) * 8 + dp * 16

    s_all = np.zeros((32, KEYS))
    o = [[[np.zeros(4) for _ in range(32)] for _ in range(D // 8)] for _ in range(2)]
    for sub in range(KEYS // sub_keys):
        s = [[[np.zeros(4) for _ in range(32)] for _ in range(sub_keys // 8)] for _ in range(2)]
        for kk in range(D // 16):
            a = [ldmatrix_x4(s_q, [q_lane(lane, mt, kk) for lane in range(32)]) for mt in range(2)]
            for np_ in range(sub_keys // 16):
                kb = ldmatrix_x4(s_k, [k_lane(lane, sub, np_, kk) for lane in range(32)])
                for mt in range(2):
                    mma_16816(s[mt][2 * np_], a[mt], [r[0] for r in kb], [r[1] for r in kb])
                    mma_16816(s[mt][2 * np_ + 1], a[mt], [r[2] for r in kb], [r[3] for r in kb])
        s_all[:, sub * sub_keys:(sub + 1) * sub_keys] = frag_to_matrix(s, 32, sub_keys)
        # P V with P = S itself (the softmax only rescales values in place): the A fragments from the S tiles
        for kk in range(sub_keys // 16):
            a = [[[(s[mt][2 * kk][lane][0], s[mt][2 * kk][lane][1]), (s[mt][2 * kk][lane][2], s[mt][2 * kk][lane][3]),
                   (s[mt][2 * kk + 1][lane][0], s[mt][2 * kk + 1][lane][1]),
                   (s[mt][2 * kk + 1][lane][2], s[mt][2 * kk + 1][lane][3])] for lane in range(32)] for mt in range(2)]
            for dp in range(D // 16):
                vb = ldmatrix_x4(s_v, [v_lane(lane, sub, kk, dp) for lane in range(32)], trans=True)
                for mt in range(2):
                    mma_16816(o[mt][2 * dp], a[mt], [r[0] for r in vb], [r[1] for r in vb])
                    mma_16816(o[mt][2 * dp + 1], a[mt], [r[2] for r in vb], [r[3] for r in vb])
    q_rows = s_q[warp * 32:warp * 32 + 32, :D]
    want_s = q_rows @ s_k[:, :D].T
    np.testing.assert_array_equal(s_all, want_s)
    np.testing.assert_array_equal(frag_to_matrix(o, 32, D), want_s @ s_v[:, :D])
