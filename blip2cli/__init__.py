"""BLIP-2 from the terminal. Importing this package stays cheap: heavy modules load inside commands."""

import logging

__version__ = "0.1.0"

# torchao, which transformers imports whenever it is installed, registers Enum types with torch's pytree, and
# torch 2.14 logs a deprecation line for each on every start: library noise, nothing a user can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
