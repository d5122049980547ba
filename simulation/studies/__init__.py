"""`fedretina study ...`: studies that answer one question end to end, each one module beside its YAMLs
(`pretraining`, `seed2`), sharing the paired-arms machinery (`paired`)."""
