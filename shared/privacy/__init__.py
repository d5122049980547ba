"""Differential privacy: DP-SGD with the patient as the unit (`sgd`), accounting (`accounting`) and the ledger
of what a data holder released (`ledger`). What a span of training will spend is `Span.private_plan`
(`shared/training/phase.py`): privacy sits below training and never imports it."""
