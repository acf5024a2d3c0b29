"""ddiscan.io.intquant: GPTQ, AWQ and compressed-tensors pack-quantized dequantization.

GPTQ's and AWQ's libraries (auto-gptq, gptqmodel, autoawq) pull a CUDA torch and are not
installed: their layouts are packed here by an independent packer written from the
documented code, and W is rebuilt by a plain loop over its entries:

* GPTQ: AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack``
  (qweight rows ``|= intweight[j] << bits * (j - i)`` along in_features; ``zeros -= 1``
  before qzeros are packed the same way along out_features) and its ``forward``'s
  dequantization (``zeros = (qzeros >> wf) & mask; zeros += 1; scales * (weight - zeros)``);
  GPTQModel's ``checkpoint_format: gptq_v2`` stores the zeros without the ``- 1``.
* AWQ GEMM: AutoAWQ ``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear``
  (``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qweight[:, col] |= intweight[:, col * 8 +
  order_map[i]] << (i * 4)``, the same for qzeros) and ``awq/utils/packing_utils.py``
  ``dequantize_gemm`` (``(iweight - izeros) * scales``, both (in, out)).

compressed-tensors installs: its own ``PackedQuantizationCompressor`` compresses and
decompresses, and ddiscan's result must equal its decompression.
"""

from __future__ import annotations

import numpy as np
import pytest

from ddiscan.errors import QuantizedBase
from ddiscan.io import intquant
from ddiscan.io.quant import QuantScheme


def pack_along(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """The documented packing: 32/bits values per int32 word along ``axis``, value j of a
    word at bits ``bits * j`` (AutoGPTQ's ``pack``, a loop over the positions in a word)."""
    values = np.moveaxis(values.astype(np.uint32), axis, 0)
    per = 32 // bits
    words = np.zeros((values.shape[0] // per,) + values.shape[1:], np.uint32)
    for j in range(per):
        words |= (values[j::per] & np.uint32((1 << bits) - 1)) << np.uint32(bits * j)
    return np.moveaxis(words, 0, axis).view(np.int32)


def loop_reference(q, zeros, scales, g) -> np.ndarray:
    """W[o, i] = scales[g[i], o] * (q[i, o] - zeros[g[i], o]), entry by entry, in float64."""
    n_in, n_out = q.shape
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        for i in range(n_in):
            w[o, i] = float(scales[g[i], o]) * (int(q[i, o]) - int(zeros[g[i], o]))
    return w


def gptq_case(rng, bits=4, n_in=64, n_out=32, group=16, act_order=False, v2=False):
    q = rng.integers(0, 1 << bits, (n_in, n_out))
    groups = n_in // group
    # v1 cannot store a zero point of 0 (zeros - 1 masked to bits is read back as 2^bits)
    zeros = rng.integers(0 if v2 else 1, 1 << bits, (groups, n_out))
    scales = rng.uniform(0.01, 0.1, (groups, n_out)).astype(np.float16)
    g = np.arange(n_in) // group
    if act_order:
        g = rng.permutation(g)
    stored_zeros = zeros if v2 else (zeros - 1) % (1 << bits)  # AutoGPTQ: zeros -= 1, masked to bits
    arrays = {"qweight": pack_along(q, bits, 0), "qzeros": pack_along(stored_zeros, bits, 1),
              "scales": scales, "g_idx": g.astype(np.int32)}
    meta = {"bits": bits, "group_size": group, "desc_act": act_order,
            "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    return arrays, meta, loop_reference(q, zeros, scales, g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_equals_loop_reference(bits, act_order, v2):
    arrays, meta, expected = gptq_case(np.random.default_rng(bits + 2 * act_order + 4 * v2),
                                       bits=bits, act_order=act_order, v2=v2)
    got = intquant.gptq_dequantize(arrays, meta=meta, dtype=np.float64)
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_gptq_zero_convention_matters():
    """A v1 checkpoint read as v2 is off by one scale: the two conventions are told apart."""
    arrays, meta, expected = gptq_case(np.random.default_rng(0))
    wrong = intquant.gptq_dequantize(arrays, meta={**meta, "checkpoint_format": "gptq_v2"}, dtype=np.float64)
    assert not np.allclose(wrong, expected)


def test_gptq_without_g_idx_and_float32():
    arrays, meta, expected = gptq_case(np.random.default_rng(1))
    del arrays["g_idx"]
    got = intquant.gptq_dequantize(arrays, meta=meta, dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def awq_case(rng, n_in=64, n_out=32, group=16):
    q = rng.integers(0, 16, (n_in, n_out))
    zeros = rng.integers(0, 16, (n_in // group, n_out))
    scales = rng.uniform(0.01, 0.1, (n_in // group, n_out)).astype(np.float16)

    def pack(values):  # WQLinear_GEMM.from_linear, for qweight and qzeros alike
        words = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for col in range(values.shape[1] // 8):
            for i in range(8):
                words[:, col] |= values[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(i * 4)
        return words.view(np.int32)

    arrays = {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales}
    g = np.arange(n_in) // group
    return arrays, {"bits": 4, "group_size": group, "version": "gemm"}, loop_reference(q, zeros, scales, g)


def test_awq_equals_loop_reference():
    arrays, meta, expected = awq_case(np.random.default_rng(2))
    got = intquant.awq_dequantize(arrays, meta=meta, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_awq_order_matters():
    """AWQ's words read in GPTQ's plain column order give other numbers."""
    arrays, meta, expected = awq_case(np.random.default_rng(3))
    plain_q = intquant.unpack_bits(arrays["qweight"], 4, 32, axis=1)
    plain_z = intquant.unpack_bits(arrays["qzeros"], 4, 32, axis=1)
    plain = loop_reference(plain_q, plain_z, arrays["scales"], np.arange(64) // 16)
    assert not np.allclose(plain, expected)


def ct_case(bits, symmetric, strategy, n_out=24, n_in=64, group=16, seed=0):
    """A weight compressed by compressed-tensors' own PackedQuantizationCompressor, and its
    own decompression."""
    torch = pytest.importorskip("torch")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32))
    blocks = w.reshape(n_out, -1, group) if strategy == "group" else w.reshape(n_out, 1, n_in)
    scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    state = {"weight": w, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = zero
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    reference = PackedQuantizationCompressor.decompress(compressed, scheme)["weight"].double().numpy()
    arrays = {k: v.numpy() for k, v in compressed.items()}
    meta = {"num_bits": bits, "symmetric": symmetric, "strategy": strategy, "group_size": args.group_size}
    return arrays, meta, reference


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_ct_pack_equals_compressed_tensors(bits, symmetric, strategy):
    arrays, meta, reference = ct_case(bits, symmetric, strategy)
    got = intquant.ct_dequantize(arrays, meta=meta, dtype=np.float64)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-6)
    assert np.abs(reference).max() > 0


def test_unpack_bits_straddling_words():
    """3-bit values cross word boundaries: value 10 sits in bits 30..32."""
    values = np.arange(32) % 8
    bitstream = sum(int(v) << (3 * i) for i, v in enumerate(values))
    words = np.array([[(bitstream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]], np.uint32)
    np.testing.assert_array_equal(intquant.unpack_bits(words, 3, 32)[0], values)


def test_schemes_are_quant_schemes():
    assert [s.name for s in intquant.SCHEMES] == ["gptq", "awq", "ct-pack"]
    assert all(isinstance(s, QuantScheme) for s in intquant.SCHEMES)
    keys = {"m.q.qweight", "m.q.qzeros", "m.q.scales", "m.q.g_idx", "m.q.bias"}
    assert intquant.GPTQ.parts("m.q", keys) == {r: f"m.q.{r}" for r in ("qweight", "qzeros", "scales", "g_idx")}
    assert intquant.GPTQ.parts("m.k", keys) is None
    assert intquant.GPTQ.describe({"bits": 4, "group_size": 128, "desc_act": True}) == {
        "format": "gptq", "bits": 4, "group_size": 128, "act_order": True, "checkpoint_format": "gptq"}


# --- bad input: one-line QuantizedBase naming the role and what was expected --------------

def _raises(match, fn, arrays, meta):
    with pytest.raises(QuantizedBase, match=match) as info:
        fn(arrays, meta=meta, dtype=np.float32)
    assert "\n" not in str(info.value)


def test_gptq_bad_companions():
    arrays, meta, _ = gptq_case(np.random.default_rng(4))
    _raises(r"qzeros: has shape \[4, 2\]; expected \[4, 4\]", intquant.gptq_dequantize,
            {**arrays, "qzeros": arrays["qzeros"][:, :2]}, meta)
    _raises(r"scales: has shape \[3, 32\]; expected \[4, 32\]", intquant.gptq_dequantize,
            {**arrays, "scales": arrays["scales"][:3]}, meta)
    _raises(r"g_idx: holds groups 0\.\.9; expected 0\.\.3", intquant.gptq_dequantize,
            {**arrays, "g_idx": np.arange(64, dtype=np.int32) % 10}, meta)
    _raises(r"g_idx: has shape \[32\]", intquant.gptq_dequantize, {**arrays, "g_idx": arrays["g_idx"][:32]}, meta)
    _raises(r"quantization_config bits: 3", intquant.gptq_dequantize, arrays, {**meta, "bits": 3})
    _raises(r"qweight: has dtype float32", intquant.gptq_dequantize,
            {**arrays, "qweight": arrays["qweight"].astype(np.float32)}, meta)


def test_awq_bad_companions():
    arrays, meta, _ = awq_case(np.random.default_rng(5))
    _raises(r"qzeros: has shape \[4, 2\]; expected \[4, 4\]", intquant.awq_dequantize,
            {**arrays, "qzeros": arrays["qzeros"][:, :2]}, meta)
    _raises(r"scales: missing", intquant.awq_dequantize, {k: v for k, v in arrays.items() if k != "scales"}, meta)
    _raises(r"version: 'gemv'", intquant.awq_dequantize, arrays, {**meta, "version": "GEMV"})


def test_ct_bad_companions():
    arrays, meta, _ = ct_case(4, False, "group")
    _raises(r"weight_packed: has shape \[24, 8\]; expected \[24, 9\]", intquant.ct_dequantize,
            {**arrays, "weight_shape": np.array([24, 72])}, meta)
    _raises(r"weight_scale: has 72 values; expected 24 × 4", intquant.ct_dequantize,
            {**arrays, "weight_scale": arrays["weight_scale"][:18]}, meta)
    _raises(r"weight_zero_point: has shape", intquant.ct_dequantize,
            {**arrays, "weight_zero_point": arrays["weight_zero_point"][:1]}, meta)
    _raises(r"weight_scale: missing \(expected 24 × 4 scales", intquant.ct_dequantize,
            {k: v for k, v in arrays.items() if k != "weight_scale"}, meta)
    _raises(r"weight_shape: missing", intquant.ct_dequantize,
            {k: v for k, v in arrays.items() if k != "weight_shape"}, meta)


def test_parts_missing_companion():
    with pytest.raises(QuantizedBase, match=r"m\.q\.qzeros: missing; a GPTQ weight stores qweight, qzeros, scales"):
        intquant.GPTQ.parts("m.q", {"m.q.qweight", "m.q.scales"})
