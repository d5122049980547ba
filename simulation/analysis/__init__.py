"""`fedretina analyze`: the commands of the second seed's three analyses of trained models (Srinivasan et al.
2022). Files in (our weights files, a site's images), tables and figures out, under
runs/NAME/analysis/<analysis>/. The maths they call lives in `shared.analysis`: pure functions of models
and arrays, which write nothing.

- `spectra`, `robustness`, `relevance`: one command each (`run_*`, Figs 3, 4 and 5) and its tables.
- `models`: the `--model NAME=PATH` weights files, each rebuilt from its own record and loaded strictly.
- `images`: the rows and model inputs an analysis reads; `lesions`: IDRiD's lesion masks, cropped as their
  images are.
- `outputs`: the run folder and markdown tables every command writes.

Images are read at `cfg.finetune_image_size`, unaugmented. Every random draw is seeded from the run seed and
the image id, so a run is repeatable byte for byte.
"""
