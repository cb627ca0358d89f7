"""The fidelity audit of a top-k cache, on teachers whose answer is known."""

import torch

from kdscale.cache.audit import FidelityAudit, describe


def test_a_teacher_whose_mass_sits_in_its_top_k_loses_nothing():
    teacher = torch.full((6, 50), -1e4)
    teacher[:, :4] = torch.randn(6, 4)
    audit = FidelityAudit(k=4, temperature=2.0)
    audit.add(teacher)
    result = audit.result()
    assert result["mass_covered"] > 1 - 1e-6
    assert result["topk"]["loss_error"] < 1e-5 and result["topk"]["grad_error"] < 1e-5


def test_a_flat_teacher_loses_most_without_the_tail_and_the_sample_is_capped():
    audit = FidelityAudit(k=8, temperature=1.0, rows=20)
    for seed in range(3):
        audit.add(0.1 * torch.randn(16, 200, generator=torch.Generator().manual_seed(seed)))
    result = audit.result()
    assert result["rows"] == 20
    assert result["mass_covered"] < 0.1  # 8 of 200 nearly equal outputs
    assert result["topk"]["grad_error"] > 0.5
    assert result["topk_tail"]["grad_error"] < result["topk"]["grad_error"] / 2
    assert "top 8 hold" in describe(result)


def test_no_rows_no_audit():
    assert FidelityAudit(k=2, temperature=1.0).result() is None
