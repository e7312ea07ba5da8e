"""The Makefile's commands beyond the pipeline: make sample, make compare, make sweep and make promote."""
