"""Reading named coefficients from a Calibration: no numbers in the estimator's code.

Every coefficient the formulas leave open (cuBLAS workspaces, allocator slack, CUDA context,
time-model efficiencies and host costs) comes from a Calibration. ``catalog.load_calibration``
always merges ``catalog/calibrations/default.json`` (the priors, each with its provenance)
under a GPU's or a user's file, so a missing name means a hand-made Calibration lacks it.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..spec import Calibration


def coefficient(cal: Calibration, name: str) -> float:
    """The value of ``name`` in ``cal``; a ConfigError that names it when it is missing."""
    try:
        return float(cal.coefficients[name])
    except KeyError:
        raise ConfigError(f"calibration '{cal.gpu or 'default'}' has no coefficient '{name}'; load it with "
                          f"loraplan.catalog.load_calibration (which merges calibrations/default.json) "
                          f"or add '{name}' to the calibration file") from None


def default_calibration() -> Calibration:
    """The built-in priors (``catalog/calibrations/default.json``), for callers without a GPU."""
    from ..catalog import load_calibration

    return load_calibration(None)
