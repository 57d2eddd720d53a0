"""Source-tree alias of the top-level `configs/` folder as `mlm_flax.configs`.

Installed (wheel or editable), `mlm_flax.configs` *is* that folder (setup.cfg `package_dir`) and this file is
not used; it only lets a checkout on `PYTHONPATH` import `mlm_flax.configs` from its own `configs/` folder.
"""

import os

__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')]
