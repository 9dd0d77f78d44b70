"""`python <this folder> ...` runs the core's command line from anywhere, e.g. from the ComfyUI folder:

    python custom_nodes/sae-concept-eraser convert <checkpoint dir> models/sae/<name>.safetensors

Python puts this folder first on sys.path, so `sae_core` is found without installing anything; relative
paths stay relative to where the command is run. Same commands as `python -m sae_core` (see README).
"""

import sys

from sae_core.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
