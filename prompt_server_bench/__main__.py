"""`python -m prompt_server_bench ...`: the benchmark command line (the same as `prompt-server bench ...`)."""

import sys

from prompt_server_bench.bench import main

sys.exit(main(prog="python -m prompt_server_bench"))
