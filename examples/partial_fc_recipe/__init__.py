"""The pieces of ``examples/train_partial_fc.py``: synthetic identities,
the backbone, verification, checkpoints and the run's report."""
