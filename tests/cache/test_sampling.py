"""Sampled teacher rows: the same draws for the same (seed, example, position) anywhere, counts
that sum to the draws, and a gradient whose mean over draws is the full teacher's (unbiased),
where top-k's stays off."""

import torch
from kdscale.kernels import kd_loss_reference

from kdscale.cache.sampling import row_seed, sampled_rows

T = 2.0


def _grad(student, **teacher):
    s = student.clone().requires_grad_()
    loss = kd_loss_reference(s, temperature=T, alpha=1.0, reduction="sum", **teacher)
    return torch.autograd.grad(loss, s)[0]


def test_draws_depend_on_seed_example_and_position_only():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ids, positions = torch.tensor([7, 7, 9]), torch.tensor([1, 4, 1])
    first = sampled_rows(logits, ids, positions, draws=16, temperature=T, seed=3)
    again = sampled_rows(logits[[2, 0]], ids[[2, 0]], positions[[2, 0]], 16, T, seed=3)
    assert torch.equal(again["indices"], first["indices"][[2, 0]])  # other batch, same rows
    other = sampled_rows(logits, ids, positions, 16, T, seed=4)
    assert not torch.equal(other["indices"], first["indices"])
    counts = torch.where(first["indices"] >= 0, (first["values"] / T).exp(), 0.0)
    torch.testing.assert_close(counts.sum(dim=1), torch.full((3,), 16.0))
    assert row_seed(3, 7, 1) == row_seed(3, 7, 1) != row_seed(3, 7, 4)


def _sampled_error(teacher, student, full, rows: int) -> float:
    drawn = sampled_rows(teacher.expand(rows, -1), torch.arange(rows),
                         torch.zeros(rows, dtype=torch.long), draws=16, temperature=T, seed=0)
    mean = _grad(student.expand(rows, -1), teacher_topk_values=drawn["values"],
                 teacher_topk_indices=drawn["indices"].long()).mean(dim=0, keepdim=True)
    return float((mean - full).norm() / full.norm())


def test_the_mean_gradient_over_draws_is_the_full_teachers_and_top_k_stays_biased():
    """The error of the mean over M rows of 16 draws halves when M is 4x: no bias left under
    the noise. Top-k's error does not move with anything: it is bias."""
    g = torch.Generator().manual_seed(1)
    teacher, student = 0.5 * torch.randn(1, 200, generator=g), torch.randn(1, 200, generator=g)
    full = _grad(student, teacher_logits=teacher)
    errors = [_sampled_error(teacher, student, full, rows) for rows in (500, 2000, 8000)]
    assert errors[2] < 0.1
    assert errors[1] < 0.65 * errors[0] and errors[2] < 0.65 * errors[1]
    values, indices = teacher.topk(16, dim=-1)
    topk = _grad(student, teacher_topk_values=values, teacher_topk_indices=indices)
    assert float((topk - full).norm() / full.norm()) > 10 * errors[2]
