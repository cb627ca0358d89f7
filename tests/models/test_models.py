"""Students cut from a teacher's own layers, layer specs, and weight/tokenizer identities."""

import copy
import itertools

import pytest
import torch
from transformers import BertForSequenceClassification

from kdscale.commands.demo import build_demo_tokenizer
from kdscale.config import ConfigError, StudentConfig, TeacherConfig, TrainConfig
from kdscale.config.model_fields import resolve_layers
from kdscale.models import (
    build_student,
    count_parameters,
    load_model,
    num_layers_of,
    student_from_teacher,
    tokenizer_sha256,
    weights_sha256,
)
from kdscale.tasks import get_task

TEACHER_LAYERS = 4  # the `teacher` fixture in conftest.py


@pytest.mark.parametrize("spec, n, expected", [
    ("first:3", 4, [0, 1, 2]),
    ("first:1", 12, [0]),
    ("first:4", 4, [0, 1, 2, 3]),
    ("every_other", 4, [0, 2]),
    ("every_other", 5, [0, 2, 4]),
    ("every_other", 12, [0, 2, 4, 6, 8, 10]),
    ("uniform:3", 12, [0, 6, 11]),  # evenly spaced, first and last layer included
    ("uniform:2", 12, [0, 11]),
    ("uniform:6", 24, [0, 5, 9, 14, 18, 23]),
    ("uniform:4", 4, [0, 1, 2, 3]),
    ("uniform:1", 6, [5]),
    ([0, 2], 4, [0, 2]),
    ([3], 4, [3]),
    ([0, 1, 2, 3], 4, [0, 1, 2, 3]),
])
def test_resolve_layers(spec, n, expected):
    assert resolve_layers(spec, n) == expected


@pytest.mark.parametrize("k, n", [(k, n) for n in (2, 5, 12, 24) for k in range(2, n + 1)])
def test_uniform_is_increasing_and_spans_the_teacher(k, n):
    layers = resolve_layers(f"uniform:{k}", n)
    assert len(layers) == k and layers[0] == 0 and layers[-1] == n - 1
    assert all(b > a for a, b in itertools.pairwise(layers))
    ideal = [i * (n - 1) / (k - 1) for i in range(k)]
    assert max(abs(a - b) for a, b in zip(layers, ideal, strict=True)) <= 0.5


@pytest.mark.parametrize("spec, n, fragment", [
    ("first:9", 4, r"'first:9' asks for 9 layers; the teacher has 4"),
    ("first:0", 4, r"asks for 0 layers"),
    ("uniform:13", 12, r"asks for 13 layers"),
    ([0, 7], 4, r"layer indices \[7\] are not in the teacher, which has layers 0\.\.3"),
    ([-1, 2], 4, r"layer indices \[-1\]"),
    ([], 4, r"layer indices \[\]"),
    ([2, 1], 4, r"expected increasing, distinct indices"),
    ([1, 1], 4, r"expected increasing, distinct indices"),
    ("every-other", 4, r"expected a list of layer indices, 'first:K'"),
    ("first:", 4, r"expected a list of layer indices"),
])
def test_resolve_layers_errors(spec, n, fragment):
    with pytest.raises(ConfigError, match=f"student.layers: .*{fragment}"):
        resolve_layers(spec, n)


def layer_params(model, i):
    return dict(model.bert.encoder.layer[i].state_dict())


@pytest.mark.parametrize("layers", [[0, 2], [1, 3], [3], "first:3", [0, 1, 2, 3]])
def test_student_copies_teacher_layers(teacher, layers):
    student = student_from_teacher(teacher, layers)
    chosen = resolve_layers(layers, TEACHER_LAYERS)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(student.bert.encoder.layer) == len(chosen)
    assert teacher.config.num_hidden_layers == TEACHER_LAYERS  # the teacher's config untouched
    for s, t in enumerate(chosen):
        ours, theirs = layer_params(student, s), layer_params(teacher, t)
        assert ours.keys() == theirs.keys() and len(ours) > 0
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), f"student layer {s} {name} != teacher {t}"
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        ours = student.get_submodule(part).state_dict()
        theirs = teacher.get_submodule(part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_copied_layers_differ_from_skipped_ones(teacher):
    # Guards the test above: random layers are distinguishable, so copying the wrong one fails.
    student = student_from_teacher(teacher, [1, 3])
    query = "attention.self.query.weight"
    assert not torch.equal(layer_params(student, 0)[query], layer_params(teacher, 0)[query])


def test_student_is_a_separate_copy(teacher):
    before = weights_sha256(teacher)
    student = student_from_teacher(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert weights_sha256(teacher) == before
    assert all(p.data_ptr() not in {q.data_ptr() for q in teacher.parameters()}
               for p in student.parameters())


def test_frozen_embeddings_stay_the_teachers_through_training(teacher, tokenizer):
    from kdscale.train.loop import make_optimizer

    student = build_student(StudentConfig(layers=[0, 2], freeze_embeddings=True), teacher)
    embedding = student.get_input_embeddings().weight
    optimizer = make_optimizer(student, TrainConfig(learning_rate=0.1))
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == len(list(student.parameters())) - 1
    assert all(p is not embedding for p in trained)
    before = {name: p.clone() for name, p in student.named_parameters()}
    student(**inputs(tokenizer), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert "bert.embeddings.word_embeddings.weight" not in changed
    assert "bert.embeddings.position_embeddings.weight" in changed  # only the token matrix
    assert torch.equal(embedding, teacher.get_input_embeddings().weight)


def inputs(tokenizer):
    return tokenizer(["the movie was not dull", "the plot , but the cast was superb ."],
                     padding=True, return_tensors="pt")


def test_full_student_has_the_teachers_logits(teacher, tokenizer):
    student = student_from_teacher(teacher, "first:4").eval()
    batch = inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits,
                                   rtol=0, atol=0)


def test_student_forward_equals_teacher_run_on_chosen_layers(teacher, tokenizer):
    student = student_from_teacher(teacher, [1, 3]).eval()
    batch = inputs(tokenizer)
    with torch.no_grad():
        expected = teacher.bert.encoder.layer  # run the teacher with only layers 1 and 3
        teacher.bert.encoder.layer = torch.nn.ModuleList([expected[1], expected[3]])
        try:
            reference = teacher(**batch).logits
        finally:
            teacher.bert.encoder.layer = expected
        full = teacher(**batch).logits
        got = student(**batch).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert not torch.allclose(got, full)  # skipping layers changes the answer


def test_count_parameters(teacher):
    student = student_from_teacher(teacher, [0, 3])
    per_layer = sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
    assert count_parameters(teacher) == sum(p.numel() for p in teacher.parameters())
    assert count_parameters(teacher) - count_parameters(student) == 2 * per_layer > 0


def test_weights_sha256(teacher):
    digest = weights_sha256(teacher)
    assert digest == weights_sha256(teacher) and len(digest) == 64
    assert weights_sha256(copy.deepcopy(teacher)) == digest
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.bert.encoder.layer[2].output.dense.weight[3, 5] += 1e-3
    assert weights_sha256(changed) != digest
    assert weights_sha256(student_from_teacher(teacher, "first:4")) == digest


def test_tokenizer_sha256(tokenizer):
    digest = tokenizer_sha256(tokenizer)
    assert digest == tokenizer_sha256(build_demo_tokenizer()) and len(digest) == 64
    bigger = build_demo_tokenizer()
    assert bigger.add_tokens(["zeppelin"]) == 1
    assert tokenizer_sha256(bigger) != digest


def new_teacher(cfg: TeacherConfig, num_labels: int):
    return get_task("classification").new_model(cfg, [str(i) for i in range(num_labels)])


def test_load_teacher_from_inline_config(tokenizer):
    fields = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 3,
              "num_attention_heads": 2, "intermediate_size": 64}
    model = new_teacher(TeacherConfig(config=fields), 5)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_hidden_layers == len(model.bert.encoder.layer) == 3
    assert model.config.hidden_size == 32 and model.classifier.out_features == 5


def test_load_teacher_needs_model_or_config():
    with pytest.raises(ConfigError, match="set teacher.model"):
        new_teacher(TeacherConfig(), 2)


def test_inline_teacher_config_may_not_set_num_labels():
    config = TeacherConfig(config={"num_hidden_layers": 1, "hidden_size": 32,
                                   "num_attention_heads": 2, "num_labels": 2})
    with pytest.raises(ConfigError, match="teacher.config.num_labels: not a setting"):
        new_teacher(config, 2)


def test_saved_model_round_trip(teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher checkpoint .* has no config\.json"):
        load_model(tmp_path, what="teacher")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        num_layers_of(tmp_path)
    student = student_from_teacher(teacher, [0, 2, 3])
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    assert num_layers_of(tmp_path / "teacher") == TEACHER_LAYERS
    assert num_layers_of(tmp_path / "student") == 3
    loaded = load_model(tmp_path / "student")
    assert weights_sha256(loaded) == weights_sha256(student)
