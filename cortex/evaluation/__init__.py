"""Evaluation layer: masking, the sample-, concept- and codebook-level explanation checks, and the evaluators."""
