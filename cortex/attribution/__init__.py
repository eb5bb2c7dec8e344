"""Attribution layer: the attribution functions, the TIS scorer, the TIS store (the folder format) and the TIS
driver behind both folders' ``TIS_computation.py``."""
