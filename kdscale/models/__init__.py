"""Models: loading saved ones safely, students built from a teacher's layers, identities."""

from kdscale.models.identity import (
    checkpoint_sha256,
    count_parameters,
    parameters_in_config,
    tokenizer_sha256,
    weights_sha256,
)
from kdscale.models.loading import (
    CheckpointError,
    check_inputs_fit,
    check_vocabulary,
    checkpoint_errors,
    label_names,
    load_model,
    load_tokenizer,
    num_layers_of,
    require_checkpoint,
)
from kdscale.models.students import build_student, check_student_model, student_from_teacher

__all__ = ["CheckpointError", "build_student", "check_inputs_fit", "check_student_model",
           "check_vocabulary", "checkpoint_errors", "checkpoint_sha256", "count_parameters",
           "label_names", "load_model", "load_tokenizer", "num_layers_of", "parameters_in_config",
           "require_checkpoint", "student_from_teacher", "tokenizer_sha256", "weights_sha256"]
