"""Benchmarks: synthetic full-size models, routing traces, the accelerate baseline, reports.

    moe-offload bench --synthetic mixtral-8x7b --quant 4/2 --budget 12GiB --routing own,replay --accelerate --out r.json
    moe-offload bench record-routing --model DIR --text FILE --tokens 3072 --out trace.safetensors
    moe-offload bench table --results r.json          # Markdown beside the paper's Table 2
    moe-offload bench plot --results r.json --out r.png

    runner.py               the measurements: every quantization x budget x mode x routing in one process
    synthetic.py            Mixtral-8x7B's shapes with random weights made directly in the target format
    routing.py              record a trained model's routing; replay it onto a synthetic model (trace format there)
    accelerate_baseline.py  transformers + accelerate offloading at the same budget (the paper's baseline)
    profile.py              where a decode token's time goes (torch.profiler, boiled down)
    report.py, plot.py      Markdown tables and a PNG from report JSONs
    cli.py                  the `moe-offload bench` subcommands
"""
