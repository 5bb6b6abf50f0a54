"""One training loop for both stages; `python -m oasis_ldm.train --help`."""

from oasis_ldm.train.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "train"]
