"""The fused native decode kernels (nemotron3/kernels/cpu_decode.c) against float64 references.

Inputs are float32 from a seeded generator; the references get the same values upcast, so a difference is
the kernel's own float32 arithmetic (unit roundoff u = 2^-24 ≈ 6e-8).
* Experts: two chained dot products of ≤ 64 terms and a weighted sum over k ≤ 4 experts. A length-n float32
  dot has relative error ≲ √n·u in practice (≈ 5e-7 at n = 64); measured ≤ 3e-7 relative L2. We allow
  2e-6 (relative L2) and 10× that on the relative max. A wrong expert, slot weight or row gives errors ~1.
* Decode attention: d-term score dots, a softmax whose exponentials come from a degree-6 polynomial (≤ 1.2e-7
  relative truncation, plus rounding), and a value sum over ≤ 700 keys: measured ≤ 4e-7 relative; we allow 2e-6.
* Mamba step: a K-tap conv, softplus/exp, an n-term dot for y and a group RMS norm: measured ≤ 3e-7
  relative; we allow 2e-6 on the output and on both updated state pools.
"""

from __future__ import annotations

import contextlib
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from nemotron3.kernels import native
from nemotron3.model.fused import fast_path
from nemotron3.model.mamba2 import Mamba2Mixer, ssd_chunk_scan
from nemotron3.model.moe import Experts
from tests.model.helpers import small_config
from tests.model.reference import attention_ref, causal_conv1d_ref, route_ref, ssm_scan_ref, ssm_step_ref
from tests.model.test_kernels import assert_close_rel, rel_err

RTOL = 2e-6
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built (no C compiler)")
f64 = torch.float64


@contextlib.contextmanager
def plain_c_build(enabled: bool = True):
    """Inside the block the kernels are the plain-C build (-mno-avx512f: a CPU without AVX-512) when enabled; the
    library in use before comes back after."""
    before = native.library()
    try:
        if enabled:
            native.use(native.load(native.build(extra_flags=("-mno-avx512f",))))
        yield
    finally:
        native.use(before)


def test_kernels_build_where_a_compiler_exists():
    """Where cc exists (CI, the dev machine) the kernels must build: otherwise the fast path silently vanishes."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.available(), "a C compiler is present but nemotron3/kernels/cpu_decode.c did not build"


def experts_ref(x, up, down, indices, weights) -> torch.Tensor:
    """Σ_j w_j · down_e (relu(up_e x)²) per token, a literal float64 loop."""
    x, up, down, weights = (v.to(f64) for v in (x, up, down, weights))
    out = torch.zeros(x.shape[0], down.shape[1], dtype=f64)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            out[t] += weights[t, j] * (down[e] @ torch.relu(up[e] @ x[t]) ** 2)
    return out


def expert_inputs(T, E, k, F_, L, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, L, generator=g)
    up = torch.randn(E, F_, L, generator=g) / math.sqrt(L)
    down = torch.randn(E, L, F_, generator=g) / math.sqrt(F_)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g) * 2.5
    return x, up, down, indices, weights


@needs_native
@pytest.mark.parametrize(
    ("T", "E", "k", "F_", "L"), [(1, 8, 2, 24, 32), (1, 16, 4, 64, 96), (3, 16, 4, 40, 17), (8, 6, 6, 64, 48), (32, 16, 4, 33, 64)]
)
def test_experts_match_float64(T, E, k, F_, L):
    for seed in range(3):
        x, up, down, indices, weights = expert_inputs(T, E, k, F_, L, seed)
        if seed == 2:  # rows of a wider buffer, read in place
            x = torch.zeros(T, L + 5)[:, 2 : 2 + L].copy_(x)
        out = native.experts(x, up, down, indices, weights)
        assert out is not None and out.dtype == torch.float32
        assert_close_rel(out, experts_ref(x, up, down, indices, weights), RTOL, f"experts T={T} seed={seed}")


@needs_native
def test_experts_module_takes_the_kernel_and_agrees_with_its_torch_loop():
    """Experts.forward: ≤ native_max_tokens tokens go to the kernel, more to the loop; both give the same sums."""
    torch.manual_seed(0)
    mod = Experts(8, 20, 24)
    with torch.no_grad():
        mod.up_proj.normal_(0, 0.2)
        mod.down_proj.normal_(0, 0.2)
    x, _, _, indices, weights = expert_inputs(5, 8, 3, 24, 20, seed=4)
    with torch.inference_mode(), fast_path():
        fused = mod(x, weights, indices)
        mod.native_max_tokens = 0
        looped = mod(x, weights, indices)
    assert_close_rel(fused, looped.double(), RTOL, "kernel vs loop")


@needs_native
@pytest.mark.parametrize(("norm", "scale"), [(True, 2.5), (False, 1.0)])
def test_route_experts_matches_float64_router_and_experts(norm, scale):
    """Routing in the kernel: same experts as the float64 router (bias steers the choice, not the weights)."""
    T, E, k, F_, L = 4, 16, 4, 40, 24
    x, up, down, _, _ = expert_inputs(T, E, k, F_, L, seed=7)
    g = torch.Generator().manual_seed(8)
    fused = torch.randn(T, E + L + 9, generator=g)  # logits and x: strided rows, slices of the fused GEMV
    logits, x = fused[:, 3 : 3 + E], fused[:, 3 + E : 3 + E + L].copy_(x)
    bias = torch.rand(E, generator=g) * 0.2 - 0.1
    out = native.route_experts(logits, bias, k, norm, scale, x, up, down)
    w_ref, i_ref = route_ref(logits, bias, k, 1, 1, norm, scale)
    assert out is not None
    assert_close_rel(out, experts_ref(x, up, down, i_ref, w_ref), RTOL, f"route+experts norm={norm}")


@needs_native
@pytest.mark.parametrize(("T", "E", "k", "norm"), [(1, 8, 2, True), (300, 16, 4, True), (77, 32, 4, False)])
def test_moe_dispatch_groups_by_expert_and_combine_weights_like_float64(T, E, k, norm):
    """Prefill routing: the float64 router's experts and weights, each expert's tokens one block in token order;
    experts applied per block then combined give the float64 experts' sums."""
    L, F_ = 24, 40
    x, up, down, _, _ = expert_inputs(T, E, k, F_, L, seed=T)
    g = torch.Generator().manual_seed(E)
    fused = torch.randn(T, E + L + 5, generator=g)  # logits and x: strided rows, as slices of the fused GEMM
    logits, x = fused[:, :E], fused[:, E : E + L].copy_(x)
    bias = torch.rand(E, generator=g) * 0.2 - 0.1
    xs, counts, where, w = native.moe_dispatch(logits, bias, k, norm, 2.5, x)
    w_ref, i_ref = route_ref(logits, bias, k, 1, 1, norm, 2.5)
    assert_close_rel(w, w_ref, RTOL, "routing weights")
    assert sum(counts) == T * k and counts == torch.bincount(i_ref.flatten(), minlength=E).tolist()
    pairs = sorted(range(T * k), key=lambda p: (int(i_ref.flatten()[p]), p))  # by expert, then token: stable
    assert where[torch.tensor(pairs)].tolist() == list(range(T * k))
    assert torch.equal(xs, x[torch.tensor(pairs) // k])
    ys, start = torch.empty_like(xs), 0
    for e, n in enumerate(counts):
        ys[start : start + n] = torch.relu(xs[start : start + n] @ up[e].t()) ** 2 @ down[e].t()
        start += n
    out = torch.full((T, L + 3), float("nan"))[:, 3:]  # columns of a wider buffer, fully overwritten
    native.moe_combine(ys, where, w, out)
    assert_close_rel(out, experts_ref(x, up, down, i_ref, w_ref), RTOL, "dispatch + experts + combine")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lone_tokens_expert_rows_sum_alike_four_at_a_time_or_one(dtype):
    """An expert with one token dots its rows 4 at a time (dot4_rows) and the rows left over one at a time
    (dot_many); both must sum in the same order. Row 4 of up is row 0 again, and down copies h[0] and h[4] to
    outputs 0 and 1 (a 1 among exact zeros), so the two outputs are equal bit for bit only if they do."""
    L, F_ = 85, 5  # 85 columns: a 64-column step, a 16-column one, a masked tail; 5 rows: a block of 4, one alone
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, L, generator=g)
    up = torch.randn(2, F_, L, generator=g)
    up[:, 0] *= torch.sign(up[:, 0] @ x[0])[:, None]  # a positive pre-activation, so relu² keeps it
    up[:, 4] = up[:, 0]
    down = torch.zeros(2, L, F_)
    down[:, 0, 0] = down[:, 1, 4] = 1.0
    out = native.experts(x, up.to(dtype), down.to(dtype), torch.tensor([[1]]), torch.ones(1, 1))
    assert out is not None and out[0, 0] > 0
    assert out[0, 0].item() == out[0, 1].item()


@needs_native
def test_experts_reject_an_out_of_range_index():
    x, up, down, indices, weights = expert_inputs(2, 4, 2, 8, 16, seed=0)
    indices[1, 0] = 4
    with pytest.raises(ValueError, match="expert index"):
        native.experts(x, up, down, indices, weights)


def test_experts_decline_what_they_do_not_take():
    """bf16 inputs, autograd, or transposed storage: None, so the caller runs the torch loop."""
    x, up, down, indices, weights = expert_inputs(2, 4, 2, 8, 16, seed=0)
    assert native.experts(x.bfloat16(), up.bfloat16(), down.bfloat16(), indices, weights) is None
    assert native.experts(x, up.requires_grad_(), down, indices, weights) is None
    assert native.experts(x, up.detach().transpose(1, 2).contiguous().transpose(1, 2), down, indices, weights) is None


def mamba_step_ref(mixer: Mamba2Mixer, proj: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, lo_hi):
    """The decode step from the reference kernels, float64: returns (out [b, I], new conv, new ssm)."""
    I, C, nh = mixer.inner, mixer.conv_dim, mixer.num_heads
    P, N, G = mixer.head_dim, mixer.state_size, mixer.n_groups
    proj = proj.to(f64)
    z, xbc, dt = proj[:, :I], proj[:, I : I + C], proj[:, I + C :]
    w = mixer.conv1d.weight.detach().to(f64).squeeze(1)
    u, new_conv = causal_conv1d_ref(xbc[:, None], w, mixer.conv1d.bias.detach().to(f64), conv.to(f64))
    u = F.silu(u[:, 0])
    x, B, Cm = u[:, :I], u[:, I : I + G * N], u[:, I + G * N :]
    delta = F.softplus(dt + mixer.dt_bias.detach().to(f64)).clamp(*lo_hi)
    A = -torch.exp(mixer.A_log.detach().to(f64))
    b = proj.shape[0]
    xh = x.reshape(b, nh, P)
    y, new_ssm = ssm_step_ref(ssm, xh, delta, A, B.reshape(b, G, N), Cm.reshape(b, G, N))
    y = (y + xh * mixer.D.detach().to(f64)[:, None]).reshape(b, I)
    g = (y * F.silu(z)).reshape(b, mixer.norm.groups, -1)
    g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)
    return mixer.norm.weight.detach().to(f64) * g.reshape(b, I), new_conv, new_ssm


def random_mixer(g: torch.Generator, **overrides) -> Mamba2Mixer:
    """A small Mamba2Mixer (6 heads in 3 groups, state 12, head 8, conv 4) with every parameter ~ N(0, 0.25)."""
    sizes = dict(mamba_num_heads=6, n_groups=3, ssm_state_size=12, mamba_head_dim=8, conv_kernel=4)
    torch.manual_seed(1)
    mixer = Mamba2Mixer(small_config("M", **{**sizes, **overrides}))
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return mixer


@needs_native
@pytest.mark.parametrize("lo_hi", [(-math.inf, math.inf), (0.05, 0.4)])
def test_mamba_step_matches_float64_on_scattered_slots(lo_hi):
    g = torch.Generator().manual_seed(2)
    mixer = random_mixer(g)
    S, b = 7, 3
    slots = torch.tensor([5, 0, 3])
    conv = torch.randn(S, mixer.conv_dim, mixer.kernel - 1, generator=g)
    ssm = torch.randn(S, mixer.num_heads, mixer.head_dim, mixer.state_size, generator=g)
    row = mixer.inner + mixer.conv_dim + mixer.num_heads
    proj = torch.randn(b, row + 5, generator=g)[:, :row]  # rows with a stride, as a slice of in_proj's output
    ref_out, ref_conv, ref_ssm = mamba_step_ref(mixer, proj, conv[slots], ssm[slots], lo_hi)
    conv0, ssm0 = conv.clone(), ssm.clone()
    with torch.inference_mode():
        out = native.mamba_step(mixer, proj, slots, conv, ssm, lo_hi)
    assert out is not None
    assert_close_rel(out, ref_out, RTOL, "mamba step output")
    assert_close_rel(conv[slots], ref_conv, RTOL, "conv window")
    assert_close_rel(ssm[slots], ref_ssm, RTOL, "ssm state")
    untouched = [i for i in range(S) if i not in slots.tolist()]
    assert torch.equal(conv[untouched], conv0[untouched]) and torch.equal(ssm[untouched], ssm0[untouched])


@needs_native
@pytest.mark.parametrize(("t", "portable"), [(1, False), (2, False), (45, False), (130, False), (45, True)])
@pytest.mark.parametrize("lo_hi", [(1e-3, math.inf), (0.05, 0.4)])
@pytest.mark.parametrize("outputs", native.MAMBA_OUTPUTS)
def test_mamba_prefill_matches_the_float64_recurrence(t, portable, lo_hi, outputs):
    """The fused prefill (conv from the entering window, SiLU, chunked scan, D skip, gated norm) against the
    decode step's float64 reference applied token by token from the same states. t = 1 and 2 are shorter than
    the conv window (K − 1 = 3), so the new window mixes old state and new inputs; 45 and 130 are not multiples
    of the chunk (16). `portable`: the plain-C build (-mno-avx512f). outputs "last" / "none": the last token's
    row (from the final state) or none, the states the same; z is NaN in the rows not returned, so reading it
    would show."""
    with plain_c_build(portable):
        _check_mamba_prefill(t, lo_hi, outputs)


def test_mamba_prefill_rejects_unknown_outputs():
    mixer = random_mixer(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="outputs"):
        native.mamba_prefill(mixer, torch.zeros(2, 8), torch.zeros(1), torch.zeros(1), (0.0, 1.0), outputs="first")


def _check_mamba_prefill(t, lo_hi, outputs="all"):
    g = torch.Generator().manual_seed(3)
    mixer = random_mixer(g, chunk_size=16)
    conv = torch.randn(mixer.conv_dim, mixer.kernel - 1, generator=g)
    ssm = torch.randn(mixer.num_heads, mixer.head_dim, mixer.state_size, generator=g)
    row = mixer.inner + mixer.conv_dim + mixer.num_heads
    proj = torch.randn(t, row + 3, generator=g)[:, :row]  # rows of a wider buffer
    ref_conv, ref_ssm, ref_out = conv[None].double(), ssm[None].double(), []
    for i in range(t):
        out_i, ref_conv, ref_ssm = mamba_step_ref(mixer, proj[i : i + 1], ref_conv, ref_ssm, lo_hi)
        ref_out.append(out_i)
    kept = {"all": t, "last": 1, "none": 0}[outputs]
    proj[: t - kept, : mixer.inner] = math.nan  # z of the rows not returned
    with torch.inference_mode():
        out = native.mamba_prefill(mixer, proj, conv, ssm, lo_hi, outputs)
    assert out is not None and out.shape == (kept, mixer.inner)
    if kept:
        assert_close_rel(out, torch.cat(ref_out)[t - kept :], RTOL, f"prefill output t={t}")
    assert_close_rel(conv, ref_conv[0], RTOL, "conv window")
    assert_close_rel(ssm, ref_ssm[0], RTOL, "ssm state")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NEMOTRON3_NATIVE", "0")
    native.reset()
    try:
        assert native.library() is None and not native.available()
        x, up, down, indices, weights = expert_inputs(2, 4, 2, 8, 16, seed=0)
        assert native.experts(x, up, down, indices, weights) is None
    finally:
        monkeypatch.delenv("NEMOTRON3_NATIVE")
        native.reset()


@needs_native
@pytest.mark.parametrize(("nq", "nkv", "d"), [(8, 2, 64), (6, 1, 12), (12, 4, 20), (64, 2, 16)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_scattered_blocks_like_float64(nq, nkv, d, kv_dtype):
    """Sequences of different lengths whose blocks are out of order and interleaved in the pool; a bf16 pool
    (kv_cache_dtype) is widened exactly as it is read, so float64 on the widened K/V is its reference too."""
    g = torch.Generator().manual_seed(nq + d)
    bs, n_blocks = 4, 400
    k_plane = torch.randn(nkv, n_blocks * bs, d, generator=g).to(kv_dtype)
    v_plane = torch.randn(nkv, n_blocks * bs, d, generator=g).to(kv_dtype)
    lengths = [1, 7, 33, 700]
    perm = torch.randperm(n_blocks, generator=g).tolist()
    tables, offsets, start = [], [], 0
    for n_keys in lengths:
        blocks = perm[start : start + -(-n_keys // bs)]
        start += len(blocks)
        offsets.append(len(tables))
        tables += blocks
    qkv = torch.randn(len(lengths), (nq + 2 * nkv) * d, generator=g) * 2.0
    q = qkv[:, : nq * d].view(len(lengths), nq, d)  # rows of a fused qkv projection, read in place
    out = native.decode_attention(
        q, k_plane, v_plane, torch.tensor(tables), torch.tensor(offsets), torch.tensor(lengths), bs
    )
    assert out is not None
    for s, n_keys in enumerate(lengths):
        blocks = tables[offsets[s] : offsets[s] + -(-n_keys // bs)]
        rows = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n_keys)])
        ref = attention_ref(q[s][None, :, None], k_plane[:, rows][None], v_plane[:, rows][None])[0, :, 0]
        assert_close_rel(out[s], ref, RTOL, f"sequence {s} ({n_keys} keys)")


@needs_native
@pytest.mark.parametrize(
    ("tq", "tk", "nq", "nkv", "d", "portable"),
    [
        (70, 70, 8, 2, 64, False),  # a whole prompt: 3 token blocks (32), 2 key blocks (64), GQA 4
        (33, 130, 6, 3, 20, False),  # a later chunk over earlier keys; d not a multiple of 16
        (2, 9, 4, 4, 16, False),  # a 2-token verify row, no GQA
        (1, 1, 2, 1, 8, False),  # one token seeing only itself
        (40, 100, 8, 2, 12, True),  # the plain-C build (-mno-avx512f)
    ],
)
def test_prefill_attention_matches_float64(tq, tk, nq, nkv, d, portable):
    """The chunk's causal GQA attention against the float64 loop (attention_ref), with q read in place from the
    rows of a fused qkv projection and K/V as strided views of a wider cache plane. Products of ≤ 130 terms, an
    online softmax and a polynomial exp: measured ≤ 5e-7 relative; we allow RTOL."""
    g = torch.Generator().manual_seed(tq * 7 + tk)
    qkv = torch.randn(1, tq, (nq + 2 * nkv) * d, generator=g) * 1.5
    q = qkv[..., : nq * d].view(1, tq, nq, d).transpose(1, 2)
    plane = torch.randn(2, nkv, tk + 11, d, generator=g)  # a pool plane with room past the keys
    k, v = plane[0, :, 3 : 3 + tk], plane[1, :, 3 : 3 + tk]
    with plain_c_build(portable), torch.inference_mode():
        out = native.prefill_attention(q, k, v)
    assert out is not None and out.shape == (1, nq, tq, d)
    assert_close_rel(out, attention_ref(q, k[None], v[None])[0][None], RTOL, f"tq={tq} tk={tk}")


@needs_native
def test_prefill_attention_declines_what_it_cannot_read():
    q = torch.randn(1, 8, 4, 16).transpose(1, 2)  # [1, nq, T, d] with each token's heads adjacent, as qkv gives
    k = v = torch.randn(2, 8, 16)
    assert native.prefill_attention(q, k, v) is not None  # the control
    assert native.prefill_attention(q.double(), k.double(), v.double()) is None  # float32 only
    assert native.prefill_attention(q.contiguous(), k, v) is None  # heads not adjacent within a token
    assert native.prefill_attention(q, k[:, :4], v[:, :4]) is None  # more queries than keys
    assert native.prefill_attention(q, k[..., :8], v[..., :8]) is None  # head sizes differ
    assert native.prefill_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v) is None  # column-major
    assert native.prefill_attention(torch.randn(1, 8, 3, 16).transpose(1, 2), k, v) is None  # 3 heads over 2


@needs_native
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_addresses_runs_of_adjacent_blocks_like_float64(d, kv_dtype):
    """Head sizes 64 and 128 read 16-key groups whose rows are consecutive (a block, or adjacent blocks) from one
    pointer; runs of adjacent block ids mixed with jumps exercise both that path and the per-key pointers."""
    g = torch.Generator().manual_seed(d)
    bs, nkv, nq = 16, 2, 8
    k_plane = torch.randn(nkv, 40 * bs, d, generator=g).to(kv_dtype)
    v_plane = torch.randn(nkv, 40 * bs, d, generator=g).to(kv_dtype)
    tables = [5, 6, 7, 2, 3, 30, 31, 32, 33, 10]  # runs 5-7, 2-3, 30-33 and a lone 10
    q = torch.randn(1, nq, d, generator=g) * 2.0
    for n_keys in (16, 40, 150, 160):
        out = native.decode_attention(
            q, k_plane, v_plane, torch.tensor(tables), torch.tensor([0]), torch.tensor([n_keys]), bs
        )
        rows = torch.tensor([tables[t // bs] * bs + t % bs for t in range(n_keys)])
        ref = attention_ref(q[0][None, :, None], k_plane[:, rows][None], v_plane[:, rows][None])[0, :, 0]
        assert_close_rel(out[0], ref, RTOL, f"d={d} {n_keys} keys")


@needs_native
def test_add_rms_norm_updates_the_residual_and_normalises_like_float64():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 5, 48, generator=g)
    delta = torch.randn(1, 5, 48, generator=g)
    weight = torch.randn(48, generator=g)
    want_h = hidden.double() + delta.double()
    want = weight.double() * want_h / torch.sqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = native.add_rms_norm(hidden, delta, weight, 1e-5)
    assert out is not None
    assert_close_rel(hidden, want_h, RTOL, "residual stream")
    assert_close_rel(out, want, RTOL, "normed")
    assert native.add_rms_norm(hidden, delta[:, :4], weight, 1e-5) is None  # mismatched shapes: declined
    alone = native.add_rms_norm(hidden, None, weight, 1e-5)  # no delta: the norm alone, hidden unchanged
    assert_close_rel(hidden, want_h, RTOL, "residual stream untouched")
    assert_close_rel(alone, want, RTOL, "normed without an add")


@needs_native
@pytest.mark.parametrize(("rows", "cols"), [(1, 5), (37, 48), (300, 129)])
def test_relu2_into_writes_relu_squared_between_strided_views(rows, cols):
    """relu(x)² exactly as torch computes it (one rounding: the square), denormal squares kept, from a column
    slice of one buffer into a column slice of another; the bytes around the destination stay as they were."""
    g = torch.Generator().manual_seed(rows)
    src_buf = torch.randn(rows, cols + 11, generator=g)
    src_buf[:, 4:9] = 1e-20  # squares below float32's smallest normal
    src = src_buf[:, 3 : 3 + cols]
    dst_buf = torch.full((rows, cols + 20), float("nan"))
    dst = dst_buf[:, 8 : 8 + cols]
    assert native.relu2_into(src, dst)
    assert torch.equal(dst, torch.relu(src).square())
    assert dst_buf[:, :8].isnan().all() and dst_buf[:, 8 + cols :].isnan().all()
    assert not native.relu2_into(src, dst[:, 1:])  # mismatched shapes: declined
    assert not native.relu2_into(src.t(), dst.t())  # columns not unit-stride: declined


@needs_native
def test_mamba_step_sees_in_place_updates_and_replaced_parameters():
    """The kernel's cached parameter pointers follow the mixer: in-place edits and new `.data` both count."""
    cfg = small_config("M", mamba_num_heads=4, n_groups=2, ssm_state_size=16, mamba_head_dim=8)
    torch.manual_seed(5)
    mixer = Mamba2Mixer(cfg)
    g = torch.Generator().manual_seed(6)
    row = mixer.inner + mixer.conv_dim + mixer.num_heads
    proj = torch.randn(1, row, generator=g)
    lo_hi = (-math.inf, math.inf)
    for change in (None, "in_place", "new_data"):
        if change == "in_place":
            with torch.no_grad():
                mixer.D.mul_(3.0)
        elif change == "new_data":
            mixer.norm.weight.data = torch.randn(mixer.inner, generator=g)
        conv = torch.randn(2, mixer.conv_dim, mixer.kernel - 1, generator=g)
        ssm = torch.randn(2, mixer.num_heads, mixer.head_dim, mixer.state_size, generator=g)
        ref_out, _, _ = mamba_step_ref(mixer, proj, conv[1:], ssm[1:], lo_hi)
        with torch.inference_mode():
            out = native.mamba_step(mixer, proj, torch.tensor([1]), conv, ssm, lo_hi)
        assert_close_rel(out, ref_out, RTOL, f"after {change}")


@needs_native
@pytest.mark.parametrize("threads", [3, 8])
def test_decode_attention_split_over_keys_merges_like_float64(threads):
    """Fewer (sequence, KV head) pairs than threads: each sequence's keys are split into ranges whose partial
    softmax sums are merged (split-K); the 3-key sequence gets an empty range."""
    g = torch.Generator().manual_seed(threads)
    nq, nkv, d, bs = 4, 1, 32, 16
    lengths = [3, 1500]
    k_plane = torch.randn(nkv, 1504, d, generator=g)
    v_plane = torch.randn(nkv, 1504, d, generator=g)
    tables = [93] + list(range(94))  # sequence 0: block 93; sequence 1: blocks 0..93 (block 93 shared, read-only)
    q = torch.randn(len(lengths), nq, d, generator=g) * 2.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.decode_attention(
            q, k_plane, v_plane, torch.tensor(tables), torch.tensor([0, 1]), torch.tensor(lengths), bs
        )
    finally:
        torch.set_num_threads(before)
    assert out is not None
    for s, n_keys in enumerate(lengths):
        blocks = tables[[0, 1][s] :]
        rows = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n_keys)])
        ref = attention_ref(q[s][None, :, None], k_plane[:, rows][None], v_plane[:, rows][None])[0, :, 0]
        assert_close_rel(out[s], ref, RTOL, f"sequence {s} ({n_keys} keys, {threads} threads)")


def k_major(weight: torch.Tensor) -> torch.Tensor:
    """The engine's CPU layout of a Linear weight [N, K]: a transposed view of a contiguous [K, N] tensor."""
    return weight.t().contiguous().t()


@needs_native
@pytest.mark.parametrize(
    ("rows", "K", "N"), [(1, 512, 2320), (2, 37, 33), (3, 64, 7), (4, 130, 1000), (1, 3, 16), (5, 64, 40), (8, 130, 1000)]
)
def test_linear_matches_float64(rows, K, N):
    """K not a multiple of 4 and N not a multiple of 16 exercise the row and column tails; a K-term float32 dot
    is within ~√K·u of exact, so 2e-6 relative L2 holds to K in the thousands."""
    g = torch.Generator().manual_seed(rows * K + N)
    x = torch.randn(1, rows, K, generator=g)
    w = k_major(torch.randn(N, K, generator=g) / math.sqrt(K))
    bias = torch.randn(N, generator=g)
    for b in (None, bias):
        out = native.linear(x, w, b)
        assert out is not None and out.shape == (1, rows, N)
        ref = x.to(f64) @ w.to(f64).t() + (0 if b is None else b.to(f64))
        assert_close_rel(out, ref, RTOL, f"linear rows={rows} K={K} N={N} bias={b is not None}")


@needs_native
def test_linear_reads_a_column_slice_of_a_fused_storage():
    """A parameter that is a view into a fused K-major matrix (row stride > N), as model/fused.py makes them."""
    g = torch.Generator().manual_seed(5)
    store = torch.randn(96, 200, generator=g)  # [K, Σ N_i]
    w = store[:, 50:120].t()  # [70, 96], stride (1, 200)
    x = torch.randn(3, 96, generator=g)
    out = native.linear(x, w)
    assert out is not None
    assert_close_rel(out, x.to(f64) @ w.to(f64).t(), RTOL, "column slice")


@needs_native
def test_linear_declines_what_it_does_not_take():
    x = torch.randn(native.LINEAR_MAX_ROWS + 1, 32)
    w = k_major(torch.randn(16, 32))
    assert native.linear(x, w) is None  # more rows than LINEAR_MAX_ROWS: MKL's GEMM does those
    assert native.linear(x[:2], w.contiguous()) is None  # row-major weight: not the engine's layout
    assert native.linear(x[:2].double(), w.double()) is None
    assert native.linear(x[:2, :16], w) is None  # K mismatch
    w.requires_grad_(True)
    assert native.linear(x[:2], w) is None  # autograd records through w
    with torch.no_grad():
        assert native.linear(x[:2], w) is not None


@needs_native
@pytest.mark.parametrize(
    ("rows", "K", "N"),
    [(1, 512, 2320), (2, 37, 33), (4, 130, 1000), (3, 256, 40), (8, 200, 70), (9, 700, 1500), (17, 37, 33), (32, 130, 1000)],
)  # more than 8 rows: blocks of 512 columns × 128 W rows (700 = 5 blocks + 60, 1500 = 2 blocks of 512 + 476)
@pytest.mark.parametrize("ksplit", [0, 1 << 30])
def test_linear_splits_rows_or_columns_over_threads_like_float64(rows, K, N, ksplit, monkeypatch):
    """Column strips (ksplit 0) and row blocks summed after (every matrix narrower than 1 GiB per thread), over 3
    threads so the partials have uneven tails; both must be float64-close, with and without bias."""
    monkeypatch.setattr(native, "LINEAR_KSPLIT_BYTES", ksplit)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(rows + K + N)
        x = torch.randn(rows, K, generator=g)
        w = k_major(torch.randn(N, K, generator=g) / math.sqrt(K))
        bias = torch.randn(N, generator=g)
        for b in (None, bias):
            ref = x.to(f64) @ w.to(f64).t() + (0 if b is None else b.to(f64))
            assert_close_rel(native.linear(x, w, b), ref, RTOL, f"ksplit={ksplit} rows={rows} K={K} N={N}")
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("bf16", [False, True])
def test_linear_blocks_for_many_rows_add_in_the_same_order(bf16):
    """Beyond 8 rows the kernel goes block by block through the weights (cpu_decode.c, linear_rows), each sum still
    adding its terms in increasing k: every group of 8 rows equals those rows alone, bit for bit."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(native.LINEAR_MAX_ROWS, 1100, generator=g)
    w = k_major(torch.randn(1300, 1100, generator=g) / math.sqrt(1100))
    w = w.bfloat16() if bf16 else w
    out = native.linear(x, w)
    for r in range(0, native.LINEAR_MAX_ROWS, 8):
        assert torch.equal(out[r : r + 8], native.linear(x[r : r + 8], w))


@needs_native
@pytest.mark.parametrize(("rows", "K", "N"), [(1, 512, 2320), (2, 37, 33), (4, 130, 1000), (1, 64, 7), (7, 96, 50),
                                             (20, 600, 700)])  # fmt: skip
def test_linear_reads_bfloat16_weights_widened_exactly(rows, K, N):
    """Weight-only bf16: the kernel widens each bf16 weight to float32 (exact) and accumulates in float32, so the
    float64 product with the widened weight is the reference, to the same 2e-6 as float32 weights."""
    g = torch.Generator().manual_seed(rows * N + K)
    x = torch.randn(1, rows, K, generator=g)
    w = k_major(torch.randn(N, K, generator=g) / math.sqrt(K)).bfloat16()
    assert w.stride(0) == 1  # the bf16 copy keeps the K-major layout
    bias = torch.randn(N, generator=g)
    for b in (None, bias):
        out = native.linear(x, w, b)
        assert out is not None and out.dtype == torch.float32
        ref = x.to(f64) @ w.to(f64).t() + (0 if b is None else b.to(f64))
        assert_close_rel(out, ref, RTOL, f"bf16 linear rows={rows} K={K} N={N}")
    assert native.linear(x.bfloat16(), w) is None  # activations must be float32


@needs_native
def test_experts_and_routing_read_bfloat16_weights_widened_exactly():
    x, up, down, indices, weights = expert_inputs(3, 16, 4, 40, 17, seed=2)
    up, down = up.bfloat16(), down.bfloat16()
    out = native.experts(x, up, down, indices, weights)
    assert out is not None
    assert_close_rel(out, experts_ref(x, up, down, indices, weights), RTOL, "bf16 experts")
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(3, 16, generator=g), torch.rand(16, generator=g) * 0.2
    w_ref, i_ref = route_ref(logits, bias, 4, 1, 1, True, 2.5)
    out = native.route_experts(logits, bias, 4, True, 2.5, x, up, down)
    assert_close_rel(out, experts_ref(x, up, down, i_ref, w_ref), RTOL, "bf16 route+experts")
    assert native.experts(x, up.float(), down, indices, weights) is None  # mixed weight dtypes


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_portable_build_matches_float64():
    """The plain-C code path (a CPU without AVX-512, built here with -mno-avx512f) through the same wrappers."""
    with plain_c_build():
        g = torch.Generator().manual_seed(11)
        x = torch.randn(3, 70, generator=g)
        w = k_major(torch.randn(45, 70, generator=g))
        assert_close_rel(native.linear(x, w), x.to(f64) @ w.to(f64).t(), RTOL, "portable linear")
        wb = w.bfloat16()
        assert_close_rel(native.linear(x, wb), x.to(f64) @ wb.to(f64).t(), RTOL, "portable bf16 linear")
        xe, up, down, indices, weights = expert_inputs(3, 8, 2, 24, 32, seed=1)
        out = native.experts(xe, up, down, indices, weights)
        assert_close_rel(out, experts_ref(xe, up, down, indices, weights), RTOL, "portable experts")
        up, down = up.bfloat16(), down.bfloat16()
        out = native.experts(xe, up, down, indices, weights)
        assert_close_rel(out, experts_ref(xe, up, down, indices, weights), RTOL, "portable bf16 experts")
        q = torch.randn(1, 4, 32, generator=g)
        k_plane, v_plane = torch.randn(2, 1, 64, 32, generator=g)
        out = native.decode_attention(
            q, k_plane, v_plane, torch.tensor([3, 0, 1, 2]), torch.tensor([0]), torch.tensor([50]), 16
        )
        rows = torch.tensor([[3, 0, 1, 2][t // 16] * 16 + t % 16 for t in range(50)])
        ref = attention_ref(q[0][None, :, None], k_plane[:, rows][None], v_plane[:, rows][None])[0, :, 0]
        assert_close_rel(out[0], ref, RTOL, "portable attention")
        k16, v16 = k_plane.bfloat16(), v_plane.bfloat16()
        out = native.decode_attention(
            q, k16, v16, torch.tensor([3, 0, 1, 2]), torch.tensor([0]), torch.tensor([50]), 16
        )
        ref = attention_ref(q[0][None, :, None], k16[:, rows][None], v16[:, rows][None])[0, :, 0]
        assert_close_rel(out[0], ref, RTOL, "portable bf16 attention")


@needs_native
@pytest.mark.parametrize(
    ("t", "h", "p", "g", "n", "Q"),
    [(37, 4, 16, 2, 8, 16), (300, 8, 64, 2, 64, 128), (130, 6, 20, 3, 12, 32), (5, 2, 8, 1, 40, 16), (64, 4, 16, 4, 16, 64)],
)
def test_ssd_scan_matches_the_float64_recurrence(t, h, p, g, n, Q):
    """The chunked scan against the plain sequential recurrence in float64, from a non-zero entering state;
    t not a multiple of Q, t < Q, n > Q and one head per group are all covered. Measured ≤ 5e-7 relative L2
    (the torch scan: ≤ 4e-7); we allow 2e-6."""
    g_ = torch.Generator().manual_seed(t * h + n)
    x = torch.randn(1, t, h, p, generator=g_)
    dt = torch.rand(1, t, h, generator=g_) * 0.5
    A = -torch.rand(h, generator=g_) * 2
    B = torch.randn(1, t, g, n, generator=g_)
    C = torch.randn(1, t, g, n, generator=g_)
    s0 = torch.randn(1, h, p, n, generator=g_)
    state = s0.clone()
    y = native.ssd_scan(x, dt, A, B, C, Q, state)
    assert y is not None and y.shape == (1, t, h, p)
    y_ref, s_ref = ssm_scan_ref(x, dt, A, B, C, s0)
    assert_close_rel(y, y_ref, RTOL, "ssd y")
    assert_close_rel(state, s_ref, RTOL, "ssd final state (in place)")


@needs_native
def test_ssd_scan_reads_channel_major_views_and_flushes_vanishing_decays():
    """Inputs laid out like the conv output (channel-major), and steps so large that e^(Δ·A) underflows far
    below float32's normal range: the flushed terms change nothing at float32 precision. Such Δ also make the
    chunk cumsums large, which costs any chunked scan accuracy (s_l − s_j loses ~|s|·u): the bound is the
    torch scan's own error on the same input (measured: native 5.9e-6, torch 7.6e-6 relative L2), doubled."""
    g_ = torch.Generator().manual_seed(9)
    t, h, p, g, n = 200, 4, 16, 2, 16
    xbc = torch.randn(1, h * p + 2 * g * n, t, generator=g_).transpose(1, 2)  # [1, t, C], token stride 1
    x, B, C = xbc.split([h * p, g * n, g * n], dim=-1)
    x, B, C = x.reshape(1, t, h, p), B.reshape(1, t, g, n), C.reshape(1, t, g, n)
    dt = torch.rand(1, t, h, generator=g_) * 40.0
    A = -torch.rand(h, generator=g_) * 4 - 1
    state = torch.zeros(1, h, p, n)
    y = native.ssd_scan(x, dt, A, B, C, 64, state)
    y_ref, s_ref = ssm_scan_ref(x, dt, A, B, C, None)
    y_torch, s_torch = ssd_chunk_scan(x, dt, A, B, C, 64, None)
    tol_y = max(RTOL, 2 * rel_err(y_torch, y_ref)[0])
    tol_s = max(RTOL, 2 * rel_err(s_torch, s_ref)[0])
    assert_close_rel(y, y_ref, tol_y, "ssd y, vanishing decays")
    assert_close_rel(state, s_ref, tol_s, "ssd state, vanishing decays")


@needs_native
def test_ssd_scan_declines_batches_and_strided_states():
    x, dt, B, C = torch.randn(2, 8, 2, 4), torch.rand(2, 8, 2), torch.randn(2, 8, 1, 4), torch.randn(2, 8, 1, 4)
    A = -torch.rand(2)
    assert native.ssd_scan(x, dt, A, B, C, 4, torch.zeros(2, 2, 4, 4)) is None  # one sequence per call
    state = torch.zeros(1, 2, 4, 8)[..., ::2]
    assert native.ssd_scan(x[:1], dt[:1], A, B[:1], C[:1], 4, state) is None


@needs_native
def test_mixer_prefill_takes_the_native_scan_inside_the_fast_path_only():
    """Mamba2Mixer.mix over a prompt chunk with a state: the engine's fast path and the reference path give the
    same output and the same advanced state."""
    torch.manual_seed(1)
    mixer = Mamba2Mixer(small_config("M", mamba_num_heads=4, n_groups=2, ssm_state_size=16, mamba_head_dim=8, chunk_size=16)).eval()
    b, t = 1, 45
    z = torch.randn(b, t, mixer.inner)
    xbc = torch.randn(b, t, mixer.conv_dim)
    dt = torch.randn(b, t, mixer.num_heads)
    ref_state, fast_state = mixer.new_state(b, torch.float32, torch.device("cpu")), None
    ref_state.ssm.normal_()
    fast_state = type(ref_state)(ref_state.conv.clone(), ref_state.ssm.clone())
    with torch.no_grad():
        ref = mixer.mix(z, xbc, dt, ref_state, decode=False)
        calls = []
        original = native.ssd_scan

        def spy(*args):
            calls.append(1)
            return original(*args)

        native.ssd_scan = spy
        try:
            with fast_path():
                fast = mixer.mix(z, xbc, dt, fast_state, decode=False)
        finally:
            native.ssd_scan = original
    assert calls, "the fast path did not take the native scan"
    assert_close_rel(fast, ref.double(), 1e-5, "mixer output")
    assert_close_rel(fast_state.ssm, ref_state.ssm.double(), 1e-5, "advanced state")
