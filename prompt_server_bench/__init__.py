"""Benchmarks for prompt-server, kept apart from the runtime package `prompt_server`.

    pip install -e ".[bench]"              # the runtime plus what the benchmarks need (peft, matplotlib)
    python -m prompt_server_bench --help   # or `prompt-server bench --help`; `make bench`, `make bench-http`

Modules: `bench` (in-process throughput, time to first token; the command line), `bench_http` (HTTP sweep against
`transformers serve`), `bench_soak` (mixed load with adapters replaced), `procs` (starting and stopping server
processes; the end-to-end tests use it too). `prompt_server` never imports this package; its `prompt-server bench`
subcommand loads it on demand.
"""
