# Issue 13 probe, run for bench/RESULTS.md (2026-12-08): peak RSS of the heads benchmark's fit_logreg evaluation
# (2000 episodes, D=640) for a chunk size, ours and scikit-learn's loop.  Run with the pinned threshold:
#   MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=2 PYTHONPATH=python .venv/bin/python bench/probes/fit_logreg_memory.py SHOT CHUNK
import sys, torch
from metassl_fast.benchmarks import heads as H, _common as c
torch.set_num_threads(2)
shot=int(sys.argv[1]); chunk=int(sys.argv[2])
H.EVAL_CHUNK=chunk
xs, ys, xq, yq = H.episodes(2000, shot, 640, H.Q_PER_CLASS, seed=1, normalize=True)
np_args = [a.numpy() for a in (xs, ys, xq, yq)]
H.ours_eval(xs[:2], ys[:2], xq[:2], yq[:2], "cpu"); H.sklearn_eval(*[a[:2] for a in np_args])
import time
t=time.perf_counter(); o=c.peak_extra_mb(lambda: H.ours_eval(xs, ys, xq, yq, "cpu")); t=time.perf_counter()-t
s=c.peak_extra_mb(lambda: H.sklearn_eval(*np_args))
print(f"shot {shot} chunk {chunk}: ours {o:.2f} MiB ({t*1e3:.0f} ms incl. measuring), sklearn {s:.2f} MiB")
