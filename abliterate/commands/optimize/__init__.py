"""`abliterate optimize`: the Optuna study over partial ablations and its Pareto front."""
