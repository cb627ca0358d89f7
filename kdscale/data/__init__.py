"""Task data: reading splits, tokenizing labelled text, batching, augmented copies."""

from kdscale.data.loaders import LengthGroupedBatchSampler, PaddingCollator, make_loader
from kdscale.data.sources import DataError, check_sources, label_names_of, load_raw
from kdscale.data.tokenize import (
    MODEL_COLUMNS,
    SAMPLE_ROWS,
    TaskData,
    check_rows_readable,
    check_unknown_rate,
    fingerprint,
    tokenize_labelled,
)

__all__ = ["MODEL_COLUMNS", "SAMPLE_ROWS", "DataError", "LengthGroupedBatchSampler",
           "PaddingCollator", "TaskData", "check_rows_readable", "check_sources",
           "check_unknown_rate", "fingerprint", "label_names_of",
           "load_raw", "make_loader", "tokenize_labelled"]
