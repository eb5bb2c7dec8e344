"""Layer 1, the data: dataset formats (``formats`` reads, ``writer`` writes), whole-folder tools, the VQ tokenizers
and their registry, the synthetic worlds and the real (taming / image-folder) sources. At the top it imports only
``cortex.utils`` and ``cortex.cli`` from outside this package."""
