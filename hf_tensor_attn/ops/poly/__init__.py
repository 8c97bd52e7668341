"""Polynomial tensor attention (Alman & Song, Algorithm 1): exp of the trilinear score replaced by a polynomial P,
so that the pair sum factorises through monomial features. `naive.py` is its reference (P on the explicit
Tq x Tk x Tk scores). Beside it: `common.py` (the polynomial, the checks and the denominator floor both use),
`features.py` (the monomial features) and `chunk.py` (the feature path: a causal recurrence over chunks of positions
and its state, which the `poly` cache layer holds). The public entry is the door's `ops.poly_tensor_attention`."""
