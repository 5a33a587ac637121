"""`effusion serve`: a run kept warm behind an HTTP API with dynamic batching.

    from effusion.runs import load_run
    from effusion.serve import ServeSettings, create_app
    app = create_app(load_run("runs/demo"), ServeSettings(max_batch=32))

`serve()` is what the CLI runs: checks the address and token, loads the run, optionally
compiles it, and runs uvicorn.
"""

from effusion.serve.app import BadInput, ServeSettings, create_app, parse_generate
from effusion.serve.batcher import Batcher, QueueFull
from effusion.serve.server import check_address, compile_run, serve

__all__ = ["BadInput", "Batcher", "QueueFull", "ServeSettings", "check_address", "compile_run",
           "create_app", "parse_generate", "serve"]
