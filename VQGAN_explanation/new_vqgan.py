"""taming ``VQModel`` whose ``encode`` also returns the quantiser's distances to every code.

    quant, emb_loss, info, distances = VQModel(...).encode(x)   # distances: (B, h*w, n_codes)

No copying into a taming checkout: run from this folder, a taming config can say
``target: new_vqgan.VQModel``; from anywhere, ``target: cortex.data.taming_compat.DistanceVQModel`` is the same
class (the one copy lives in cortex/data/taming_compat.py). Importing this file applies the taming import shim.
"""
from cortex.data.taming_compat import import_taming, vq_distances  # noqa: F401

import_taming()

from cortex.data.taming_compat import DistanceVQModel  # noqa: E402

VQModel = DistanceVQModel

__all__ = ["VQModel", "DistanceVQModel", "vq_distances"]
