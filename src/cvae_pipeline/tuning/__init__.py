"""`make tune`: an Optuna search over params.yaml, each trial the train stage in a folder of its own."""
