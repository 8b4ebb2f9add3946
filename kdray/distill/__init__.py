"""Distillation: the pure loss functions and what a student needs of its teachers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config validates loss names against this package's registry: no import cycle at run time
    from kdray.config import Config

# The control every claim is measured against: the same student and training settings with no teacher at all (no
# distillation loss, no teacher-initialised start, no cached teacher top-K). Tune's "alone" arm and kdray run's
# "student (alone)" both come from here.
CONTROL = {"distill.loss": "none", "distill.alpha": 0.0, "distill.init_from_teacher": False,
           "distill.cached_topk": False}


def without_distillation(cfg: Config) -> Config:
    """``cfg`` with every distillation setting turned off (:data:`CONTROL`)."""
    from kdray.config import replace

    return replace(cfg, **CONTROL)
