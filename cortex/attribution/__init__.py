"""Attribution layer: the attribution functions, the TIS scorer, the TIS store (the folder format) and the TIS
driver behind both folders' ``TIS_computation.py``."""
# cortex/significance.py (moved by the lead after his significance change) still imports this name from the
# package; the rest of cortex imports cortex.attribution.attributions directly.
from .attributions import print_smoothgrad_caveat  # noqa: F401
