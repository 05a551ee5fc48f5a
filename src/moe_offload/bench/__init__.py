"""Benchmarks: synthetic full-size models, routing traces, the accelerate baseline, reports.

    moe-offload bench --synthetic mixtral-8x7b --routing own,replay --budget 12     # see runner.py
    moe-offload bench record-routing --model DIR --text FILE --tokens 3072 --out trace.safetensors

    routing.py     record a trained model's routing; replay it onto a synthetic model (trace format there)
"""
