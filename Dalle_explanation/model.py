"""The IEMs of Dalle_explanation under the seed's names (SPEC §4); the architectures live in ``cortex.iem``.

``ClassificationNet1`` VGG-like (= VQGAN Net1), ``ClassificationNet2`` ResNet-SE (= VQGAN Net3),
``ClassificationNet3`` post-LN transformer attending across positions. Input ``(B, 256, 16, 16)``,
output ``(B, num_classes)`` logits (2 bias attributes by default).
"""
from cortex.iem.checkpoints import load_iem, save_iem  # noqa: F401
from cortex.iem.registry import DEFAULT_NUM_CLASSES, MODEL_IDS, authors_class, build_model, identify_architecture  # noqa: F401,E501

EXPERIMENT = "dalle"
NUM_CLASSES = DEFAULT_NUM_CLASSES[EXPERIMENT]

# the authors' class names; each is its registry entry's architecture with the paper's defaults
ClassificationNet1 = authors_class(EXPERIMENT, 1)
ClassificationNet2 = authors_class(EXPERIMENT, 2)
ClassificationNet3 = authors_class(EXPERIMENT, 3)
