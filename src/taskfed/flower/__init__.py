"""taskfed on Flower (flwr 1.41): the same methods as a real federation, on Flower's Simulation Engine or on
a SuperLink with SuperNodes (docs/flower.md).

The layer is thin on purpose: the ServerApp (`server.py`) drives a taskfed `Method` exactly like
`run.Experiment.train` does (seeded client choice, `plan`, `aggregate`), and the ClientApp (`node.py`) runs
each node's jobs with the in-process engine's own `InProcessEngine.run` on a one-client federation, so no
method or training logic lives here. What is here: payload encoding and validation (`codec.py`), the
client store on the node's disk (`store.py`), a fast base-model cache for short-lived ClientApp processes
(`basecache.py`), and helpers to start a local TLS federation (`local.py`).

The core never imports this package; it imports the core.
"""

import os

# Flower's telemetry is opt-out: off unless the user turned it on explicitly.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
