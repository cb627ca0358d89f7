"""Hidden-state and attention losses against explicit loops, layer maps, and one tiny BERT
teacher/student pair end to end."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertModel

from kdscale.config.intermediate import IntermediateConfig
from kdscale.train.intermediate import (
    PROB_EPS,
    AttentionKL,
    HiddenStateCosine,
    HiddenStateMSE,
    IntermediateLosses,
    parse_layer_map,
    uniform_layer_map,
)

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])  # (B=3, S=5)
B, S = MASK.shape


def _states(layers, width, seed):
    """HF-style hidden_states: embeddings plus one (B, S, width) tensor per layer, leaves."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, width, generator=gen).requires_grad_()
                 for _ in range(layers + 1))


def _probs(layers, heads, seed, drop=0.0):
    """HF-style attentions: softmax rows over the unpadded keys; `drop` zeroes that share of
    the other valid keys too (key 0 is always kept, so no row is empty)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        logits = torch.randn(B, heads, S, S, generator=gen)
        dropped = torch.rand(B, heads, S, S, generator=gen) < drop
        dropped[..., 0] = False
        dropped |= MASK[:, None, None, :] == 0
        out.append(logits.masked_fill(dropped, -math.inf).softmax(-1).requires_grad_())
    return tuple(out)


def ref_mse(student, teacher, pairs, projections=None):
    layer_means = []
    for s, t in pairs:
        total, count = 0.0, 0
        for b in range(B):
            for i in range(S):
                if MASK[b, i]:
                    x = student[s][b, i].double()
                    if projections is not None:
                        lin = projections[s]
                        x = lin.weight.double() @ x + lin.bias.double()
                    total += ((x - teacher[t][b, i].double()) ** 2).sum().item() / x.numel()
                    count += 1
        layer_means.append(total / count)
    return sum(layer_means) / len(layer_means)


def ref_cosine(student, teacher, pairs):
    layer_means = []
    for s, t in pairs:
        values = [1 - (x @ y / (x.norm() * y.norm())).item()
                  for b in range(B) for i in range(S) if MASK[b, i]
                  for x, y in [(student[s][b, i].double(), teacher[t][b, i].double())]]
        layer_means.append(sum(values) / len(values))
    return sum(layer_means) / len(layer_means)


def ref_attention_kl(student, teacher, layer_map):
    layer_means = []
    for s, t in layer_map.items():
        p, q = teacher[t].double(), student[s].double()
        rows = []
        for b in range(B):
            for h in range(p.shape[1]):
                for i in range(S):
                    if MASK[b, i]:
                        rows.append(sum(p[b, h, i, k].item() * math.log(
                            p[b, h, i, k].item() / max(q[b, h, i, k].item(), PROB_EPS))
                            for k in range(S) if MASK[b, k] and p[b, h, i, k] > 0))
        layer_means.append(sum(rows) / len(rows))
    return sum(layer_means) / len(layer_means)


@pytest.mark.parametrize("ls, lt, expected", [
    (6, 12, {0: 1, 1: 3, 2: 5, 3: 7, 4: 9, 5: 11}),
    (2, 4, {0: 1, 1: 3}),
    (4, 4, {0: 0, 1: 1, 2: 2, 3: 3}),
    (1, 12, {0: 11}),
    (8, 12, {0: 1, 1: 2, 2: 4, 3: 5, 4: 7, 5: 8, 6: 10, 7: 11}),  # halves round up: even gaps
])
def test_uniform_layer_map(ls, lt, expected):
    assert uniform_layer_map(ls, lt) == expected
    assert parse_layer_map("uniform", ls, lt) == expected


def test_explicit_layer_maps_and_their_errors():
    assert parse_layer_map({1: 3, 0: 2}, 2, 4) == {0: 2, 1: 3}
    assert parse_layer_map({"0": "1"}, 2, 4) == {0: 1}  # JSON / CLI give string keys
    for spec, match in [({2: 3}, r"student layer 2 is not in the student, which has layers 0\.\.1"),
                        ({0: 4}, r"teacher layer 4 is not in the teacher, which has layers 0\.\.3"),
                        ({-1: 0}, "student layer -1"), ({0: True}, "teacher layer True"),
                        ({0: 1, "0": 2}, "appears twice"), ({}, "non-empty"),
                        ("every_other", "expected 'uniform' or")]:
        with pytest.raises(ValueError, match=match):
            parse_layer_map(spec, 2, 4)
    with pytest.raises(ValueError, match="6 student and 4 teacher layers"):
        uniform_layer_map(6, 4)


def test_hidden_mse_with_projection_matches_reference_and_trains_only_the_student_side():
    student, teacher = _states(3, 4, seed=0), _states(6, 6, seed=1)
    loss_fn = HiddenStateMSE(4, 6, {0: 1, 2: 5}, embeddings=True)
    assert sorted(loss_fn.projections) == ["embeddings", "layer_0", "layer_2"]
    loss = loss_fn(student, teacher, MASK)
    named = loss_fn.projections
    projections = {0: named["embeddings"], 1: named["layer_0"], 3: named["layer_2"]}
    assert_close(loss.item(), ref_mse(student, teacher, [(0, 0), (1, 2), (3, 6)], projections))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())
    assert student[1].grad[MASK == 1].abs().sum() > 0
    assert student[1].grad[MASK == 0].abs().sum() == 0  # padding gets no gradient
    assert student[2].grad is None  # student layer 1 is not mapped
    assert all(h.grad is None for h in teacher)


def test_hidden_mse_same_width_has_no_projection_and_ignores_padding():
    student, teacher = _states(2, 8, seed=2), _states(4, 8, seed=3)
    loss_fn = HiddenStateMSE(8, 8, {0: 1, 1: 3})
    assert loss_fn.projections is None and not list(loss_fn.parameters())
    loss = loss_fn(student, teacher, MASK)
    assert_close(loss.item(), ref_mse(student, teacher, [(1, 2), (2, 4)]))
    noisy = [h.detach().clone() for h in student]
    for h in noisy:
        h[MASK == 0] = math.inf  # where, not multiply: 0 * inf would be NaN
    assert_close(loss_fn(noisy, teacher, MASK), loss)
    assert loss_fn(student, teacher, None) != loss  # padding counts when no mask is given


def test_no_valid_token_gives_zero_loss_and_zero_gradient():
    student, teacher = _states(2, 4, seed=4), _states(4, 8, seed=5)
    loss = HiddenStateMSE(4, 8, {0: 1, 1: 3})(student, teacher, torch.zeros(B, S))
    loss.backward()
    assert loss.item() == 0 and student[1].grad.abs().sum() == 0


def test_hidden_cosine_matches_reference():
    student, teacher = _states(2, 6, seed=6), _states(4, 6, seed=7)
    loss = HiddenStateCosine({0: 1, 1: 3}, embeddings=True)(student, teacher, MASK)
    assert_close(loss.item(), ref_cosine(student, teacher, [(0, 0), (1, 2), (2, 4)]))
    loss_fn = HiddenStateCosine({1: 1})  # hidden_states[2] on both sides
    assert abs(loss_fn(teacher[:3], teacher, MASK).item()) < 1e-6  # cos(h, h) = 1
    assert_close(loss_fn((None, None, -teacher[2]), teacher, MASK).item(), 2.0)  # cos = -1
    half = [h.bfloat16() for h in student]
    assert loss_fn(half, teacher, MASK).dtype == torch.float32


def test_hidden_cosine_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match="student 16 and teacher 32"):
        HiddenStateCosine({0: 1})(_states(1, 16, seed=0), _states(2, 32, seed=1), MASK)


def test_attention_kl_matches_reference_with_zero_teacher_probabilities():
    student, teacher = _probs(2, 3, seed=8), _probs(4, 3, seed=9, drop=0.4)
    assert (teacher[3][0] == 0).any()  # zeros on valid keys: batch row 0 has no padding
    layer_map = {0: 1, 1: 3}
    loss = AttentionKL(layer_map)(student, teacher, MASK)
    assert torch.isfinite(loss)
    assert_close(loss.item(), ref_attention_kl(student, teacher, layer_map))
    loss.backward()
    assert torch.isfinite(student[0].grad).all() and student[0].grad.abs().sum() > 0
    assert all(a.grad is None for a in teacher)
    same = AttentionKL({0: 0})(teacher[:1], teacher[:1], MASK)
    assert abs(same.item()) < 1e-6  # KL(p || p) = 0


def test_attention_kl_ignores_padded_queries_and_keys():
    student, teacher = _probs(1, 2, seed=12), _probs(1, 2, seed=13)
    loss = AttentionKL({0: 0})(student, teacher, MASK)
    noisy_s, noisy_t = student[0].detach().clone(), teacher[0].detach().clone()
    pad_q, pad_k = (MASK == 0)[:, None, :, None], (MASK == 0)[:, None, None, :]
    noisy_s.masked_fill_(pad_q | pad_k, 0.0)  # log(0) there would be inf if it counted
    noisy_t.masked_fill_(pad_q | pad_k, 0.7)
    assert_close(AttentionKL({0: 0})((noisy_s,), (noisy_t,), MASK), loss)


def test_attention_kl_student_zero_where_teacher_has_mass_stays_finite():
    teacher = _probs(1, 2, seed=10)
    student = _probs(1, 2, seed=11, drop=0.5)  # zeros where the teacher is positive
    loss = AttentionKL({0: 0})(student, teacher, MASK)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student[0].grad).all()
    assert_close(loss.item(), ref_attention_kl(student, teacher, {0: 0}))


def test_attention_kl_errors():
    with pytest.raises(ValueError, match="equal head counts.*2 heads.*4"):
        AttentionKL({0: 0})(_probs(1, 2, 0), _probs(1, 4, 1), MASK)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        AttentionKL({0: 0})((), _probs(1, 2, 1), MASK)  # what SDPA returns


def test_combined_losses_compute_only_weighted_terms():
    student, teacher = _states(2, 16, seed=12), _states(4, 32, seed=13)
    config = IntermediateConfig(hidden_mse=0.5)  # attention and cosine weights are 0
    losses = IntermediateLosses(config, student_layers=2, teacher_layers=4,
                                student_hidden=16, teacher_hidden=32)
    out = losses(SimpleNamespace(hidden_states=student, attentions=None),
                 SimpleNamespace(hidden_states=teacher, attentions=None), MASK)
    assert set(out) == {"hidden_mse", "total"}
    assert_close(out["total"], 0.5 * out["hidden_mse"])
    with pytest.raises(ValueError, match="student 16 and teacher 32"):
        IntermediateLosses(IntermediateConfig(hidden_cosine=1.0), student_layers=2,
                           teacher_layers=4, student_hidden=16, teacher_hidden=32)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        losses(SimpleNamespace(), SimpleNamespace(hidden_states=teacher), MASK)
    off = IntermediateLosses(IntermediateConfig(), student_layers=2, teacher_layers=4,
                             student_hidden=16, teacher_hidden=32)
    assert off(None, None, MASK) == {"total": torch.tensor(0.0)}


def test_combined_total_is_the_weighted_sum_of_the_parts():
    hs_s, hs_t = _states(2, 8, seed=14), _states(4, 8, seed=15)
    at_s, at_t = _probs(2, 2, seed=16), _probs(4, 2, seed=17)
    config = IntermediateConfig(hidden_mse=0.5, hidden_cosine=3.0, attention_kl=2.0)
    losses = IntermediateLosses(config, student_layers=2, teacher_layers=4,
                                student_hidden=8, teacher_hidden=8)
    out = losses(SimpleNamespace(hidden_states=hs_s, attentions=at_s),
                 SimpleNamespace(hidden_states=hs_t, attentions=at_t), MASK)
    assert_close(out["hidden_mse"].item(), ref_mse(hs_s, hs_t, [(1, 2), (2, 4)]))
    assert_close(out["hidden_cosine"].item(), ref_cosine(hs_s, hs_t, [(1, 2), (2, 4)]))
    assert_close(out["attention_kl"].item(), ref_attention_kl(at_s, at_t, {0: 1, 1: 3}))
    expected = 0.5 * out["hidden_mse"] + 3.0 * out["hidden_cosine"] + 2.0 * out["attention_kl"]
    assert_close(out["total"], expected)


@pytest.mark.parametrize("fields, match", [({"hidden_mse": -1.0}, "intermediate.hidden_mse"),
                                           ({"attention_kl": math.inf}, "attention_kl"),
                                           ({"layer_map": [0, 1]}, "intermediate.layer_map")])
def test_config_is_validated_when_built(fields, match):
    with pytest.raises(ValueError, match=match):
        IntermediateConfig(**fields)


def _bert(layers, hidden, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(BertConfig(  # eager: SDPA returns no attention probabilities
            vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=16,
            attn_implementation="eager")).eval()


def test_tiny_bert_teacher_and_student_end_to_end():
    teacher, student = _bert(4, 32, seed=0), _bert(2, 16, seed=1)
    ids = torch.randint(1, 40, (B, S), generator=torch.Generator().manual_seed(0))
    ids[MASK == 0] = 0
    config = IntermediateConfig(hidden_mse=1.0, attention_kl=0.5, embeddings=True)
    losses = IntermediateLosses.from_models(config, student, teacher)
    assert losses.layer_map == {0: 1, 1: 3}
    run = {"attention_mask": MASK, "output_hidden_states": True, "output_attentions": True}
    # the teacher runs with gradients on purpose: the losses themselves must keep it out
    out = losses(student(ids, **run), teacher(ids, **run), MASK)
    assert set(out) == {"hidden_mse", "attention_kl", "total"}
    assert torch.isfinite(out["total"]) and out["total"] > 0
    out["total"].backward()
    unreached = [n for n, p in student.named_parameters()
                 if not n.startswith("pooler.") and (p.grad is None or not p.grad.any())]
    assert not unreached
    assert all(p.grad is not None and p.grad.any() for p in losses.parameters())
    assert len(list(losses.parameters())) == 6  # embeddings, layer_0, layer_1: weight + bias
    assert all(p.grad is None for p in teacher.parameters())
