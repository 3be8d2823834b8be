#!/bin/sh
# The README's pictures, from the quick start and its ANN twin (about 2 x the quick start's time):
#   sh docs/make_images.sh
# Both runs use the quick preset on the builtin corpus; the twin sits in out/quick_ann, so the
# spiking run's curves.png shows both (spikelib/plots.py: the OUT_DIR / OUT_DIR_ann convention).
set -e
PY=${PYTHON:-python}
$PY 3_spike_llm_numpy.py --preset quick --out_dir out/quick_ann --spiking 0 --overwrite 1 --max_new_tokens 0
$PY 3_spike_llm_numpy.py --preset quick --out_dir out/quick --overwrite 1 --plot 1
for name in curves rates raster decay; do cp out/quick/$name.png docs/$name.png; done
ls -l docs/*.png
