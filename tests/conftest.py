"""Session-wide test set-up.

Triton reads TRITON_INTERPRET when it is first imported, and torch (its
compiler, the benchmarks' torch.compile peers) may import it long before
the Triton tests run. Without a GPU, the whole session therefore runs
Triton in interpreter mode (kernels on CPU tensors), set here before any
test module is imported; on a machine with a GPU nothing changes.

Schedule choices measured on this machine (`ekko tune`, EKKO_TUNING) are
off for the whole session, so the expected IR and kernels do not depend on
where the tests run; the tuning tests turn them on in a temporary folder.
"""

import glob
import os

os.environ["EKKO_TUNING"] = "off"

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"
