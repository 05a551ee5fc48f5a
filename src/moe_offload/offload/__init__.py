"""Expert offloading: experts in host RAM (or on disk), an LRU cache of expert slots on the compute
device, speculative prefetch, and a planner that turns a memory budget into a placement.

    store.py     every expert's packed bytes in pinned host RAM, the overflow memory-mapped from disk
    cache.py     slots + LRU bookkeeping and counters, plain Python
    prefetch.py  the ExpertPredictor protocol and the gate-based predictor (predicts, moves nothing)
    provider.py  OffloadedExperts: the ExpertProvider that carries out copies (streams and events)
    planner.py   --gpu-memory / --cpu-memory -> what stays resident, slots per layer, KV cache size
"""
