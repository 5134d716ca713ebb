"""Defaults that recipe sections and the CLI flags mirroring them share, in one place. Free of heavy
imports, so that every `orchestrator` command starts fast."""

TRACKING_URI = "sqlite:///mlflow.db"  # relative to the working directory
EXPERIMENT = "orchestrator"
EVAL_SOURCE = "reference"  # the held-out split of the reference corpus
EVAL_SEQ_LEN = 128
EVAL_MAX_WINDOWS = 64
EVAL_BATCH_SIZE = 8
