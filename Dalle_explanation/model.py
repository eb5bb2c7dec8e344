"""The IEMs of Dalle_explanation under the seed's names (SPEC §4); the architectures live in ``cortex.iem``.

``ClassificationNet1`` VGG-like (= VQGAN Net1), ``ClassificationNet2`` ResNet-SE (= VQGAN Net3),
``ClassificationNet3`` post-LN transformer attending across positions. Input ``(B, 256, 16, 16)``,
output ``(B, num_classes)`` logits (2 bias attributes by default).
"""
from cortex.iem.architectures import PostLNTransformer, ResSENet, VGGNet  # noqa: F401
from cortex.iem.checkpoints import load_iem, save_iem  # noqa: F401
from cortex.iem.registry import MODEL_IDS, build_model, identify_architecture  # noqa: F401

EXPERIMENT = "dalle"
NUM_CLASSES = 2


class ClassificationNet1(VGGNet):
    """VGG-like, as VQGAN_explanation's ClassificationNet1 (SPEC §4)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512):
        super().__init__(num_classes, width, variant=1)


class ClassificationNet2(ResSENet):
    """ResNet with squeeze-excitation, as VQGAN_explanation's ClassificationNet3 (SPEC §4)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512):
        super().__init__(num_classes, width)


class ClassificationNet3(PostLNTransformer):
    """Post-LN transformer, 6 layers by default, fixed sinusoidal positions (SPEC §4 Dalle Net3)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512, depth: int = 6):
        super().__init__(num_classes, width, depth)


MODEL_CLASSES = {1: ClassificationNet1, 2: ClassificationNet2, 3: ClassificationNet3}
