"""`fedretina compare`: the arms and their reuse (arms.py), the report (report.py), the command (run.py)."""
