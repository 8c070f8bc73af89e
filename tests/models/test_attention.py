"""The attention picker: FA3 -> FA2 -> SDPA, a failing backend skipped from then on, the used one recorded."""
import logging

import torch
import torch.nn.functional as F

from usp_fast.models import attention


def test_cpu_and_fp32_use_sdpa_and_record_it():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    assert attention.backend_name(q) == "sdpa"
    torch.testing.assert_close(attention.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert attention.last_backend == "sdpa" and "sdpa" in attention.available()


def test_a_failing_flash_backend_falls_back_once_and_only_restricts(monkeypatch, caplog):
    calls = []

    def broken_fa2(q, k, v):  # flash layout [B, N, H, d]; this build "lacks" the head size
        calls.append(q.shape)
        raise RuntimeError("FlashAttention only supports head dimension at most 256")

    monkeypatch.setattr(attention, "_fa2", broken_fa2)
    monkeypatch.setattr(attention, "_skipped", set())
    monkeypatch.setattr(attention, "backend_name",
                        lambda q: "fa2" if "fa2" not in attention._skipped else "sdpa")
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out = attention.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert calls == [(1, 4, 2, 8)] and attention.last_backend == "sdpa" and "fa2 failed" in caplog.text
    attention.attention(q, k, v)
    assert len(calls) == 1  # skipped from then on

    attention._skipped.clear()
    with attention.only("sdpa"):
        assert attention._skipped == {"fa3", "fa2"}
    assert attention._skipped == set()
