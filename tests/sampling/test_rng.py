"""Noise sources: the Philox ("NV") generator reproduces CUDA's torch.randn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlab.sampling.rng import ImageRNG, PhiloxGenerator, _philox4_32, slerp

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = _philox4_32(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_nv_matches_cuda_randn_for_seed_0():
    # torch.manual_seed(0); torch.randn(5, device="cuda") on NVIDIA GPUs.
    cuda_seed_0 = torch.tensor([-0.9247, -0.4253, -2.6438, 0.1452, -0.1209])
    assert torch.allclose(PhiloxGenerator(0).randn((5,)), cuda_seed_0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nv_matches_cuda_randn_on_this_gpu():
    for seed in (0, 1, 12345, 2**32 + 7):
        torch.cuda.manual_seed(seed)
        expected = torch.randn((4, 16, 16), device="cuda").cpu()
        assert torch.allclose(PhiloxGenerator(seed).randn((4, 16, 16)), expected, atol=1e-5), seed


def test_image_rng_is_per_image_and_continues():
    rng = ImageRNG((4, 8, 8), [10, 11], "cpu")
    first = rng.first()
    alone = ImageRNG((4, 8, 8), [11], "cpu").first()
    assert torch.equal(first[1], alone[0])
    assert torch.equal(first[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(10)))
    gen = torch.Generator().manual_seed(10)
    torch.randn((4, 8, 8), generator=gen)
    assert torch.equal(rng.next()[0], torch.randn((4, 8, 8), generator=gen))
    nv = ImageRNG((4, 8, 8), [10], "nv")
    a, b = nv.first(), nv.next()
    assert not torch.equal(a, b)  # the Philox offset advances per draw


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    mid = slerp(0.5, a, b)
    assert abs(mid.std().item() - 1.0) < 0.1  # spherical: no loss of variance, unlike a lerp
