"""Count the Python function calls a public loss makes before its first compiled-kernel
call (the fixed per-call cost the layering adds), e.g. for a CPU info_nce:

    PYTHONPATH=python .venv/bin/python bench/python_hops.py

Counts 'call' events of Python frames (sys.setprofile) from the public function's entry
until the first call into the compiled module _C; frames of torch itself are counted
apart (they are the custom-op dispatch), so the line reads "ours + torch's"."""
from __future__ import annotations

import sys

import torch


def hops(fn, *args, **kwargs):
    ours = theirs = 0
    done = False

    def prof(frame, event, arg):
        nonlocal ours, theirs, done
        if done:
            return
        if event == "c_call" and getattr(arg, "__module__", "") and "metassl_fast._C" in str(arg.__module__):
            done = True
            return
        if event == "call":
            if "metassl_fast" in frame.f_code.co_filename:
                ours += 1
            else:
                theirs += 1

    sys.setprofile(prof)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return ours, theirs


def main():
    import metassl_fast as msf

    torch.manual_seed(0)
    q = torch.randn(256, 128, requires_grad=True)
    k = torch.randn(256, 128, requires_grad=True)
    cases = {
        "info_nce (grad)": lambda: msf.info_nce(q, k, backend="cpu"),
        "info_nce (no grad)": lambda: msf.info_nce(q.detach(), k.detach(), backend="cpu"),
        "nt_xent (grad)": lambda: msf.nt_xent(q, k, backend="cpu"),
        "siglip_loss (grad)": lambda: msf.siglip_loss(q, k, 10.0, -10.0, backend="cpu"),
    }
    for name, call in cases.items():
        call()  # warm: imports, the op registry
        ours, theirs = hops(call)
        print(f"{name}: {ours} calls in metassl_fast + {theirs} in torch before the first _C kernel call")


if __name__ == "__main__":
    main()
