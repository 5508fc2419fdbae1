"""gpt4free's API server (``g4f api``) in front of the benchmark's upstream, offline.

    python benchmarks/g4f_api.py --upstream http://127.0.0.1:P --port Q --model MODEL

``import g4f.api`` fetches a provider list from the internet (and fails offline) unless today's
cache of it exists: a cache is written to a temporary folder (``G4F_CACHE_DIR``) whose ``default``
provider — g4f's own OpenAI-compatible one, ``G4FSpace`` — is the upstream. Its version check is
turned off. Then ``g4f api`` runs as usual, one worker, no GUI, no access log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="g4f-cache-"))
    listing = cache / ".models" / datetime.date.today().strftime("%Y-%m-%d") / "providers.json"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps({"providers": {"default": {"baseUrl": args.upstream + "/v1"}},
                                   "defaultModels": {"default": args.model}}))
    os.environ["G4F_CACHE_DIR"] = str(cache)
    import g4f.debug  # type: ignore[import-untyped]

    g4f.debug.version_check = False
    from g4f.cli import main as g4f_main  # type: ignore[import-untyped]

    sys.argv = ["g4f", "api", "--bind", f"127.0.0.1:{args.port}", "--no-gui", "--provider", "G4FSpace",
                "--model", args.model, "--disable-pa-auto-download", "--no-access-log"]
    g4f_main()


if __name__ == "__main__":
    main()
