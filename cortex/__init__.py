"""CORTEX: concept-centric token interpretation for vector-quantized generative models.

Shared library of the two experiment folders (``VQGAN_explanation/``, ``Dalle_explanation/``).
Everything both folders need lives here once; the folders hold the argparse scripts.
"""

__version__ = "0.1.0"
