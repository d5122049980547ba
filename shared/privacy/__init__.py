"""Differential privacy: DP-SGD with the patient as the unit (`sgd`), accounting (`accounting`), what a run
will spend (`plan`) and the ledger of what a data holder released (`ledger`)."""
