"""Exact tensor attention: softmax over every allowed pair (a, b) of keys. `naive.py` is its reference (all
Tq x Tk x Tk scores); beside it the implementations the door (`ops.dispatch`) picks from: `tiled.py` (CPU and any
device, tile plan in `tiles.py`, compiled loops through `ops.extension`), `decode.py` (one query, no gradient) and
`triton_kernels.py` (CUDA, optional)."""
