"""The PROPER pipeline on a user-history dataset, as one command::

    python -m proper_kernels.train --model DIR --data PATH --output OUT

Modules by concern: :mod:`.data` (JSONL and LaMP readers, the validation split, user
buckets), :mod:`.prompts` (the LaMP tasks), :mod:`.metrics` (LaMP's metrics),
:mod:`.engine` (tokenising, mixed-user batches, generation), :mod:`.early_stopping`
(per-user early stopping), :mod:`.pipeline` (stages, checkpoints, resume),
:mod:`.report` (results.json / results.md), :mod:`.cli` (the flags) and
:mod:`.synthetic` (a LaMP-format dataset and a tiny model made offline, to try it).
Needs transformers, tqdm, scikit-learn and rouge-score (the ``train`` extra).
"""
from .data import DataError, Dataset, Example, load_dataset, read_jsonl, read_lamp
from .pipeline import RunError, TrainConfig, run

__all__ = ["main", "run", "TrainConfig", "RunError", "DataError", "Dataset", "Example", "load_dataset", "read_jsonl",
           "read_lamp"]


def main(argv=None) -> int:
    """The command line (see ``python -m proper_kernels.train -h``)."""
    from .cli import main as _main

    return _main(argv)
