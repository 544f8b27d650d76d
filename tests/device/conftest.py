"""tests/device/ runs only inside the Python 3.10 device environment: tests/test_py310.py builds
it and runs this folder there with ``FTZ_DEVICE_BUNDLES`` set. Elsewhere (the development run)
its modules are not collected at all: they neither run twice nor show up as skips."""

import os

if "FTZ_DEVICE_BUNDLES" not in os.environ:
    collect_ignore_glob = ["test_*.py"]
