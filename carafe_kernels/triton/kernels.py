"""@triton.jit kernels for CARAFE: forward, and an atomic-free backward, for masks and for mask logits;
and for the content-aware downsampling ops (carafe_down, carafe_down_fused; DOWN below).

Shapes (docs/design.md#the-contract): features (N, C, H, W); masks (N, G*K*K, H*S, W*S); mask_logits
(N, G*K*K*S*S, H, W) whose channel (g*K*K + t)*S*S + i*S + j is tap t of group g for sub-pixel (i, j);
output (N, C, H*S, W*S). The tensors of a launch are all contiguous NCHW or all channels_last (CL;
the wrappers in ops.py follow the features' layout), read in place: the index maths below gives every
(channel, pixel) offset through _chan_base / _mask_layout.

Shared blocking. A program owns a block of BLOCK_P low-res positions p (flattened h*W + w) of one
(image n, group g) and, except in the mask-gradient kernel, a block of BLOCK_C channels of that group.
The S*S output pixels (h*S + i, w*S + j) of a low-res position all read the same K x K feature window,
so the kernels keep a third tensor axis for the sub-pixel index sub = i*S + j (padded to SS_PAD, a
power of two, with a mask): each feature value is loaded once per tap and feeds S*S FMAs, and the
masks of a tap are loaded once per program and feed BLOCK_C channels. Taps are a runtime loop (not
unrolled), so K = 11 does not blow up the code.

Content-aware downsampling (DOWN). features (N, C, H, W); masks and mask_logits alike (N, G*K*K, Ho, Wo),
Ho = ceil(H/S), Wo = ceil(W/S); output (N, C, Ho, Wo); output (i, j) reads tap (ky, kx) at feature
(S*i + ky - R, S*j + kx - R). The forward and mask-gradient kernels serve both ops: with DOWN the
positions p are the output pixels (grid (Ho, Wo), _position_grid), each with one "sub-pixel" (SS_PAD = 1;
the masks' layout is then the fused one with S = 1), and the tap centre moves S feature pixels per
position. The features gradient has its own gather kernel, _carafe_down_bwd_feat (described there).

NB: everything accumulates in fp32 whatever the input dtype; loads are in the input dtype and the
stores cast back. NB: per-(n, channel) base offsets are int64 (N*C*H*S*W*S overflows int32 on large
upsampling outputs: mmcv's backward does); offsets inside one image plane stay int32 (an image plane
of 2**31 elements is refused by ops.py).

Fused softmax. The forward reads the logits of one (n, g, p-block) twice: a max pass over the K*K taps,
then the reassembly pass, which weights tap t by exp(logit_t - max) and divides by the sum of those
weights at the end; the normalised masks never touch memory. The backward kernels use
prob_t = exp(logit_t - lse), lse = logsumexp over the taps, computed once by the mask-gradient kernel.

Backward, no atomics, one writer per element, fixed loop orders for a given config (bitwise
reproducible across processes only with a fixed config: launchers() below):
- grad features is a gather: features position p receives, for each tap t = (ky, kx), from the output
  pixels of q = p + (R - ky, R - kx): grad_f[c, p] = sum_t sum_sub grad_out[c, q*S + sub] * mask_t[q, sub].
- grad masks is a reduction over the group's channels:
  dmask_t[q, sub] = sum_{c in g} grad_out[c, q*S + sub] * features[c, q + (ky - R, kx - R)].
  One program owns all of a group's channels for its positions and loops over channel blocks,
  accumulating in an fp32 buffer that only it touches; the fused variant then folds in the softmax
  backward dlogit_t = prob_t * (dprob_t - sum_t' prob_t' dprob_t') (pixel-shuffle backward is the
  index map), and writes the logsumexp it computed for the grad-features kernel.
- A backward that asks for one gradient (the ops' output_mask) launches only its kernel; a fused
  features-only backward also launches the mask kernel with GRAD_MASKS=False, which writes lse alone.

Autotuning. On a GPU each kernel is wrapped in triton.autotune over block shapes, num_warps and
num_stages, keyed on (C, H, W, G, K, S, FUSED, CL, and DOWN for the shared kernels) plus the tensor
dtypes (the autotuner adds those),
with an early prune that fits the blocks to the shape (register budget BLOCK_C*BLOCK_P*SS_PAD,
channel blocks no wider than the group). Under TRITON_INTERPRET=1 a single config is used, so tests
never benchmark configs in the interpreter. Deterministic requests (torch.use_deterministic_algorithms)
and CARAFE_TRITON_AUTOTUNE=0 get one fixed config per kernel instead of the timed choice.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["INTERPRET", "carafe_fwd_kernel", "carafe_bwd_mask_kernel", "carafe_bwd_feat_kernel",
           "carafe_down_bwd_feat_kernel", "launchers", "next_pow2"]


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# Index maths shared by the three kernels. Written once so that the forward and both backward kernels
# cannot disagree on a layout; @triton.jit helpers are inlined, so the kernels compile as before.
# --------------------------------------------------------------------------------------------------

@triton.jit
def _program_block(n_pb, n_cb):
    """This program's (position block, channel block, n*G + g) for pid = ((n*G + g)*n_cb + cb)*n_pb + pb
    (position blocks fastest). n_cb = 1 where a program owns all channels of its group (cb is then 0)."""
    pid = tl.program_id(0)
    pb = pid % n_pb
    cb = (pid // n_pb) % n_cb
    ng = (pid // n_pb // n_cb).to(tl.int64)  # NB: int64, it scales the per-(n, channel) bases
    return pb, cb, ng


@triton.jit
def _channel_block(cb, ng, Cg, BLOCK_C: tl.constexpr):
    """(c_ok, chan) [BLOCK_C] of channel block cb of group g: chan = n*C + g*Cg + c, int64."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)               # channel inside the group
    return c < Cg, ng * Cg + c


@triton.jit
def _position_block(pb, H, W, S: tl.constexpr, SS_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """The low-res positions p [BLOCK_P] of block pb, their (h, w), the sub-pixel axis sub [SS_PAD]
    and the in-plane offsets opix [BLOCK_P, SS_PAD] of output pixels (h*S + i, w*S + j), sub = i*S + j;
    p_ok / sub_ok mask the padding of both axes."""
    HW = H * W
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // W
    w = p % W
    sub = tl.arange(0, SS_PAD)
    i = sub // S
    j = sub % S
    opix = (h[:, None] * S + i[None, :]) * (W * S) + (w[:, None] * S + j[None, :])
    return p, p < HW, h, w, sub, sub < S * S, opix


@triton.jit
def _chan_base(chan, C, plane, CL: tl.constexpr):
    """(offset of pixel 0 of channel chan = n*C + c, stride between pixels) in a tensor of C channels and
    `plane` pixels per image: NCHW (chan*plane, 1), or channels_last (CL) ((n*plane)*C + c, C)."""
    if CL:
        n = chan // C
        return n * plane * C + (chan - n * C), C
    else:
        return chan * plane, 1


@triton.jit
def _mask_layout(ng, G, p, sub, opix, HW, KK: tl.constexpr, SS: tl.constexpr, FUSED: tl.constexpr,
                 CL: tl.constexpr):
    """Where the mask of tap t for (p, sub) of group ng = n*G + g lives:
    base + t * tap_stride + mpix [BLOCK_P, SS_PAD], and the stride between pixels (a shift of the pixel by
    d adds d * pix_stride).
    FUSED: mask_logits (or grad logits), channel (g*KK + t)*SS + sub at low-res position p;
    else:  masks (or grad masks), channel g*KK + t at output pixel opix.
    NCHW, or channels_last (CL: pixel-major, the Cm = G*KK(*SS) channels of a pixel adjacent)."""
    if CL:
        n = ng // G
        g = ng - n * G
        if FUSED:
            Cm = G * KK * SS
            base = n * HW * Cm + g * (KK * SS)
            mpix = p[:, None] * Cm + sub[None, :]
            tap_stride = tl.cast(SS, tl.int64)
        else:
            Cm = G * KK
            base = n * (HW * SS) * Cm + g * KK
            mpix = opix * Cm
            tap_stride = tl.cast(1, tl.int64)
        pix_stride = Cm
    else:
        if FUSED:
            base = ng * (KK * SS) * HW
            mpix = sub[None, :] * HW + p[:, None]
            tap_stride = tl.cast(SS * HW, tl.int64)  # NB: int64: t * stride overflows int32 on big images
        else:
            base = ng * KK * (HW * SS)
            mpix = opix
            tap_stride = tl.cast(HW * SS, tl.int64)
        pix_stride = 1
    return base, mpix, tap_stride, pix_stride


@triton.jit
def _position_grid(H, W, S: tl.constexpr, DOWN: tl.constexpr):
    """(PH, PW): the grid of the positions p the programs own: the features' (H, W) for CARAFE, the
    output's (ceil(H/S), ceil(W/S)) for DOWN (content-aware downsampling)."""
    if DOWN:
        return (H + S - 1) // S, (W + S - 1) // S
    else:
        return H, W


@triton.jit
def _tap_features(feat_rows, fstride, fp, fw, row_ok, c_ok, dy, dx, W):
    """(features [BLOCK_C, BLOCK_P] (fp32) at feature pixel fp + (dy, dx), 0 outside the image (the zero
    padding); whether the tap is inside the image [BLOCK_P]). fp / fw: the tap centre's in-plane offset
    and column (p and w for CARAFE; (S*h)*W + S*w and S*w for DOWN); row_ok says whether its row + dy is
    inside, the column is checked here; fstride: between pixels."""
    ww = fw + dx
    ok = row_ok & (ww >= 0) & (ww < W)
    return tl.load(feat_rows + ((fp + dy * W + dx) * fstride)[None, :], mask=c_ok[:, None] & ok[None, :],
                   other=0.0).to(tl.float32), ok


# --------------------------------------------------------------------------------------------------
# Kernels (raw @triton.jit; the autotuned launchers are built below)
# --------------------------------------------------------------------------------------------------

@triton.jit
def _carafe_fwd(
    feat_ptr,   # (N, C, H, W) features, input dtype
    mask_ptr,   # FUSED=False: masks (N, G*K*K, H*S, W*S); FUSED=True: mask_logits (N, G*K*K*S*S, H, W)
                # DOWN: masks or mask_logits alike (N, G*K*K, Ho, Wo)
    out_ptr,    # (N, C, H*S, W*S) output, input dtype (written); DOWN: (N, C, Ho, Wo)
    C,          # int: channels
    H,          # int: features height (low-res for CARAFE, full-res for DOWN)
    W,          # int: features width
    G,          # int: groups; C % G == 0, channel c belongs to group c // (C // G)
    K: tl.constexpr,        # kernel_size, odd, <= 11
    S: tl.constexpr,        # scale_factor, <= 8
    SS_PAD: tl.constexpr,   # next power of two >= S*S (sub-pixel axis, masked); 1 for DOWN
    FUSED: tl.constexpr,    # mask_ptr holds logits: pixel-shuffle + per-group softmax on the fly
    DOWN: tl.constexpr,     # content-aware downsampling: positions are output pixels, taps stride S
    CL: tl.constexpr,       # every tensor argument is channels_last (NHWC in memory), else NCHW
    BLOCK_C: tl.constexpr,  # channels of one group per program (power of two)
    BLOCK_P: tl.constexpr,  # low-res positions per program (power of two)
):
    # Index layout: pid = ((n*G + g) * n_cb + cb) * n_pb + pb  (position blocks fastest, so programs
    # running together share the K x K halo and the masks in L2).
    # Register tiles: acc/out [BLOCK_C, BLOCK_P, SS_PAD] = (channel, low-res position, sub-pixel);
    # features of a tap [BLOCK_C, BLOCK_P]; masks/probabilities of a tap [BLOCK_P, SS_PAD].
    # DOWN: the positions are output pixels (i, j) (no sub-pixel axis: UP = 1, SS_PAD = 1) and the tap
    # centre is feature pixel (S*i, S*j); the masks/logits layout is the fused one with one sub-pixel.
    R: tl.constexpr = (K - 1) // 2
    KK: tl.constexpr = K * K
    UP: tl.constexpr = 1 if DOWN else S     # output pixels per position, along each axis
    FS: tl.constexpr = S if DOWN else 1     # feature pixels per position step, along each axis
    HW = H * W
    PH, PW = _position_grid(H, W, S, DOWN)
    PHW = PH * PW
    Cg = C // G
    pb, cb, ng = _program_block(tl.cdiv(PHW, BLOCK_P), tl.cdiv(Cg, BLOCK_C))
    c_ok, chan = _channel_block(cb, ng, Cg, BLOCK_C)
    p, p_ok, h, w, sub, sub_ok, opix = _position_block(pb, PH, PW, UP, SS_PAD, BLOCK_P)
    pix_ok = p_ok[:, None] & sub_ok[None, :]
    mbase, mpix, tap_stride, mstride = _mask_layout(ng, G, p, sub, opix, PHW, KK, UP * UP, FUSED, CL)
    mask_base = mask_ptr + mbase

    fbase, fstride = _chan_base(chan, C, HW, CL)
    feat_rows = feat_ptr + fbase[:, None]                  # [BLOCK_C, 1] pointers
    fh = h * FS                                            # the tap centre's feature row, column, offset
    fw = w * FS
    fp = fh * W + fw
    if FUSED:
        # Pass 1: max over the K*K taps [BLOCK_P, SS_PAD] (loads only, no exp).
        m_max = tl.full([BLOCK_P, SS_PAD], float("-inf"), tl.float32)
        for t in range(KK):
            logit = tl.load(mask_base + t * tap_stride + mpix, mask=pix_ok, other=0.0).to(tl.float32)
            m_max = tl.maximum(m_max, logit)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)  # NB: -inf logits give weight 0, not NaN
        denom = tl.zeros([BLOCK_P, SS_PAD], tl.float32)

    acc = tl.zeros([BLOCK_C, BLOCK_P, SS_PAD], tl.float32)
    for ky in range(K):
        hh = fh + (ky - R)
        row_ok = p_ok & (hh >= 0) & (hh < H)
        for kx in range(K):
            f, tap_in = _tap_features(feat_rows, fstride, fp, fw, row_ok, c_ok, ky - R, kx - R, W)
            t = ky * K + kx
            m = tl.load(mask_base + t * tap_stride + mpix, mask=pix_ok, other=0.0).to(tl.float32)
            if FUSED:
                m = tl.exp(m - m_ref)
                denom += m  # NB: a padded tap still takes its share of the softmax (the contract)
            # A tap in the zero padding contributes nothing, whatever its mask holds (an inf mask must
            # not give 0 * inf = NaN), as in the cpu kernels.
            acc += f[:, :, None] * tl.where(tap_in[:, None], m, 0.0)[None, :, :]
    if FUSED:
        # NB: softmax normalisation deferred to the end (as in flash attention): one exp per logit per
        # program, where normalising first would need a second exp pass; exp throughput is 1/8 of FMA's.
        acc = acc * (1.0 / denom)[None, :, :]

    obase, ostride = _chan_base(chan, C, PHW * UP * UP, CL)
    out_ptrs = out_ptr + obase[:, None, None] + (opix * ostride)[None, :, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=c_ok[:, None, None] & pix_ok[None, :, :])


@triton.jit
def _carafe_bwd_mask(
    gout_ptr,   # (N, C, H*S, W*S) grad of the output, input dtype
    feat_ptr,   # (N, C, H, W) features, input dtype
    logit_ptr,  # FUSED: mask_logits (N, G*K*K*S*S, H, W); otherwise not read (any tensor)
    dp_ptr,     # fp32 accumulator of dL/dmask, laid out like grad_ptr (written); unused when ACC_IN_GRAD
    grad_ptr,   # output, input dtype: FUSED: grad mask_logits (N, G*K*K*S*S, H, W);
                #                      else:  grad masks (N, G*K*K, H*S, W*S)
    lse_ptr,    # FUSED: (N, G*S*S, H, W) fp32, written: logsumexp over the taps, for _carafe_bwd_feat; else unused
    C,          # int: channels
    H,          # int: low-res height
    W,          # int: low-res width
    G,          # int: groups
    K: tl.constexpr,        # kernel_size
    S: tl.constexpr,        # scale_factor
    SS_PAD: tl.constexpr,   # next power of two >= S*S; 1 for DOWN
    FUSED: tl.constexpr,    # gradients w.r.t. logits (softmax + pixel-shuffle backward folded in)
    DOWN: tl.constexpr,     # content-aware downsampling (as in _carafe_fwd); masks, logits, dp, grad and
                            # lse all (N, G*K*K or G, Ho, Wo)
    ACC_IN_GRAD: tl.constexpr,  # grad_ptr is fp32 and doubles as the accumulator (no aliased arguments)
    CL: tl.constexpr,       # gout, feat, logit, dp and grad are channels_last (lse is always NCHW)
    GRAD_MASKS: tl.constexpr,  # compute the mask gradient; False (FUSED only): write lse alone, for a
                               # features-only backward (output_mask), and touch neither dp nor grad
    BLOCK_C: tl.constexpr,  # channels per step of the reduction loop
    BLOCK_P: tl.constexpr,  # low-res positions per program
):
    # Index layout: pid = (n*G + g) * n_pb + pb; the program loops over all Cg channels of group g.
    # Register tiles: grad_out [BLOCK_C, BLOCK_P, SS_PAD] (loaded once per channel block, reused by
    # every tap); features of a tap [BLOCK_C, BLOCK_P]; per-tap result [BLOCK_P, SS_PAD].
    # dp/grad offset of (tap t, p, sub): FUSED: ((n*G + g)*KK + t)*SS*HW + sub*HW + p;
    #                                    else:  ((n*G + g)*KK + t)*HWs + (h*S + i)*Ws + w*S + j.
    R: tl.constexpr = (K - 1) // 2
    KK: tl.constexpr = K * K
    UP: tl.constexpr = 1 if DOWN else S     # as in _carafe_fwd
    FS: tl.constexpr = S if DOWN else 1
    SS: tl.constexpr = UP * UP              # sub-pixels per position
    HW = H * W
    PH, PW = _position_grid(H, W, S, DOWN)
    PHW = PH * PW
    Cg = C // G
    n_cb = tl.cdiv(Cg, BLOCK_C)
    pb, _, ng = _program_block(tl.cdiv(PHW, BLOCK_P), 1)
    p, p_ok, h, w, sub, sub_ok, opix = _position_block(pb, PH, PW, UP, SS_PAD, BLOCK_P)
    pix_ok = p_ok[:, None] & sub_ok[None, :]
    mbase, mpix, tap_stride, mstride = _mask_layout(ng, G, p, sub, opix, PHW, KK, SS, FUSED, CL)
    fh = h * FS
    fw = w * FS
    fp = fh * W + fw

    if FUSED:
        logit_base = logit_ptr + mbase
        m_run = tl.full([BLOCK_P, SS_PAD], float("-inf"), tl.float32)
        s_run = tl.zeros([BLOCK_P, SS_PAD], tl.float32)
        for t in range(KK):
            logit = tl.load(logit_base + t * tap_stride + mpix, mask=pix_ok, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_run, logit)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # NB: -inf logits give 0, not NaN
            s_run = s_run * tl.exp(m_run - m_ref) + tl.exp(logit - m_ref)
            m_run = m_new
        lse = m_run + tl.log(s_run)
        # lse of group g, sub-pixel sub at p: (n*G + g)*SS*PHW + sub*PHW + p (NCHW in either layout)
        tl.store(lse_ptr + ng * SS * PHW + sub[None, :] * PHW + p[:, None], lse, mask=pix_ok)
    if GRAD_MASKS:  # else (FUSED, a features-only backward): lse was all that was asked
        # dL/dmask_t accumulated over channel blocks in dp (fp32); only this program touches these elements.
        if ACC_IN_GRAD:
            dp_base = grad_ptr + mbase
        else:
            dp_base = dp_ptr + mbase
        for cb in range(n_cb):
            tl.debug_barrier()  # NB: last block's stores visible before this block's read-modify-write
            c_ok, chan = _channel_block(cb, ng, Cg, BLOCK_C)
            gbase, gstride = _chan_base(chan, C, PHW * SS, CL)
            go = tl.load(gout_ptr + gbase[:, None, None] + (opix * gstride)[None, :, :],
                         mask=c_ok[:, None, None] & pix_ok[None, :, :], other=0.0).to(tl.float32)
            fbase, fstride = _chan_base(chan, C, HW, CL)
            feat_rows = feat_ptr + fbase[:, None]
            for ky in range(K):
                hh = fh + (ky - R)
                row_ok = p_ok & (hh >= 0) & (hh < H)
                for kx in range(K):
                    # NB: not `f, _ =`: `_` holds an int above, and Triton refuses a loop-carried
                    # variable whose type changes
                    f, _inside = _tap_features(feat_rows, fstride, fp, fw, row_ok, c_ok, ky - R, kx - R, W)
                    contrib = tl.sum(go * f[:, :, None], axis=0)                    # [BLOCK_P, SS_PAD]
                    ptrs = dp_base + (ky * K + kx) * tap_stride + mpix
                    prev = tl.load(ptrs, mask=pix_ok & (cb > 0), other=0.0)
                    tl.store(ptrs, prev + contrib, mask=pix_ok)

        if FUSED:
            # Softmax backward: dlogit_t = prob_t * (dprob_t - sum_t' prob_t' * dprob_t').
            tl.debug_barrier()
            dot = tl.zeros([BLOCK_P, SS_PAD], tl.float32)
            for t in range(KK):
                prob = tl.exp(tl.load(logit_base + t * tap_stride + mpix, mask=pix_ok, other=0.0).to(tl.float32) - lse)
                dot += prob * tl.load(dp_base + t * tap_stride + mpix, mask=pix_ok, other=0.0)
            tl.debug_barrier()  # NB: with ACC_IN_GRAD the writes below overwrite dp: the dot pass reads first
            grad_base = grad_ptr + mbase
            for t in range(KK):
                prob = tl.exp(tl.load(logit_base + t * tap_stride + mpix, mask=pix_ok, other=0.0).to(tl.float32) - lse)
                dprob = tl.load(dp_base + t * tap_stride + mpix, mask=pix_ok, other=0.0)
                tl.store(grad_base + t * tap_stride + mpix, (prob * (dprob - dot)).to(grad_ptr.dtype.element_ty),
                         mask=pix_ok)
        elif not ACC_IN_GRAD:  # half types: cast the fp32 accumulator into the output
            tl.debug_barrier()
            grad_base = grad_ptr + mbase
            for t in range(KK):
                dprob = tl.load(dp_base + t * tap_stride + mpix, mask=pix_ok, other=0.0)
                tl.store(grad_base + t * tap_stride + mpix, dprob.to(grad_ptr.dtype.element_ty), mask=pix_ok)


@triton.jit
def _carafe_bwd_feat(
    gout_ptr,   # (N, C, H*S, W*S) grad of the output, input dtype
    mask_ptr,   # FUSED=False: masks (N, G*K*K, H*S, W*S); FUSED=True: mask_logits (N, G*K*K*S*S, H, W)
    lse_ptr,    # FUSED: (N, G*S*S, H, W) fp32 logsumexp written by _carafe_bwd_mask; else unused
    gfeat_ptr,  # (N, C, H, W) grad features, input dtype (written)
    C,          # int: channels
    H,          # int: low-res height
    W,          # int: low-res width
    G,          # int: groups
    K: tl.constexpr,        # kernel_size
    S: tl.constexpr,        # scale_factor
    SS_PAD: tl.constexpr,   # next power of two >= S*S
    FUSED: tl.constexpr,    # mask_ptr holds logits (probabilities recomputed as exp(logit - lse))
    CL: tl.constexpr,       # gout, mask and gfeat are channels_last (lse is always NCHW)
    BLOCK_C: tl.constexpr,  # channels of one group per program
    BLOCK_P: tl.constexpr,  # low-res positions per program
):
    # Index layout: pid = ((n*G + g) * n_cb + cb) * n_pb + pb, as in _carafe_fwd.
    # For tap t = (ky, kx) the feature at p was read by the output pixels of q = p + (R - ky, R - kx);
    # tiles: grad_out at q [BLOCK_C, BLOCK_P, SS_PAD], masks of tap t at q [BLOCK_P, SS_PAD];
    # acc [BLOCK_C, BLOCK_P, SS_PAD] is reduced over the sub-pixel axis once at the end.
    R: tl.constexpr = (K - 1) // 2
    KK: tl.constexpr = K * K
    SS: tl.constexpr = S * S
    HW = H * W
    Ws = W * S
    HWs = HW * SS
    Cg = C // G
    pb, cb, ng = _program_block(tl.cdiv(HW, BLOCK_P), tl.cdiv(Cg, BLOCK_C))
    c_ok, chan = _channel_block(cb, ng, Cg, BLOCK_C)
    p, p_ok, h, w, sub, sub_ok, opix = _position_block(pb, H, W, S, SS_PAD, BLOCK_P)
    # masks of tap t at p: mask_base + t * tap_stride + mpix (logit-layout pixels of p when FUSED, else opix)
    mbase, mpix, tap_stride, mstride = _mask_layout(ng, G, p, sub, opix, HW, KK, SS, FUSED, CL)
    mask_base = mask_ptr + mbase

    gbase, gstride = _chan_base(chan, C, HWs, CL)
    gout_rows = gout_ptr + gbase[:, None, None]                                  # [BLOCK_C, 1, 1]
    if FUSED:
        lse_base = lse_ptr + ng * SS * HW
        lpix = sub[None, :] * HW + p[:, None]                                     # lse is NCHW

    acc = tl.zeros([BLOCK_C, BLOCK_P, SS_PAD], tl.float32)
    for ky in range(K):
        dy = R - ky
        qh = h + dy
        row_ok = p_ok & (qh >= 0) & (qh < H)
        for kx in range(K):
            dx = R - kx
            qw = w + dx
            q_ok = row_ok & (qw >= 0) & (qw < W)
            qpix_ok = q_ok[:, None] & sub_ok[None, :]
            t = ky * K + kx
            # output pixels of q = those of p shifted by (dy*S, dx*S)
            go = tl.load(gout_rows + ((opix + (dy * S * Ws + dx * S)) * gstride)[None, :, :],
                         mask=c_ok[:, None, None] & qpix_ok[None, :, :], other=0.0).to(tl.float32)
            if FUSED:
                qoff = dy * W + dx
                logit = tl.load(mask_base + t * tap_stride + mpix + qoff * mstride, mask=qpix_ok,
                                other=0.0).to(tl.float32)
                q_lse = tl.load(lse_base + lpix + qoff, mask=qpix_ok, other=0.0)
                m = tl.exp(logit - q_lse)
            else:
                m = tl.load(mask_base + t * tap_stride + mpix + (dy * S * Ws + dx * S) * mstride, mask=qpix_ok,
                            other=0.0).to(tl.float32)
            acc += go * m[None, :, :]

    gf = tl.sum(acc, axis=2)                                                    # [BLOCK_C, BLOCK_P]
    fbase, fstride = _chan_base(chan, C, HW, CL)
    tl.store(gfeat_ptr + fbase[:, None] + (p * fstride)[None, :], gf.to(gfeat_ptr.dtype.element_ty),
             mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def _carafe_down_bwd_feat(
    gout_ptr,   # (N, C, Ho, Wo) grad of the output, input dtype; Ho = ceil(H/S), Wo = ceil(W/S)
    mask_ptr,   # FUSED=False: masks; FUSED=True: mask_logits; both (N, G*K*K, Ho, Wo)
    lse_ptr,    # FUSED: (N, G, Ho, Wo) fp32 logsumexp written by _carafe_bwd_mask (DOWN); else unused
    gfeat_ptr,  # (N, C, H, W) grad features, input dtype (written)
    C,          # int: channels
    H,          # int: features height
    W,          # int: features width
    G,          # int: groups
    K: tl.constexpr,        # kernel_size
    S: tl.constexpr,        # scale_factor (the downsampling stride)
    SS_PAD: tl.constexpr,   # next power of two >= S*S: the phase axis
    FUSED: tl.constexpr,    # mask_ptr holds logits (probabilities recomputed as exp(logit - lse))
    CL: tl.constexpr,       # gout, mask and gfeat are channels_last (lse is always NCHW)
    BLOCK_C: tl.constexpr,  # channels of one group per program
    BLOCK_P: tl.constexpr,  # output positions per program
):
    # grad features of the content-aware downsampling, a gather (one writer per element, no atomics).
    # Index layout as _carafe_fwd: pid = ((n*G + g) * n_cb + cb) * n_pb + pb over output positions
    # p = (i, j); the program writes the S x S feature pixels (S*i + a, S*j + b) of its positions, the
    # phase axis ph = a*S + b taking the place of the up kernels' sub-pixel axis.
    # Feature row y = S*i + a was read through tap row ky by output row i + di exactly when
    # ky = a + R - S*di; so the loops run over the output offsets (di, dj) that some phase reaches,
    # and each phase reads its own tap t = ky*K + kx of position q = (i + di, j + dj) (masked where ky
    # or kx falls outside [0, K)): every (feature pixel, tap) pair once, in a fixed order.
    # Tiles: grad_out at q [BLOCK_C, BLOCK_P] (shared by the phases), masks at q [BLOCK_P, SS_PAD],
    # acc [BLOCK_C, BLOCK_P, SS_PAD].
    R: tl.constexpr = (K - 1) // 2
    D_LO: tl.constexpr = -(R // S)          # the output offsets di (and dj) some phase reaches
    D_HI: tl.constexpr = (R + S - 1) // S
    HW = H * W
    PH, PW = _position_grid(H, W, S, True)
    PHW = PH * PW
    Cg = C // G
    pb, cb, ng = _program_block(tl.cdiv(PHW, BLOCK_P), tl.cdiv(Cg, BLOCK_C))
    c_ok, chan = _channel_block(cb, ng, Cg, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < PHW
    i = p // PW
    j = p % PW
    ph = tl.arange(0, SS_PAD)
    a = ph // S
    b = ph % S
    ph_ok = ph < S * S
    # masks / logits of tap t at q = p + qoff: mask_base + t * tap_stride + mpix + qoff * mstride (the
    # down layout is the fused up layout with one sub-pixel)
    one = tl.arange(0, 1)
    mbase, mpix, tap_stride, mstride = _mask_layout(ng, G, p, one, p[:, None], PHW, K * K, 1, FUSED, CL)
    mask_base = mask_ptr + mbase
    gbase, gstride = _chan_base(chan, C, PHW, CL)
    gout_rows = gout_ptr + gbase[:, None]                                        # [BLOCK_C, 1]
    if FUSED:
        lse_base = lse_ptr + ng * PHW

    acc = tl.zeros([BLOCK_C, BLOCK_P, SS_PAD], tl.float32)
    for di in range(D_LO, D_HI + 1):
        ky = a + R - S * di                                                      # [SS_PAD]
        qi = i + di
        row_ok = p_ok & (qi >= 0) & (qi < PH)
        for dj in range(D_LO, D_HI + 1):
            kx = b + R - S * dj
            tap_ok = ph_ok & (ky >= 0) & (ky < K) & (kx >= 0) & (kx < K)
            qj = j + dj
            q_ok = row_ok & (qj >= 0) & (qj < PW)                                # [BLOCK_P]
            qoff = di * PW + dj
            go = tl.load(gout_rows + ((p + qoff) * gstride)[None, :], mask=c_ok[:, None] & q_ok[None, :],
                         other=0.0).to(tl.float32)
            m_ok = q_ok[:, None] & tap_ok[None, :]
            m_ptrs = mask_base + (ky * K + kx)[None, :] * tap_stride + mpix + qoff * mstride
            if FUSED:
                logit = tl.load(m_ptrs, mask=m_ok, other=float("-inf")).to(tl.float32)  # masked: weight 0
                q_lse = tl.load(lse_base + p + qoff, mask=q_ok, other=0.0)
                m = tl.exp(logit - q_lse[:, None])
            else:
                m = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            acc += go[:, :, None] * m[None, :, :]

    y = i[:, None] * S + a[None, :]                                              # [BLOCK_P, SS_PAD]
    x = j[:, None] * S + b[None, :]
    f_ok = p_ok[:, None] & ph_ok[None, :] & (y < H) & (x < W)  # the ragged last row/column of phases
    fbase, fstride = _chan_base(chan, C, HW, CL)
    tl.store(gfeat_ptr + fbase[:, None, None] + ((y * W + x) * fstride)[None, :, :],
             acc.to(gfeat_ptr.dtype.element_ty), mask=c_ok[:, None, None] & f_ok[None, :, :])


# --------------------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------------------

# Whether @triton.jit gave interpreted kernels (TRITON_INTERPRET=1 was set when this module was imported).
INTERPRET: bool = type(_carafe_fwd).__name__ == "InterpretedFunction"

_KEY = ["C", "H", "W", "G", "K", "S", "FUSED", "CL"]  # plus the tensor dtypes, which the autotuner appends
_FWD_KEY = _KEY + ["DOWN"]  # the kernels shared by CARAFE and the down ops
_MASK_KEY = _FWD_KEY + ["GRAD_MASKS"]  # the mask-gradient kernel: its lse-only variant is timed on its own
# Registers for the fp32 accumulator tile: BLOCK_C * BLOCK_P * SS_PAD <= _ACC_PER_THREAD * threads.
_ACC_PER_THREAD = 32


def _config(block_p: int, block_c: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_P, BLOCK_C, num_warps, num_stages) candidates, fitted to each call's shape by _fit_configs.
# Eight per kernel: every new key compiles and times all of them. Wide channel blocks amortise the
# per-program mask loads and exps; num_stages matters little here (no tl.dot to pipeline), so only two
# candidates try 2.
_FWD_CONFIGS = [_config(*c) for c in ((32, 16, 4, 1), (64, 16, 4, 1), (32, 32, 4, 1), (16, 64, 4, 1),
                                      (64, 32, 8, 1), (32, 64, 8, 1), (128, 16, 8, 2), (64, 16, 4, 2))]
_BWD_FEAT_CONFIGS = _FWD_CONFIGS
_BWD_MASK_CONFIGS = [_config(*c) for c in ((16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1), (32, 32, 8, 1),
                                           (64, 16, 8, 1), (8, 32, 2, 1), (32, 16, 4, 2), (16, 32, 4, 2))]
# Under the interpreter one config (no benchmarking); blocks large enough that tiny test shapes need
# one or two programs per (image, group), which is what dominates the interpreter's run time.
_INTERPRET_CONFIGS = [_config(64, 8, 4, 1)]


def _fit_configs(configs, named_args, down: bool | None = None, **kwargs):
    """early_config_prune: clamp the blocks to the call's shape, keep the accumulator tile within the
    register budget, and drop the duplicates this creates. Always returns at least one config.
    down: the positions are the output pixels of the down ops (default: the kernel's DOWN argument;
    True for _carafe_down_bwd_feat, which has none)."""
    C, G, H, W, S, ss_pad = (int(named_args[n]) for n in ("C", "G", "H", "W", "S", "SS_PAD"))
    if down is None:
        down = bool(named_args.get("DOWN", False))
    positions = ((H + S - 1) // S) * ((W + S - 1) // S) if down else H * W
    cg_pad = max(2, next_pow2(C // max(G, 1)))
    hw_pad = max(2, next_pow2(positions))
    fitted, seen = [], set()
    for cfg in configs:
        bc = min(cfg.kwargs["BLOCK_C"], cg_pad)
        bp = min(cfg.kwargs["BLOCK_P"], hw_pad)
        budget = _ACC_PER_THREAD * 32 * cfg.num_warps
        while bc * bp * ss_pad > budget and bp > 2:
            bp //= 2
        while bc * bp * ss_pad > budget and bc > 2:
            bc //= 2
        key = (bp, bc, cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            fitted.append(_config(*key))
    return fitted


def _down_fit_configs(configs, named_args, **kwargs):
    return _fit_configs(configs, named_args, down=True, **kwargs)


def _autotuned(fn, configs, key=_KEY, prune=_fit_configs):
    if INTERPRET:
        return triton.autotune(configs=_INTERPRET_CONFIGS, key=key)(fn)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)


def _fixed(fn, configs, key=_KEY, prune=_fit_configs):
    # One candidate, fitted to the shape by the same prune: nothing is timed, so every process picks the
    # same blocks for the same shape, and with them the same summation order.
    if INTERPRET:
        return _autotuned(fn, configs, key)
    return triton.autotune(configs=configs[:1], key=key, prune_configs_by={"early_config_prune": prune})(fn)


carafe_fwd_kernel = _autotuned(_carafe_fwd, _FWD_CONFIGS, _FWD_KEY)
carafe_bwd_mask_kernel = _autotuned(_carafe_bwd_mask, _BWD_MASK_CONFIGS, _MASK_KEY)
carafe_bwd_feat_kernel = _autotuned(_carafe_bwd_feat, _BWD_FEAT_CONFIGS)
carafe_down_bwd_feat_kernel = _autotuned(_carafe_down_bwd_feat, _BWD_FEAT_CONFIGS, prune=_down_fit_configs)
_FIXED_SHARED = (_fixed(_carafe_fwd, _FWD_CONFIGS, _FWD_KEY), _fixed(_carafe_bwd_mask, _BWD_MASK_CONFIGS, _MASK_KEY))
_FIXED = {False: (*_FIXED_SHARED, _fixed(_carafe_bwd_feat, _BWD_FEAT_CONFIGS)),
          True: (*_FIXED_SHARED, _fixed(_carafe_down_bwd_feat, _BWD_FEAT_CONFIGS, prune=_down_fit_configs))}


def launchers(deterministic: bool | None = None, down: bool = False):
    """(forward, mask-gradient, features-gradient) kernels to launch; down: those of the down ops (the
    same forward and mask-gradient kernels, which they run with DOWN=True, and _carafe_down_bwd_feat).
    Autotuned ones time their candidates in each process, and the chosen channel block sets the summation order of the
    mask-gradient reduction, so results may differ bitwise between processes; under
    torch.use_deterministic_algorithms(True) (deterministic=None reads it) or CARAFE_TRITON_AUTOTUNE=0
    the fixed-config kernels run instead: bitwise reproducible, and nothing to compile but one config."""
    import os

    import torch
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic or os.environ.get("CARAFE_TRITON_AUTOTUNE") == "0":
        return _FIXED[down]
    return carafe_fwd_kernel, carafe_bwd_mask_kernel, carafe_down_bwd_feat_kernel if down else carafe_bwd_feat_kernel
