"""Import path for `serve run` / `serve deploy`: the application is built by `atm_ray.serve.app.build_app`.

    serve run serve/config.yaml              # from the repository root, after `atm-ray pipeline --preset tiny`
    serve deploy serve/config.yaml --address http://HEAD:8265
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.serve.app import build_app  # noqa: E402

app_builder = build_app
