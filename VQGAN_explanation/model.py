"""The IEMs of VQGAN_explanation under the seed's names (SPEC §4); the architectures live in ``cortex.iem``.

``ClassificationNet1`` VGG-like, ``ClassificationNet2`` VGG-like + conv3, ``ClassificationNet3`` ResNet-SE,
``ClassificationNet4`` ViT with BatchNorm. Input ``(B, 256, 16, 16)``, output ``(B, num_classes)`` logits.
"""
from cortex.iem.architectures import ResSENet, VGGNet, ViTBN  # noqa: F401
from cortex.iem.checkpoints import load_iem, save_iem  # noqa: F401
from cortex.iem.registry import MODEL_IDS, build_model, identify_architecture  # noqa: F401

EXPERIMENT = "vqgan"
NUM_CLASSES = 1000


class ClassificationNet1(VGGNet):
    """VGG-like: 2 x 4 conv layers, fc 4096-4096 (SPEC §4 VQGAN Net1)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512):
        super().__init__(num_classes, width, variant=1)


class ClassificationNet2(VGGNet):
    """Net1 plus conv3_1, conv3_2; fc 4096-2048 (SPEC §4 VQGAN Net2)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512):
        super().__init__(num_classes, width, variant=2)


class ClassificationNet3(ResSENet):
    """ResNet with squeeze-excitation (SPEC §4 VQGAN Net3)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512):
        super().__init__(num_classes, width)


class ClassificationNet4(ViTBN):
    """Pre-LN ViT with BatchNorm, 12 layers by default (SPEC §4 VQGAN Net4)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 512, depth: int = 12):
        super().__init__(num_classes, width, depth)


MODEL_CLASSES = {1: ClassificationNet1, 2: ClassificationNet2, 3: ClassificationNet3, 4: ClassificationNet4}
