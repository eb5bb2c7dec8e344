"""Layer 2, the Information Extraction Models (SPEC §4): the architectures, the IEM registry, checkpoint I/O,
training and testing. Imports only ``cortex.data`` and layer 0 (``cortex.utils``, ``cortex.cli``) at the top."""
