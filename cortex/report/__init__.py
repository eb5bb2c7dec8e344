"""Report layer: the figures of the evaluation, the token gallery and the demo report (`make demo`)."""
