"""The built-in methods, one folder each; importing this registers them (see `icot.registry`). The
shared stages come first: the others read them. `simcot/` holds what the two SIM-CoT methods share and
registers nothing itself."""

from icot.methods import shared  # noqa: F401, I001  (registration on import, in this order)
from icot.methods import icot_kd  # noqa: F401
from icot.methods import stepwise  # noqa: F401
from icot.methods import coconut  # noqa: F401
from icot.methods import codi  # noqa: F401
from icot.methods import coconut_simcot  # noqa: F401  (variants of coconut and codi: registered after them)
from icot.methods import codi_simcot  # noqa: F401
