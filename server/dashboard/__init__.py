"""`fedretina dashboard`: a live web page over run stores, read-only (`data.py` reads, `app.py` serves)."""
