"""resopt: train, compress, export, quantize, build and benchmark ResNet-family classifiers."""

import os as _os

# libgomp threads spin while they wait by default. On a shared or busy machine (other processes on the
# cores) that collapses PyTorch's CPU speed: ResNet-20 at batch 32 on 2 threads ran 15 img/s with
# spinning and 214 img/s with passive waits, under a load average of 11 on 2 cores. It must be set
# before torch loads libgomp, hence here; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
