"""After training: the evaluate stage's bounds on the test set, visualize's figures, and reading train's outputs."""
