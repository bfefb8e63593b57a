"""Analysis of a tune-cifar study folder, from its Parquet tables alone (no Ray, no W&B).

Scripts: ``best_config.py`` (leaderboard, factor tables, importance, Pareto front, retrain),
``gradient_flow.py`` (per-layer gradient and update flow, gradient health), ``bn_landscape.py``
(the BatchNorm loss-landscape study) and the notebook ``explore_trials.ipynb``.
"""
