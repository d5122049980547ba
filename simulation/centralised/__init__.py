"""The centralised commands: `fedretina pretrain` (`pretrain.py`) and `fedretina finetune` (`finetune.py`),
the same `run_phase` a federated site calls, on pooled data (the federation reproduces them bitwise)."""
