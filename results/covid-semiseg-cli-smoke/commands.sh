#!/usr/bin/env bash
# End-to-end CLI run on the real COVID-SemiSeg data at a small image size (CPU): train -> evaluate ->
# pseudo-label -> train --pseudo -> evaluate -> predict (PNG + NIfTI).
set -euo pipefail
. .venv/bin/activate  # run from the repository root
D=../shared/data/covid-semiseg
O=/tmp/e2e; rm -rf $O; mkdir -p $O
export OMP_NUM_THREADS=1
opts="--image-size 64 --model-option base_channels=8 --optimizer adam --lr 3e-3 --batch-size 8 --num-workers 0"
time python -m cares train --data $D --folds 2 --fold 0 --epochs 3 $opts --out $O/cv0
time python -m cares train --data $D --epochs 6 $opts --out $O/sup
python -m cares evaluate --checkpoint $O/sup/last.pt --data $D --split test --out $O/sup/test --figures 2
# pseudo-label a subset of the 1600 unlabeled slices (copy 64 of them into a folder)
mkdir -p $O/unl/Imgs && python -c "import os,shutil,sys; d=sys.argv[1]; [shutil.copy(os.path.join(d,f), sys.argv[2]) for f in sorted(os.listdir(d))[:64]]" $D/unlabeled/Imgs $O/unl/Imgs
python -m cares pseudo-label --checkpoint $O/sup/last.pt --input $O/unl --out $O/pseudo --entropy-threshold 0.75
cat $O/pseudo/summary.json | head -20
time python -m cares train --data $D --pseudo $O/pseudo --epochs 3 $opts --out $O/semi
python -m cares evaluate --checkpoint $O/semi/last.pt --data $D --split test --out $O/semi/test --figures 2
python -m cares predict --checkpoint $O/sup/last.pt --input $D/test/Imgs --out $O/pred_png
python - <<'PY'
import numpy as np, nibabel as nib
vol = (np.random.default_rng(0).normal(-600, 300, size=(64, 64, 5))).astype(np.float32)
aff = np.diag([0.7, 0.7, 5.0, 1.0]); aff[:3, 3] = [-10, 20, 30]
nib.save(nib.Nifti1Image(vol, aff), "/tmp/e2e/scan.nii.gz")
PY
python -m cares predict --checkpoint $O/sup/last.pt --input $O/scan.nii.gz --out $O/pred_nii
ls $O/pred_nii; python -c "import nibabel as nib, glob; f=sorted(glob.glob('/tmp/e2e/pred_nii/*.nii*'))[0]; print(f, nib.load(f).affine.tolist())"
cat $O/sup/test/metrics.md; cat $O/semi/test/metrics.md
