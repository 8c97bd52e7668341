"""SubGen eviction for tensor attention (Zandieh et al. 2024, adapted to pairs): its stateless numerics. `naive.py`
holds the references (explicit Kronecker rows, one row at a time); beside them the estimators over weighted
summary rows (`estimators.py`) and the online δ-clustering of arriving rows (`clustering.py`). The state these read
and write (clusters, reservoirs, samplers) is `cache.summary.StreamSummary`."""
