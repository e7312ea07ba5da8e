"""MLflow: the stage's session with the store, which run records what, dataset lineage, the logged model, the registry.

What is logged here records what a stage did; it decides none of the stage's outputs, so no stage lists this package
among its DVC code dependencies (see `code_dependencies`).
"""
